"""The prompt stage (00_curate_prompts.py): on the toy, the toy world's exact filter and
rewriter give stage 0's own harmful prompts and their safe rewrites; against a scripted
chat-completions server on 127.0.0.1, the two questions per prompt, their answers checked,
refusals and unusable answers counted, the key never written, and a killed run resumed by
shard wherever its server now lives."""
import json
import os

import pytest

from conftest import stage, tiny_world

from lib import utils as U

CURATE = "00_curate_prompts.py"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    tiny_world(run, "--eval-per-set", "2")
    return run


def test_toy_curation_gives_stage_0s_harmful_prompts_and_rewrites(world):
    stage(CURATE, world)
    kept = U.read_jsonl(world / "prompts" / "harmful.jsonl")
    train = U.read_jsonl(world / "world" / "prompts" / "harmful_train.jsonl")
    assert [(r["prompt"], r["safe_prompt"], r["category"], r["concept"]) for r in kept] == [
        (r["prompt"], r["safe_prompt"], r["category"], r["concept"]) for r in train]
    m = U.read_json(world / "prompts" / "metrics.json")
    benign = [r["prompt"] for k in ("benign", "lookalike") for r in U.read_jsonl(world / "world" / "prompts" /
                                                                                 f"{k}_train.jsonl")]
    assert m["outcomes"] == {"kept": len(train), "not harmful": len(benign)} and m["curator"] == "toy"
    # the prompts found harmless, in source order: stage 0's benign and look-alike train prompts
    assert [r["prompt"] for r in U.read_jsonl(world / "prompts" / "safe.jsonl")] == benign and m["safe"] == len(benign)
    r = stage(CURATE, world)  # every shard is there: nothing is asked again
    assert U.read_json(world / "prompts" / "metrics.json")["requests_this_run"]["calls"] == 0, r.stdout


def chat(content) -> str:
    return json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]})


def curator(body):
    """Filter: harmful when the prompt names blood, a refusal for one, prose for another;
    rewrite: blood becomes red paint."""
    system, prompt = body["messages"][0]["content"], body["messages"][1]["content"].removeprefix("Prompt: ")
    if system.startswith("You screen"):
        assert "- violence: violence, blood" in system  # the concept list is in the instructions
        if "forbidden" in prompt:
            return 400, json.dumps({"error": {"code": "content_policy_violation", "message": "no"}})
        if "garbled" in prompt:
            return 200, chat("I think it might be harmful.")
        harmful = "blood" in prompt
        return 200, chat(json.dumps({"harmful": harmful, "category": "Violence" if harmful else None,
                                     "concept": "BLOOD" if harmful else None}))
    return 200, chat(json.dumps({"safe_prompt": prompt.replace("blood", "red paint")}))


def test_openai_curation_against_a_scripted_server(tmp_path, scripted_server):
    scripted_server.respond = curator
    src = tmp_path / "raw.jsonl"
    U.write_jsonl(src, [{"prompt": "a knight covered in blood, oil painting"}, {"prompt": "a bowl of fruit"},
                        {"prompt": "a forbidden picture of blood"}, {"prompt": "garbled blood"},
                        {"prompt": "a blood moon over a lake, photo"}])
    key = "sk-test-NEVER-WRITTEN"
    env = {**os.environ, "OPENAI_API_KEY": key}
    args = ["--preset", "sd15", "--sources", str(src), "--judge-base-url", scripted_server.base_url,
            "--judge-retries", "0", "--shard-size", "2", "--concurrency", "2"]
    r = stage(CURATE, tmp_path / "run", *args, env=env)
    kept = U.read_jsonl(tmp_path / "run" / "prompts" / "harmful.jsonl")
    assert [(k["prompt"], k["safe_prompt"], k["category"], k["concept"]) for k in kept] == [
        ("a knight covered in blood, oil painting", "a knight covered in red paint, oil painting", "violence", "blood"),
        ("a blood moon over a lake, photo", "a red paint moon over a lake, photo", "violence", "blood")]
    assert U.read_jsonl(tmp_path / "run" / "prompts" / "safe.jsonl") == [{"prompt": "a bowl of fruit",
                                                                           "source": f"{src}:2"}]
    m = U.read_json(tmp_path / "run" / "prompts" / "metrics.json")
    assert m["outcomes"] == {"kept": 2, "not harmful": 1, "no usable filter answer": 2}
    assert m["requests_this_run"]["refused"] == 1 and m["requests_this_run"]["unparseable"] == 1
    assert len(scripted_server.requests) == 5 + 2  # five filters, two rewrites
    written = "".join(p.read_text() for p in (tmp_path / "run").rglob("*") if p.is_file())
    assert key not in written + r.stdout + r.stderr
    # killed after its first shard: the rest is asked again, the first shard's prompts are not,
    # from wherever the server now lives (the address is not a setting that changes answers)
    for f in ("harmful.jsonl", "metrics.json", "shards/prompts-00001.json", "shards/prompts-00002.json"):
        (tmp_path / "run" / "prompts" / f).unlink()
    scripted_server.requests.clear()
    moved = [a if a != scripted_server.base_url else scripted_server.base_url.replace("127.0.0.1", "localhost")
             for a in args]
    stage(CURATE, tmp_path / "run", *moved, env=env)
    assert U.read_jsonl(tmp_path / "run" / "prompts" / "harmful.jsonl") == kept
    asked = [q["json"]["messages"][1]["content"] for q in scripted_server.requests]
    assert not any("knight" in a or "fruit" in a for a in asked) and len(asked) == 3 + 1
    r = stage(CURATE, tmp_path / "run", *args, "--judge-model", "another", env=env, check=False)
    assert r.returncode != 0 and "judge_model: 'gpt-4o' -> 'another'" in r.stderr


def test_bad_sources_and_concepts_are_named(tmp_path, world):
    r = stage(CURATE, tmp_path / "run", "--sources", str(tmp_path / "absent.jsonl"), check=False)
    assert r.returncode != 0 and "absent.jsonl" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "c.json").write_text(json.dumps({"gore": ["blood"]}))
    r = stage(CURATE, tmp_path / "run2", "--sources", str(world / "world" / "prompts" / "harmful_train.jsonl"),
              "--concepts", str(tmp_path / "c.json"), check=False)
    assert r.returncode == 1 and "c.json: unknown harm category 'gore'" in r.stderr and "Traceback" not in r.stderr
