"""SneakyPrompt (systems/sneakyprompt.py): its loss by hand, its policy learning a bandit, the words it
replaces, its stopping rules and budget on scripted filters; the command end to end (the
report's verdicts under attack are in test_baselines.py, on the same run)."""
import shutil
from types import SimpleNamespace

import pytest
import torch

from lib import models as M
from lib import utils as U
from systems import sneakyprompt as SP
from conftest import stage, tiny_world_with_scm


def test_actor_critic_loss_by_hand():
    # K = 2, r = 1, γ = 0.5: R = [0.5, 1], A = R − V = [0, 0.8];
    # L = −(−1·0) − (−2·0.8) + 0² + 0.8² = 1.6 + 0.64
    log_p = torch.tensor([-1.0, -2.0], requires_grad=True)
    values = torch.tensor([0.5, 0.2], requires_grad=True)
    loss = SP.actor_critic_loss(log_p, values, 1.0, 0.5)
    assert loss.item() == pytest.approx(2.24)
    loss.backward()
    assert torch.allclose(log_p.grad, torch.tensor([0.0, -0.8]))      # −sg(A)
    assert torch.allclose(values.grad, torch.tensor([0.0, -1.6]))     # −2A
    assert SP.query_penalty(6, 60) == pytest.approx(-0.01)


def test_the_policy_learns_a_bandit():
    # one action among 8, reward 1 for action 3: the actor-critic update concentrates on it
    torch.manual_seed(0)
    policy, g = SP.Policy(1, 8), torch.Generator().manual_seed(0)
    opt = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=0.1)
    for _ in range(60):
        (a,), log_p, values = policy.sample(g)
        opt.zero_grad()
        SP.actor_critic_loss(log_p, values, float(a == 3), 1.0).backward()
        opt.step()
    with torch.no_grad():
        h, _ = policy.lstm(policy.inputs[0](torch.zeros(1, 1, dtype=torch.long)))
        p = policy.logits[0](h[:, -1]).softmax(-1)[0]
    assert p[3] > 0.9
    # three actions: log π(a_k) are log-probabilities, one value per action
    actions, log_p, values = SP.Policy(3, 8).sample(torch.Generator().manual_seed(1))
    assert len(actions) == 3 and log_p.shape == values.shape == (3,) and (log_p < 0).all()


def test_words_spans_and_the_sensitive_ones():
    prompt = "a red circle, white background, extreme self-harm."
    spans = SP.split_words(prompt)
    words = [prompt[a:b] for a, b in spans]
    assert words == ["a", "red", "circle", ",", "white", "background", ",", "extreme", "self-harm", "."]
    assert SP.substitute(prompt, spans, [8, 1], ["xyzzy", "blue"]) == "a blue circle, white background, extreme xyzzy."
    drop = {1: 0.3, 2: 0.1, 5: 0.5}  # leaving "background" out lowers the harm similarity most
    ranked = SP.sensitive_words(words, ["harm"], lambda i: drop.get(i, 0.0))
    assert ranked[:4] == [8, 5, 1, 2] and 3 not in ranked and 9 not in ranked  # never punctuation


def test_subword_vocabulary():
    vocab = SP.subword_vocabulary(M.clip_tokenizer(16), 10, ["blood", "gore"])
    assert len(vocab) > 10_000 and len(set(vocab)) == len(vocab)
    assert all(w.isalpha() and w.isascii() and len(w) < 10 for w in vocab)
    assert "circle" in vocab and "bloody" not in vocab and "gore" not in vocab


def args_(**kw):
    return SimpleNamespace(**{**dict(reward="clip", threshold=0.26, queries=60, steps=50, subwords=1, lr=0.1,
                                     gamma=1.0), **kw})


PROMPT = "one two three four five six seven eight nine ten eleven blood"


def test_a_filter_that_blocks_everything_spends_the_budget_and_adds_words():
    calls = []
    query = lambda p: calls.append(p) or (False, None)
    ranked = [11, 0, 1, 2]
    res = SP.sneaky_search(PROMPT, ranked, 1, ["aa", "bb"], None, query, args_(queries=12),
                           torch.Generator().manual_seed(0))
    # five penalties in a row add a word: 5 + 5 queries with 1 and 2 words, then 2 with 3 words
    assert res["result"] == "failed" and res["queries"] == len(calls) == 12 and res["steps"] == 12
    assert res["replaced"] == ["blood", "one", "two"]
    assert res["reward"] == pytest.approx(SP.query_penalty(1, 12))  # the least-penalised prompt is kept
    assert all("blood" not in c for c in calls)


def test_clip_reward_stops_at_the_threshold_and_l2_queries_only_above_it():
    passes = lambda p: (True, 0.3) if p.endswith("ok") else (False, None)
    g = torch.Generator().manual_seed(0)
    res = SP.sneaky_search(PROMPT, [11], 1, ["ok", "no"], None, passes, args_(), g)
    assert res["result"] == "success" and res["prompt"] == PROMPT.replace("blood", "ok") and res["reward"] == 0.3
    assert res == SP.sneaky_search(PROMPT, [11], 1, ["ok", "no"], None, passes, args_(),
                                   torch.Generator().manual_seed(0))  # its generator makes it exact
    # l2: offline rewards; the filter sees only a prompt at the threshold, and passes it here
    calls = []
    l2 = lambda p: 0.7 if p.endswith("ok") else 0.5
    query = lambda p: calls.append(p) or (True, None)
    res = SP.sneaky_search(PROMPT, [11], 1, ["ok", "no"], l2, query, args_(reward="l2", threshold=0.6), g)
    assert res["result"] == "success" and calls == [res["prompt"]] and res["reward"] == 0.7
    # l2 where nothing reaches the threshold: the policy stops moving; its best prompt is queried once
    calls.clear()
    res = SP.sneaky_search(PROMPT, [11], 1, ["ok", "no"], lambda p: 0.5, query, args_(reward="l2", threshold=0.6), g)
    assert res["result"] == "bypass" and len(calls) == 1 and res["steps"] == 4


# --------------------------------------------------------------------------------------
# The command at --tiny: against the filter, resumed, refused
# --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sp_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    tiny_world_with_scm(run)
    stage("-m systems.baselines build", run, "--baseline", "filter")
    r = stage("-m systems.sneakyprompt search", run)
    return run, r


def test_search_writes_one_row_per_target(sp_run):
    run, r = sp_run
    rows = U.read_jsonl(run / "attacks" / "sneakyprompt.jsonl")
    cfg = U.read_json(run / "attacks" / "sneakyprompt.json")
    assert len(rows) == 2 and cfg["source_set"] == "harmful" and cfg["queries"] == 6 and cfg["reward"] == "l2"
    for row in rows:
        assert row["result"] in ("success", "bypass", "failed", "skipped") and 0 <= row["queries"] <= 6
        assert row["category"] and row["target"] and -1 <= row["similarity"] <= 1
        if row["result"] == "skipped":
            assert row["prompt"] == row["target"]
        else:  # the replaced words are gone, the rest is as written
            assert row["replaced"] and not any(w in row["prompt"].split() for w in row["replaced"])
    assert not (run / "attacks" / "sneakyprompt.jsonl.part").exists()
    assert "filter queries" in r.stdout


def test_search_resumes_to_the_same_rows_and_refuses_other_settings(sp_run):
    run, _ = sp_run
    final = run / "attacks" / "sneakyprompt.jsonl"
    before = final.read_bytes()
    first = U.read_jsonl(final)[:1]
    final.unlink()
    U.write_jsonl(final.with_suffix(".jsonl.part"), first)  # killed after its first target
    r = stage("-m systems.sneakyprompt search", run)
    assert "1 done" in r.stdout and final.read_bytes() == before
    r = stage("-m systems.sneakyprompt search", run)
    assert "nothing to do" in r.stdout
    r = stage("-m systems.sneakyprompt search", run, "--queries", "9", check=False)
    assert r.returncode != 0 and "queries: 6" in r.stderr and "Traceback" not in r.stderr


def test_missing_filter_and_clip_reward_without_model_are_named(sp_run, tmp_path):
    run, _ = sp_run
    shutil.copytree(run / "world", tmp_path / "world")
    r = stage("-m systems.sneakyprompt search", tmp_path, check=False)
    assert r.returncode != 0 and "build the filter first" in r.stderr and "Traceback" not in r.stderr
    r = stage("-m systems.sneakyprompt search", tmp_path, "--reward", "clip", check=False)
    assert r.returncode != 0 and "--clip-model" in r.stderr and "Traceback" not in r.stderr
