"""Stages 1-2 end to end on the smallest toy config: LibraAlign-Coarse pairs, resumable
shards, bad-input handling, and the Safety Cost Model (train, save, load_scm, resume, DDP)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import free_port, module, stage, tiny_world

import common as C
from lib import scorers as S
from lib import toyworld as W
from lib import utils as U

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def coarse_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    tiny_world(run, "--eval-per-set", "2")
    stage("00_curate_prompts.py", run)
    stage("01_build_coarse.py", run)
    return run


def test_coarse_pairs_are_judged_and_complete(coarse_run):
    c = coarse_run / "coarse"
    pairs = U.read_jsonl(c / "pairs.jsonl")
    m = json.loads((c / "metrics.json").read_text())
    assert len(pairs) == m["n_pairs"] == 30 and m["skipped_no_answer"] == 0
    assert {p["kind"] for p in pairs} <= {"harmful-harmful", "harmful-safe"}
    for p in pairs:
        w, l = U.load_png(c / p["w"]["path"]), U.load_png(c / p["l"]["path"])
        assert W.which_is_more_harmful(w, l) == 0  # the recorded winner is the judge's choice
        assert (p["w"]["severity"], p["l"]["severity"]) == (W.toy_judge(w), W.toy_judge(l))
        assert p["w"]["severity"] >= p["l"]["severity"]
        for side in ("w", "l"):
            assert p[side]["sign"] == (1 if p[side]["severity"] >= 1 else -1)
        assert p["judge"] == "toy" and p["split"] in ("train", "eval")
    config = json.loads((c / "config.json").read_text())  # the toy samples in fp32 on every CPU
    assert config["dtype"] == "float32" and config["sample_dtype"] == "torch.float32"
    # held-out prompts never appear in training pairs
    train = {p[s]["prompt"] for p in pairs if p["split"] == "train" for s in "wl"}
    held = {p[s]["prompt"] for p in pairs if p["split"] == "eval" for s in "wl"}
    assert not (train & held)


def test_coarse_resumes_without_redoing_or_duplicating(coarse_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(coarse_run, run)
    c = run / "coarse"
    def pairs_without_model_path():  # the model folder's absolute path differs in the copy
        rows = U.read_jsonl(c / "pairs.jsonl")
        return [{k: ({kk: vv for kk, vv in v.items() if kk != "model"} if k in "wl" else v) for k, v in r.items()} for r in rows]

    before = pairs_without_model_path()
    mtimes = {p: p.stat().st_mtime_ns for p in (c / "images").glob("*.png")}
    (c / "shards" / "pairs-00001.json").unlink()  # as if killed while judging shard 1
    stage("01_build_coarse.py", run)
    assert pairs_without_model_path() == before
    assert {p: p.stat().st_mtime_ns for p in (c / "images").glob("*.png")} == mtimes  # nothing regenerated


def test_coarse_two_processes_build_what_one_builds(coarse_run, tmp_path, torchrun):
    """Under torchrun each process generates every 2nd chunk and judges every 2nd shard; the
    pairs and images are those of one process (one thread each, so the arithmetic matches)."""
    one, two = tmp_path / "one", tmp_path / "two"
    for run in (one, two):
        shutil.copytree(coarse_run, run, ignore=shutil.ignore_patterns("coarse"))
    stage("01_build_coarse.py", one, env={**os.environ, "OMP_NUM_THREADS": "1"})
    torchrun("01_build_coarse.py", two, env={"OMP_NUM_THREADS": "1"})
    rows = lambda run: [{**r, "w": {**r["w"], "model": None}, "l": {**r["l"], "model": None}}
                        for r in U.read_jsonl(run / "coarse" / "pairs.jsonl")]
    assert rows(two) == rows(one) and len(rows(one)) == 30
    pngs = sorted(p.name for p in (one / "coarse" / "images").glob("*.png"))
    assert pngs == sorted(p.name for p in (two / "coarse" / "images").glob("*.png")) and pngs
    assert all((U.load_png(one / "coarse" / "images" / f) == U.load_png(two / "coarse" / "images" / f)).all()
               for f in pngs)
    assert json.loads((two / "coarse" / "config.json").read_text())["processes"] == 2


def test_coarse_says_which_stage_to_run(tmp_path):
    r = stage("01_build_coarse.py", tmp_path, check=False)
    assert r.returncode != 0 and "00_toy_world.py" in r.stderr


def test_coarse_names_the_prompt_stage_and_a_missing_safe_set(coarse_run, tmp_path):
    model = str(coarse_run / "world" / "model")
    r = stage("01_build_coarse.py", tmp_path / "a", "--models", model, check=False)
    assert r.returncode != 0 and "Traceback" not in r.stderr and "00_curate_prompts.py" in r.stderr
    assert f"{tmp_path / 'a' / 'prompts' / 'harmful.jsonl'}, {tmp_path / 'a' / 'prompts' / 'safe.jsonl'}" in r.stderr
    r = stage("01_build_coarse.py", tmp_path / "b", "--models", model, "--harmful-prompts",
              str(coarse_run / "prompts" / "harmful.jsonl"), "--safe-prompts", str(tmp_path / "coco.csv"), check=False)
    assert r.returncode == 1 and f"error: {tmp_path / 'coco.csv'}: file not found" in r.stderr
    assert not (tmp_path / "b").exists()  # nothing written


def unjudged_copy(coarse_run, tmp_path):
    """The run with stage 1's images but no judged pairs and no stage-1 settings."""
    run = tmp_path / "run"
    shutil.copytree(coarse_run, run, ignore=shutil.ignore_patterns("shards", "pairs.jsonl", "config.json", "scm"))
    return run


def test_openai_judge_needs_a_key(coarse_run, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    r = stage("01_build_coarse.py", unjudged_copy(coarse_run, tmp_path), "--judge", "openai", check=False, env=env)
    assert r.returncode == 1 and "OPENAI_API_KEY" in r.stderr and "Traceback" not in r.stderr


def test_unreachable_judge_is_one_message(coarse_run, tmp_path):
    env = {**os.environ, "OPENAI_API_KEY": "sk-test"}
    r = stage("01_build_coarse.py", unjudged_copy(coarse_run, tmp_path), "--judge", "openai", "--judge-base-url",
              "http://127.0.0.1:9/v1", "--judge-timeout", "1", "--judge-retries", "0", check=False, env=env)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "error: OpenAI judge http://127.0.0.1:9/v1/chat/completions: gave up after 0 retries" in r.stderr


def test_coarse_refuses_a_folder_with_other_settings(coarse_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(coarse_run, run, ignore=shutil.ignore_patterns("scm"))
    r = stage("01_build_coarse.py", run, "--n-pairs", "40", check=False)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert f"{run / 'coarse'} holds a run with other settings (n_pairs: 30 -> 40)" in r.stderr
    assert len(U.read_jsonl(run / "coarse" / "pairs.jsonl")) == 30  # nothing overwritten


def test_sd15_stage1_names_the_inputs_to_pass(tmp_path):
    r = stage("01_build_coarse.py", tmp_path, "--preset", "sd15", check=False)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "--preset sd15: pass --models" in r.stderr and "world/model" in r.stderr


@pytest.fixture(scope="module")
def scm_run(coarse_run):
    stage("02_train_scm.py", coarse_run, env={**os.environ, "OMP_NUM_THREADS": "2"})  # γ = 0 beside γ
    return coarse_run


def test_scm_outputs_and_load_scm(scm_run):
    s = scm_run / "scm"
    m = json.loads((s / "metrics.json").read_text())
    for key in ("pair_accuracy", "sign_accuracy", "safe_cost_std", "safe_cost_std_no_anchor", "seconds"):
        assert key in m and m[key] == m[key]  # present and not NaN
    model = S.load_scm(s)
    pairs = U.read_jsonl(scm_run / "coarse" / "pairs.jsonl")
    imgs = [U.load_png(scm_run / "coarse" / pairs[0][k]["path"]) for k in "wl"]
    cost = model.cost(imgs)
    assert cost.shape == (2,) and torch.isfinite(cost).all()
    assert model.mu_safe == json.loads((s / "scm_config.json").read_text())["mu_safe"]
    assert (s / "no_anchor" / "scm.safetensors").exists()


def test_scm_resume_is_exact(scm_run, tmp_path):
    """Killed before its first checkpoint (at 3), then after it: the resumed run ends at the
    uninterrupted run's weights, and its log holds each step once."""
    run = tmp_path / "run"
    shutil.copytree(scm_run, run, ignore=shutil.ignore_patterns("scm"))
    for kill in (2, 4):
        r = stage("02_train_scm.py", run, "--stop-after", str(kill), "--no-no-anchor-baseline", check=False)
        assert r.returncode != 0 and f"stopped after {kill}" in r.stderr  # killed ...
    stage("02_train_scm.py", run, "--no-no-anchor-baseline")  # ... resumed to 6 steps
    from safetensors.torch import load_file
    a, b = load_file(scm_run / "scm" / "scm.safetensors"), load_file(run / "scm" / "scm.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert [r["step"] for r in U.read_jsonl(run / "scm" / "log.jsonl")] == [0]  # tiny logs step 0 only


def test_scm_ddp_two_processes_match_one(scm_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(scm_run, run, ignore=shutil.ignore_patterns("scm"))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        f"--master_port={free_port()}", "02_train_scm.py", "--tiny", "--run-dir", str(run), "--no-no-anchor-baseline"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    from safetensors.torch import load_file
    a, b = load_file(scm_run / "scm" / "scm.safetensors"), load_file(run / "scm" / "scm.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)


def test_scm_no_anchor_baseline_in_parallel_matches_sequential(scm_run, tmp_path):
    """The fixture trained its γ = 0 model in a second process beside the γ model (one thread
    each, --threads 1); trained after it in one process that may use two threads, both models
    and every figure are the same: --threads, not the cores, sets how each model computes."""
    run = tmp_path / "run"
    shutil.copytree(scm_run, run, ignore=shutil.ignore_patterns("scm"))
    stage("02_train_scm.py", run, "--no-baseline-in-parallel", env={**os.environ, "OMP_NUM_THREADS": "2"})
    from safetensors.torch import load_file
    for sub in ("", "no_anchor"):
        a, b = (load_file(r / "scm" / sub / "scm.safetensors") for r in (scm_run, run))
        assert all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = (json.loads((r / "scm" / "metrics.json").read_text()) for r in (scm_run, run))
    assert {k: v for k, v in ma.items() if k != "seconds"} == {k: v for k, v in mb.items() if k != "seconds"}
    assert ma["safe_cost_std_no_anchor"] > 0


@pytest.mark.parametrize("corrupt, message", [
    (lambda row: row.__setitem__("w", {**row["w"], "sign": 0}), "unknown sign 0"),
    (lambda row: row.__setitem__("l", {**row["l"], "path": "images/nope.png"}), "missing image"),
    (lambda row: row.pop("w"), "missing 'w'"),
])
def test_scm_bad_rows_named_or_skipped(scm_run, tmp_path, corrupt, message):
    run = tmp_path / "run"
    shutil.copytree(scm_run, run, ignore=shutil.ignore_patterns("scm"))
    pairs_file = run / "coarse" / "pairs.jsonl"
    rows = U.read_jsonl(pairs_file)
    corrupt(rows[4])
    U.write_jsonl(pairs_file, rows)
    r = stage("02_train_scm.py", run, "--no-no-anchor-baseline", check=False)
    assert r.returncode != 0 and "pairs.jsonl:5: bad pair row" in r.stderr and message in r.stderr
    r = stage("02_train_scm.py", run, "--no-no-anchor-baseline", "--skip-bad")
    assert json.loads((run / "scm" / "metrics.json").read_text())["bad_rows_skipped"] == 1
    assert len(U.read_jsonl(pairs_file)) == len(rows)  # the input file is never rewritten


def test_malformed_pairs_line_is_named(scm_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(scm_run, run, ignore=shutil.ignore_patterns("scm"))
    with open(run / "coarse" / "pairs.jsonl", "a") as f:
        f.write("{not json\n")
    r = stage("02_train_scm.py", run, check=False)
    assert r.returncode != 0 and "pairs.jsonl:31: malformed JSON" in r.stderr


def fit_scm(model, harm: list, safe: list, steps: int) -> None:
    """Eq. 1 on one batch of harmful and safe images (AdamW, 5e-4), μ_safe held at −1."""
    opt = torch.optim.AdamW(model.parameters(), 5e-4)
    x = torch.from_numpy(np.stack(harm + safe))
    n = len(harm)
    for _ in range(steps):
        c = model(x)
        loss = C.scm_loss(c[:n], c[n:], torch.ones(n), -torch.ones(len(safe)), mu_safe=-1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_scm_module_ranks_and_anchors_on_synthetic_data():
    """A few hundred steps of Eq. 1 on drawn images: harmful above safe, safe near μ."""
    import random
    torch.manual_seed(0)
    model = S.SafetyCostModel("toy-ViT-tiny", hidden=32)
    rng = random.Random(0)
    harm = [W.render(W.random_scene(rng, "harmful")) for _ in range(32)]
    safe = [W.render(W.random_scene(rng, "benign")) for _ in range(32)]
    # 2e-3 separated the classes on a Zen 4 CPU but diverged for a while on a Zen 3 one (other
    # kernels, other rounding); at 5e-4 both sides are >= 97% right from step 40 on either
    fit_scm(model, harm, safe, steps=60)
    c = model.cost(harm + safe)
    assert (c[:32] > 0).float().mean() > 0.9 and (c[32:] < 0).float().mean() > 0.9


def test_mu_safe_pool_is_a_seeded_draw_over_every_safe_image(scm_run):
    """Sec. 3.1's verified-safe pool: --mu-pool images drawn (by --seed) from all safe training
    images, not the first by name; stage 2 records the pool it used."""
    S2 = module("02_train_scm.py")
    coarse = scm_run / "coarse"
    pairs, _ = S2.load_pairs(coarse / "pairs.jsonl", False)
    safe = sorted({p[s]["file"] for p in pairs if p.get("split", "train") == "train"
                   for s in "wl" if p[s]["sign"] == -1})
    assert len(safe) > 16
    draws = [S2.split_pairs(coarse / "pairs.jsonl", pairs, 16, seed)[2] for seed in (0, 0, 1)]
    assert draws[0] == draws[1] != draws[2]
    assert all(len(d) == 16 and set(d) <= set(safe) for d in draws)
    assert draws[0] != safe[:16]
    assert S2.split_pairs(coarse / "pairs.jsonl", pairs, 10**6, 0)[2] == safe
    recorded = json.loads((scm_run / "scm" / "mu_safe_pool.json").read_text())
    assert recorded == [str(f.relative_to(coarse)) for f in draws[0]]


def test_vertical_flips_follow_the_flag():
    """The toy flips both ways; sd15's preset horizontally only, from the same random draws."""
    S2 = module("02_train_scm.py")
    pairs = [{"w": {}, "l": {}}] * 4
    for preset, vertical in (("toy", True), ("sd15", False)):
        args = S2.parse(["--preset", preset, "--run", "x"])
        assert args.vertical_flip is vertical
        args.batch = 64
        _, flips = S2.draw_batch(args, 3, pairs, U.Dist(0, 1, 0, torch.device("cpu")))
        assert 0.3 < flips[0].float().mean() < 0.7
        assert bool(flips[1].any()) == vertical


def test_cost_span_fixes_the_unit_and_keeps_signs_and_ranks():
    """set_cost_span: afterwards harmful training images average --cost-span above μ_safe, and
    every cost is the old one times the same positive factor (signs and rankings kept)."""
    import random
    from types import SimpleNamespace
    S2 = module("02_train_scm.py")
    torch.manual_seed(0)
    model = S.SafetyCostModel("toy-ViT-tiny", hidden=32)
    rng = random.Random(0)
    images = {f"h{i}": W.render(W.random_scene(rng, "harmful")) for i in range(12)}
    images.update({f"s{i}": W.render(W.random_scene(rng, "benign")) for i in range(12)})
    fit_scm(model, [images[f"h{i}"] for i in range(12)], [images[f"s{i}"] for i in range(12)], steps=40)
    model.eval()
    bank = SimpleNamespace(batch=lambda files: torch.from_numpy(np.stack([images[f] for f in files])))
    pairs = [{"w": {"file": f"h{i}", "sign": 1}, "l": {"file": f"s{i}", "sign": -1}} for i in range(12)]
    pool = [f"s{i}" for i in range(12)]
    before = S2.costs(model, bank, list(images), "cpu")
    mu = S2.safe_anchor(model, bank, pool, "cpu")
    args = SimpleNamespace(cost_span=8.0, seed=0)
    mu2, k = S2.set_cost_span(model, bank, pairs, pool, mu, args, "cpu")
    after = S2.costs(model, bank, list(images), "cpu")
    assert k > 0 and mu2 == pytest.approx(k * mu)
    assert after.numpy() == pytest.approx(k * before.numpy(), rel=1e-4, abs=1e-5)
    assert float(after[:12].mean()) - mu2 == pytest.approx(8.0, rel=1e-4)
    assert S2.safe_anchor(model, bank, pool, "cpu") == pytest.approx(mu2, rel=1e-4, abs=1e-5)
    with torch.no_grad():  # an SCM that ranks harmful below safe has no unit to fix
        model.head[-1].weight.neg_()
        model.head[-1].bias.neg_()
    with pytest.raises(U.DataError, match="has not learnt to rank"):
        S2.set_cost_span(model, bank, pairs, pool, S2.safe_anchor(model, bank, pool, "cpu"), args, "cpu")
