"""Stages 3-4 on the smallest toy config: LibraAlign-HF pairs (inpainting, judge filter, dual
annotation, resume) and T2I-SPO training (one concatenated forward, DFM, exact resume, DDP
with two processes equal to one, LoRA that stock diffusers loads, bad input)."""
import argparse
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import free_port, module, stage, tiny_world

from lib import data as D
from lib import models as M
from lib import scorers as S
from lib import toyworld as W
from lib import utils as U

ROOT = Path(__file__).resolve().parents[1]


SPO = module("04_train_spo.py")
HF = module("03_build_hf.py")


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    tiny_world(run, "--eval-per-set", "2")
    stage("00_curate_prompts.py", run)
    stage("01_build_coarse.py", run)
    stage("02_train_scm.py", run, "--no-no-anchor-baseline")
    stage("03_build_hf.py", run)
    return run


def copy_run(src, dst, *skip):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*skip))
    return dst


# --------------------------------------------------------------------------------------
# Stage 3
# --------------------------------------------------------------------------------------

class Verdicts:
    """A judge answering from a list: None (unusable), or (winner, severity a, severity b)."""

    def __init__(self, answers):
        self.answers = iter(answers)

    def compare(self, a, b):
        v = next(self.answers)
        return v and {"winner": v[0], "severity": list(v[1:])}


@pytest.mark.parametrize("keep, kept, dropped", [
    ("harm-free", ["hf-1", "hf-5", "hf-6"],
     {"skipped_no_answer": 1, "dropped_not_safer": 1, "dropped_harm_left": 1, "dropped_no_harm": 1}),
    ("safer", ["hf-1", "hf-2", "hf-3", "hf-5", "hf-6"],
     {"skipped_no_answer": 1, "dropped_not_safer": 1})])
def test_judge_filter_keeps_pairs_by_sec_3_2s_safe_counterpart(keep, kept, dropped):
    answers = [None, (0, 2, 0), (0, 3, 1), (0, 0, 0), (1, 1, 2), (0, 1, 0)]
    chunk = [{"id": f"hf-{i}", "kind": "harmful-safe", "a": {}, "b": {}} for i in range(6)]
    chunk.append({"id": "hf-6", "kind": "safe-safe", "a": {}, "b": {}})  # never judged
    images = {(p["id"], s): None for p in chunk for s in "ab"}
    out, counts = HF.judge_filter(argparse.Namespace(keep=keep), chunk, images, Verdicts(answers))
    assert [p["id"] for p in out] == kept and dict(counts) == dropped
    assert (out[0]["a"]["severity"], out[0]["b"]["severity"]) == (2, 0)


@pytest.mark.parametrize("source", ["world", "samples"])
def test_safe_safe_pairs_set_a_sample_beside_the_worlds_image_or_a_second_sample(source, tmp_path):
    import random
    safe = ["a large blue square, white background", "a small red circle, sky background, with stripes"]
    U.write_jsonl(tmp_path / "safe.jsonl", [{"prompt": x} for x in safe])
    args = argparse.Namespace(n_safe_safe=3, seed=1, safe_guidances=[1.0, 2.0, 4.0, 7.0], safe_source=source)
    pairs = HF.safe_safe_pairs(args, [str(tmp_path / "safe.jsonl")], random.Random(0))
    assert [p["prompt"] for p in pairs][2] == [p["prompt"] for p in pairs][0] and {p["prompt"] for p in pairs} == set(safe)
    for i, p in enumerate(pairs):
        a, b = p["a"], p["b"]
        assert (a["source"], a["seed"], b["seed"]) == ("t2i", 1_500_000 + 2 * i, 1_500_001 + 2 * i)
        assert p["kind"] == "safe-safe" and a["prompt"] == b["prompt"] == p["prompt"] and a["guidance"] in args.safe_guidances
        if source == "world":
            assert b["source"] == "world" and "guidance" not in b
        else:
            assert b["source"] == "t2i" and b["guidance"] in args.safe_guidances and b["guidance"] != a["guidance"]
    # the same rng draws the same prompts and side-a guidances under either source
    again = HF.safe_safe_pairs(argparse.Namespace(**{**vars(args), "safe_source": "samples"}),
                               [str(tmp_path / "safe.jsonl")], random.Random(0))
    assert [(p["prompt"], p["a"]) for p in again] == [(p["prompt"], p["a"]) for p in pairs]


def test_the_worlds_image_of_a_prompt_outside_its_grammar_is_refused(tmp_path):
    import random
    U.write_jsonl(tmp_path / "safe.jsonl", [{"prompt": "a photo of a cat on a sofa"}])
    args = argparse.Namespace(n_safe_safe=1, seed=0, safe_guidances=[1.0, 2.0], safe_source="world")
    with pytest.raises(U.DataError, match="--safe-source world: the toy world has no image of 'a photo of a cat"):
        HF.safe_safe_pairs(args, [str(tmp_path / "safe.jsonl")], random.Random(0))


def test_hf_pairs_are_filtered_and_dually_annotated(hf_run):
    hf = hf_run / "hf"
    pairs = U.read_jsonl(hf / "hf_pairs.jsonl")
    m = json.loads((hf / "metrics.json").read_text())
    assert json.loads((hf / "config.json").read_text())["keep"] == "safer"  # --tiny's
    assert m["n_pairs"] == len(pairs) and m["n_harmful_safe"] + m["dropped_not_safer"] == 8
    assert m["dropped_harm_left"] == m["dropped_no_harm"] == m["skipped_no_answer"] == 0
    assert m["n_harmful_safe"] >= 2 and m["n_safe_safe"] == 6
    assert json.loads((hf / "config.json").read_text())["sample_dtype"] == "torch.float32"  # any CPU
    scm = S.load_scm(hf_run / "scm")
    for p in pairs:
        a, b = (U.load_png(hf / p[s]["path"]) for s in "ab")
        for side, img in (("a", a), ("b", b)):  # r and C are the toy quality and the SCM cost
            assert p[side]["quality"] == pytest.approx(W.toy_quality(img, p["prompt"]), abs=1e-9)
            assert p[side]["cost"] == pytest.approx(float(scm.cost([img])[0]), abs=1e-4)
        if p["kind"] == "harmful-safe":
            assert (p["a"]["role"], p["b"]["role"]) == ("harmful", "safe")
            assert W.which_is_more_harmful(a, b) == 0  # kept when the judge finds b safer
            assert p["b"]["prompt"] != p["prompt"] and p["prompt"].startswith(p["b"]["prompt"])
        else:  # the toy's Pick-a-Pic: the model's sample beside the world's own image of the prompt
            assert (p["a"]["source"], p["b"]["source"]) == ("t2i", "world") and "guidance" not in p["b"]
            assert np.array_equal(b, W.reference_render(p["prompt"], p["b"]["seed"]))


def test_inpainting_starts_from_the_harmful_image(hf_run):
    """Safety-aware inpainting runs img2img initialised from each harmful image, guided by its
    safe rewrite, at the configured strength, and is reproducible by seed. (The tiny world's
    VAE is too rough to test layout preservation on pixels; the toy preset's figures do.)"""
    import random
    from diffusers import AutoPipelineForImage2Image
    HF = module("03_build_hf.py")
    i2i = AutoPipelineForImage2Image.from_pipe(M.load_pipeline(hf_run / "world" / "model"))
    calls = []

    class Spy:  # the real pipeline, with its arguments recorded
        def __call__(self, **kw):
            calls.append(kw)
            return i2i(**kw)

    rng = random.Random(0)
    scenes = [W.random_scene(rng, "harmful") for _ in range(3)]
    init = [W.render(s) for s in scenes]
    specs = [{"prompt": W.scene_to_prompt(s, with_harm=False), "seed": i, "strength": 0.3, "guidance": 4.0}
             for i, s in enumerate(scenes)]
    out = HF.safety_aware_inpainting(Spy(), init, specs, steps=10, batch_size=2)
    assert [len(c["prompt"]) for c in calls] == [2, 1]  # batched
    assert [p for c in calls for p in c["prompt"]] == [s["prompt"] for s in specs]
    assert all(np.array_equal(np.asarray(im), x) for im, x in zip([im for c in calls for im in c["image"]], init))
    assert all(c["strength"] == 0.3 for c in calls)
    assert len(out) == 3 and out[0].shape == (32, 32, 3) and out[0].dtype == np.uint8
    again = HF.safety_aware_inpainting(i2i, init, specs, steps=10)
    # per-image seeds: batching does not matter, up to the rounding of batch-size-dependent
    # kernels (exact on a Zen 4 CPU; on a Zen 3 one a few pixels move by one level)
    diff = np.abs(np.stack(out).astype(int) - np.stack(again))
    assert diff.max() <= 1 and diff.mean() < 0.01  # another seed moves pixels by tens of levels


def test_hf_resumes_only_missing_chunks(hf_run, tmp_path):
    run = copy_run(hf_run, tmp_path / "run")
    hf = run / "hf"
    before = U.read_jsonl(hf / "hf_pairs.jsonl")
    kept = {f: f.stat().st_mtime_ns for f in (hf / "shards").glob("*.json") if f.name != "pairs-00001.json"}
    (hf / "shards" / "pairs-00001.json").unlink()
    stage("03_build_hf.py", run)
    assert U.read_jsonl(hf / "hf_pairs.jsonl") == before
    assert {f: f.stat().st_mtime_ns for f in kept} == kept


def test_hf_two_processes_build_what_one_builds(hf_run, tmp_path, torchrun):
    """Under torchrun each process builds every 2nd chunk and rank 0 assembles: the same pairs,
    annotations and images as one process at the same thread count."""
    one, two = copy_run(hf_run, tmp_path / "one", "hf"), copy_run(hf_run, tmp_path / "two", "hf")
    stage("03_build_hf.py", one, env={**os.environ, "OMP_NUM_THREADS": "1"})
    torchrun("03_build_hf.py", two, env={"OMP_NUM_THREADS": "1"})
    pairs = U.read_jsonl(one / "hf" / "hf_pairs.jsonl")
    assert U.read_jsonl(two / "hf" / "hf_pairs.jsonl") == pairs and len(pairs) > 4
    assert all(np.array_equal(U.load_png(one / "hf" / p[s]["path"]), U.load_png(two / "hf" / p[s]["path"]))
               for p in pairs for s in "ab")
    m1, m2 = (json.loads((r / "hf" / "metrics.json").read_text()) for r in (one, two))
    assert {k: v for k, v in m1.items() if k != "seconds"} == {k: v for k, v in m2.items() if k != "seconds"}


def test_hf_says_which_stage_to_run(tmp_path):
    r = stage("03_build_hf.py", tmp_path, check=False)
    assert r.returncode != 0 and "02_train_scm.py" in r.stderr


# --------------------------------------------------------------------------------------
# Stage 4: pieces
# --------------------------------------------------------------------------------------

def test_preference_pairs_spo_and_safety_only():
    pairs = [{"id": "p0", "prompt": "x", "kind": "safe-safe",
              "a": {"quality": 22.0, "cost": 1.0}, "b": {"quality": 21.0, "cost": -2.0}}]
    spo, _ = SPO.preference_pairs(pairs, "spo", lam=0.15, margin=0.0)     # R: 21.85 vs 21.30
    assert spo[0]["w"]["quality"] == 22.0 and spo[0]["reward_w"] == pytest.approx(21.85)
    big, _ = SPO.preference_pairs(pairs, "spo", lam=1.0, margin=0.0)      # R: 21 vs 23
    safety, _ = SPO.preference_pairs(pairs, "safety", lam=0.15, margin=0.0)  # R = −C: −1 vs 2
    assert big[0]["w"]["cost"] == safety[0]["w"]["cost"] == -2.0
    assert safety[0]["reward_w"] == 2.0 and safety[0]["reward_l"] == -1.0


# --------------------------------------------------------------------------------------
# Stage 4: end to end
# --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def spo_run(hf_run):
    stage("04_train_spo.py", hf_run)
    return hf_run


def unet_weights(run, name):
    from safetensors.torch import load_file
    return load_file(run / name / "model" / "unet" / "diffusion_pytorch_model.safetensors")


def test_spo_outputs_a_stock_pipeline_and_metrics(spo_run):
    out = spo_run / "spo"
    m = json.loads((out / "metrics.json").read_text())
    for key in ("final_loss", "implicit_accuracy", "pairs_dropped", "dfm_flagged", "seconds"):
        assert key in m and m[key] == m[key]
    assert m["dfm_flagged"] > 0 and sum(m["aug_wins"].values()) == m["dfm_flagged"]
    assert sum(m["dfm_flagged_by_kind"].values()) == m["dfm_flagged"] and 0 < m["dfm_pairs_flagged"] <= m["n_pairs"]
    rows = U.read_jsonl(out / "log.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 9))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["objective"] == "spo" and cfg["lam"] == 0.15 and cfg["dfm"] == "on"
    pipe = M.load_pipeline(out / "model")
    img = M.generate(pipe, ["a small red circle, sky background"], [0], 2, 4.0)[0]
    assert img.shape == (32, 32, 3)
    base, new = unet_weights(spo_run, "world"), unet_weights(spo_run, "spo")
    assert any(not torch.equal(base[k], new[k]) for k in base)  # trained, and the reference was not


def assert_same_training(x: Path, y: Path):
    """Two runs that should compute the same steps: the same loss and pre-clipping gradient
    norm at every step (Adam and clipping hide a wrongly scaled gradient from the weights,
    not from the norm), and weights equal up to float reordering: their difference within 2% of
    how far training moved them, both as norms over all weights (a weight whose gradient is
    float noise moves by ±lr per Adam step in either run, so single weights differ by more)."""
    rx, ry = U.read_jsonl(x / "log.jsonl"), U.read_jsonl(y / "log.jsonl")
    for a, b in zip(rx, ry):
        assert a["step"] == b["step"] and a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    base = unet_weights(x.parent, "world")
    wx, wy = unet_weights(x.parent, x.name), unet_weights(y.parent, y.name)
    moved = sum(((wx[k] - base[k]).double() ** 2).sum() for k in base).sqrt().item()
    apart = sum(((wx[k] - wy[k]).double() ** 2).sum() for k in base).sqrt().item()
    assert moved > 0 and apart < 0.02 * moved


def test_spo_rerun_of_a_finished_run_changes_nothing(spo_run):
    """A finished run is left as it is: no re-save (stage 5's image cache keys on the model's
    files), the first run's metrics kept."""
    out = spo_run / "spo"
    before = {f: f.stat().st_mtime_ns for f in (out / "model").rglob("*") if f.is_file()}
    metrics = (out / "metrics.json").read_text()
    r = stage("04_train_spo.py", spo_run)
    assert "is finished (step 8 of 8): nothing to do" in r.stdout
    assert {f: f.stat().st_mtime_ns for f in (out / "model").rglob("*") if f.is_file()} == before
    assert (out / "metrics.json").read_text() == metrics


def test_spo_resume_is_exact(spo_run, tmp_path):
    run = copy_run(spo_run, tmp_path / "run", "spo")
    r = stage("04_train_spo.py", run, "--stop-after", "4", check=False)  # killed after a checkpoint
    assert r.returncode != 0 and "stopped after 4" in r.stderr
    stage("04_train_spo.py", run)
    a, b = unet_weights(spo_run, "spo"), unet_weights(run, "spo")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in U.read_jsonl(run / "spo" / "log.jsonl")] == list(range(1, 9))


def test_spo_computes_the_same_on_any_core_count(spo_run, tmp_path):
    """--threads (the toy's 1) fixes the threads a step computes with: under OMP_NUM_THREADS=2
    the run ends at the weights of the suite's one thread, to the bit. With --threads 2 the
    backward's sums split over two threads and the weights differ, as another machine's cores
    would make them."""
    run = copy_run(spo_run, tmp_path / "run", "spo")
    two = {**os.environ, "OMP_NUM_THREADS": "2"}
    stage("04_train_spo.py", run, env=two)
    a, b = unet_weights(spo_run, "spo"), unet_weights(run, "spo")
    assert all(torch.equal(a[k], b[k]) for k in a)
    stage("04_train_spo.py", run, "--threads", "2", "--name", "spo_threads2", env=two)
    c = unet_weights(run, "spo_threads2")
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_spo_ddp_two_processes_match_one(spo_run, tmp_path):
    run = copy_run(spo_run, tmp_path / "run", "spo")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        f"--master_port={free_port()}", "04_train_spo.py", "--tiny", "--run-dir", str(run)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_training(spo_run / "spo", run / "spo")
    m1, m2 = (json.loads((x / "spo" / "metrics.json").read_text()) for x in (spo_run, run))
    assert m2["world_size"] == 2 and m1["dfm_flagged"] == m2["dfm_flagged"] and m1["aug_wins"] == m2["aug_wins"]
    assert m1["dfm_flagged_by_kind"] == m2["dfm_flagged_by_kind"]
    for a, b in zip(*(U.read_jsonl(x / "spo" / "log.jsonl") for x in (spo_run, run))):  # copies' losses: summed over ranks
        assert a.get("dfm_copy_loss", -1.0) == pytest.approx(b.get("dfm_copy_loss", -1.0), rel=1e-4)


def test_spo_batch_that_processes_do_not_divide_matches_one_process(spo_run, tmp_path, torchrun):
    """The tiny batch of 4 over 3 processes: process 0 takes positions 0 and 3 of every batch,
    1 and 2 one each; gradients weighted 1/batch and summed over processes give the one-process
    step up to float reordering, DFM included."""
    run = copy_run(spo_run, tmp_path / "run", "spo")
    torchrun("04_train_spo.py", run, nproc=3)
    assert_same_training(spo_run / "spo", run / "spo")
    m1, m2 = (json.loads((x / "spo" / "metrics.json").read_text()) for x in (spo_run, run))
    assert m2["world_size"] == 3 and m1["dfm_flagged"] == m2["dfm_flagged"] and m1["aug_wins"] == m2["aug_wins"]
    assert json.loads((run / "spo" / "config.json").read_text())["grad_accum"] == 1


def test_spo_more_processes_than_pairs_in_a_batch_stop_once_from_rank_0(hf_run, tmp_path):
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=6",
                        f"--master_port={free_port()}", "04_train_spo.py", "--tiny", "--run-dir", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0
    message = "--batch 4 is smaller than the 6 processes"
    assert (r.stdout + r.stderr).count(message) == 1 and "Pass --batch 6 or more" in r.stderr
    assert not (tmp_path / "spo").exists()  # stopped before any work


def test_spo_multi_node_launch_matches_one_process(spo_run, tmp_path):
    """Two "nodes" of one process each, started as a cluster starts them — one
    `torchrun --nnodes=2 --node_rank=N --master_addr --master_port` per node — here both on
    127.0.0.1 with gloo, sharing the run folder (as nodes share a filesystem): the script runs
    unchanged and computes what one process computes."""
    run = copy_run(spo_run, tmp_path / "run", "spo")
    port = free_port()
    procs = []
    for node in (0, 1):
        log = open(tmp_path / f"node{node}.log", "w")
        procs.append((subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", f"--node_rank={node}",
             "--master_addr=127.0.0.1", f"--master_port={port}", "04_train_spo.py", "--tiny", "--run-dir", str(run)],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT), log))
    try:
        codes = [p.wait(timeout=240) for p, _ in procs]
    finally:
        for p, log in procs:
            if p.poll() is None:
                p.kill()
            log.close()
    assert codes == [0, 0], "\n".join((tmp_path / f"node{n}.log").read_text()[-2000:] for n in (0, 1))
    assert_same_training(spo_run / "spo", run / "spo")
    m1, m2 = (json.loads((x / "spo" / "metrics.json").read_text()) for x in (spo_run, run))
    assert m2["world_size"] == 2 and m1["dfm_flagged"] == m2["dfm_flagged"] and m1["aug_wins"] == m2["aug_wins"]


def test_gradient_accumulation_matches_one_batch(spo_run, tmp_path):
    run = copy_run(spo_run, tmp_path / "run", "spo")
    stage("04_train_spo.py", run, "--micro-batch", "1", "--dfm", "off", "--name", "acc")
    stage("04_train_spo.py", run, "--dfm", "off", "--name", "full")
    assert_same_training(run / "acc", run / "full")


def test_dpop_reaches_the_loss(spo_run, tmp_path):
    # DPO-Positive's winner term (--dpop) is zero while the policy is the reference (step 1's
    # loss, taken before its update, is log 2 either way), then charges any winner whose error
    # rose: at λ_p = 1000 the logged losses part from Eq. 5's
    run = copy_run(spo_run, tmp_path / "run", "spo")
    stage("04_train_spo.py", run, "--dfm", "off", "--dpop", "0", "--name", "plain")
    stage("04_train_spo.py", run, "--dfm", "off", "--dpop", "1000", "--name", "dpop")
    plain, dpop = U.read_jsonl(run / "plain" / "log.jsonl"), U.read_jsonl(run / "dpop" / "log.jsonl")
    assert plain[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) == dpop[0]["loss"]
    assert max(b["loss"] - a["loss"] for a, b in zip(plain[1:], dpop[1:])) > 0.01
    assert U.read_json(run / "dpop" / "config.json")["dpop"] == 1000.0


def test_scale_lr_is_the_rate_times_the_global_batch(spo_run, tmp_path):
    # Diffusion-DPO's --scale_lr: 5e-5 × (2 per process × 1 accumulation × 2 processes) = 5e-5 × --batch 4
    run = copy_run(spo_run, tmp_path / "run", "spo")
    stage("04_train_spo.py", run, "--dfm", "off", "--lr", "5e-5", "--scale-lr", "--name", "scaled")
    stage("04_train_spo.py", run, "--dfm", "off", "--lr", "2e-4", "--name", "times4")
    assert U.read_jsonl(run / "scaled" / "log.jsonl")[-1]["lr"] == pytest.approx(2e-4)
    assert_same_training(run / "scaled", run / "times4")


def test_safety_objective_and_lora_load_with_stock_diffusers(spo_run, tmp_path):
    run = copy_run(spo_run, tmp_path / "run", "spo")
    stage("04_train_spo.py", run, "--objective", "safety", "--lora-rank", "2")
    out = run / "safety"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["objective"] == "safety" and cfg["lam"] is None  # R = −C has no λ
    assert json.loads((out / "metrics.json").read_text())["lam"] is None
    assert (out / "lora" / "pytorch_lora_weights.safetensors").exists()
    base = M.load_pipeline(run / "world" / "model")
    base.load_lora_weights(out / "lora")  # stock diffusers, onto the base model
    fused = M.load_pipeline(out / "model")
    prompt = ["a large blue circle, sand background, extreme gore"]
    x, y = (M.generate(p, prompt, [0], 2, 4.0)[0].astype(int) for p in (base, fused))
    assert np.abs(x - y).max() <= 2


def test_spo_lora_dfm_compares_the_lora_factors(hf_run, tmp_path):
    """With --lora-rank, conv_out (--dfm-modules' default) is frozen: Eq. 11 compares the
    gradients of the LoRA factors of the decoder's last transformer block, which train, and DFM
    flags pairs and chooses their copies on them; a --dfm-lora-modules without an adapter stops
    the run naming the flag."""
    run = copy_run(hf_run, tmp_path / "run")
    r = stage("04_train_spo.py", run, "--lora-rank", "2", "--name", "lora")
    line = next(x for x in r.stdout.splitlines() if x.startswith("Eq. 11 compares"))
    names = line.split(" weights of ")[1].split(", ")
    block = "up_blocks.0.attentions.1.transformer_blocks.0."
    factor = (".lora_A.default", ".lora_B.default")
    assert len(names) == 16 and all(n.startswith(block) and n.endswith(factor) for n in names)
    m = json.loads((run / "lora" / "metrics.json").read_text())
    assert m["dfm_flagged"] > 0 and sum(m["aug_wins"].values()) == m["dfm_flagged"]
    r = stage("04_train_spo.py", run, "--lora-rank", "2", "--name", "lora_conv",
              "--dfm-lora-modules", "conv_out", check=False)
    assert r.returncode != 0
    assert "--dfm-lora-modules: ['conv_out'] carry no LoRA adapter" in r.stderr


# --------------------------------------------------------------------------------------
# Stage 4: bad input
# --------------------------------------------------------------------------------------

def test_pair_subset_is_the_same_for_every_seed_and_objective():
    pairs = [{"prompt": f"p{i}", "w": {"path": f"{i}a.png", "file": f"/runs/a/{i}a.png"},
              "l": {"path": f"{i}b.png", "file": f"/runs/a/{i}b.png"}} for i in range(10)]
    swapped = [{**p, "w": p["l"], "l": p["w"]} for p in reversed(pairs)]  # another order, winners swapped
    sub = D.pair_subset(pairs, 4)
    assert len(sub) == 4 and [p["prompt"] for p in sub] == [p["prompt"] for p in D.pair_subset(swapped, 4)]
    assert D.pair_subset(pairs, 0) is pairs and D.pair_subset(pairs, 10) is pairs
    as_read = [{"prompt": p["prompt"], "a": p["w"], "b": p["l"]} for p in pairs]  # before relabelling
    assert [p["prompt"] for p in D.pair_subset(as_read, 4)] == [p["prompt"] for p in sub]
    moved = [{**p, "w": {**p["w"], "file": "/elsewhere/" + p["w"]["path"]}} for p in pairs]  # another run folder
    assert [p["prompt"] for p in D.pair_subset(moved, 4)] == [p["prompt"] for p in sub]


def test_dfm_pool_and_pair_subset(hf_run, tmp_path):
    """make dfm's runs (systems/dfm_study.py train, stage 4's loop, its SPO subclassed): N pairs only, Eq. 11
    choosing within a smaller pool, and each DFM step's bookkeeping (which pairs, by kind; the
    flagged pairs' and their copies' losses); no model.json, so stage 5 does not evaluate it."""
    run = copy_run(hf_run, tmp_path / "run", "spo", "safety")
    stage("-m systems.dfm_study train", run, "--name", "dfm/pool1_seed0", "--pair-subset", "4",
          "--dfm-augmentations", "latent_noise_erase")
    out = run / "dfm" / "pool1_seed0"
    m = json.loads((out / "metrics.json").read_text())
    assert m["n_pairs"] == 4 and 0 < m["dfm_pairs_flagged"] <= 4
    assert m["aug_wins"]["latent_noise_erase"] == m["dfm_flagged"] > 0
    assert sum(m["dfm_flagged_by_kind"].values()) == m["dfm_flagged"]
    rows = U.read_jsonl(out / "log.jsonl")
    for r in rows:
        assert ("dfm_copy_loss" in r) == (r["dfm_hard"] > 0)
        if r["dfm_hard"]:
            assert np.isfinite(r["dfm_copy_loss"]) and np.isfinite(r["dfm_hard_loss"])
    assert json.loads((out / "config.json").read_text())["dfm_augmentations"] == ["latent_noise_erase"]
    assert not (out / "model.json").exists() and (out / "model" / "model_index.json").exists()


@pytest.mark.parametrize("corrupt, message", [
    (lambda row: row["b"].__setitem__("path", "images/nope.png"), "missing image"),
    (lambda row: row["a"].__setitem__("cost", float("nan")), "a.cost is nan"),
    (lambda row: row["a"].__setitem__("quality", "high"), "a.quality is 'high'"),
    (lambda row: row.pop("kind"), "missing 'kind'"),
    (lambda row: row["b"].pop("role"), "missing 'role'"),
])
def test_spo_bad_rows_are_named(hf_run, tmp_path, corrupt, message):
    run = copy_run(hf_run, tmp_path / "run", "spo", "safety")
    f = run / "hf" / "hf_pairs.jsonl"
    rows = U.read_jsonl(f)
    corrupt(rows[2])
    U.write_jsonl(f, rows)
    r = stage("04_train_spo.py", run, check=False)
    assert r.returncode == 1 and "hf_pairs.jsonl:3: bad pair row" in r.stderr and message in r.stderr
    assert "Traceback" not in r.stderr


def test_spo_malformed_pairs_line_is_one_message(hf_run, tmp_path):
    run = copy_run(hf_run, tmp_path / "run", "spo", "safety")
    n = len(U.read_jsonl(run / "hf" / "hf_pairs.jsonl"))
    with open(run / "hf" / "hf_pairs.jsonl", "a") as f:
        f.write('{"id": "cut off\n')
    r = stage("04_train_spo.py", run, check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"hf_pairs.jsonl:{n + 1}: malformed JSON" in r.stderr


def test_spo_refuses_a_folder_holding_other_settings(spo_run, tmp_path):
    """A LoRA run started where a full fine-tune ran stops, naming what differs, instead of
    loading the full fine-tune's optimizer state."""
    run = copy_run(spo_run, tmp_path / "run")
    ckpt = (run / "spo" / "ckpt" / "train_state.pt").read_bytes()
    r = stage("04_train_spo.py", run, "--lora-rank", "4", check=False)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert f"{run / 'spo'} holds a run with other settings (lora_rank: 0 -> 4)" in r.stderr
    assert "--name NAME" in r.stderr and (run / "spo" / "ckpt" / "train_state.pt").read_bytes() == ckpt


def test_spo_killed_before_its_first_checkpoint_logs_each_step_once(spo_run, tmp_path):
    run = copy_run(spo_run, tmp_path / "run", "spo")
    stage("04_train_spo.py", run, "--stop-after", "2", check=False)  # the first checkpoint is at 4
    assert [r["step"] for r in U.read_jsonl(run / "spo" / "log.jsonl")] == [1, 2]
    stage("04_train_spo.py", run)
    assert [r["step"] for r in U.read_jsonl(run / "spo" / "log.jsonl")] == list(range(1, 9))
    a, b = unet_weights(spo_run, "spo"), unet_weights(run, "spo")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_spo_empty_after_relabelling_is_an_error(hf_run, tmp_path):
    run = copy_run(hf_run, tmp_path / "run", "spo", "safety")
    r = stage("04_train_spo.py", run, "--margin", "1e9", check=False)
    assert r.returncode != 0 and "pairs left after relabelling" in r.stderr


def test_nan_loss_stops_and_keeps_the_last_checkpoint(hf_run, tmp_path):
    run = copy_run(hf_run, tmp_path / "run", "spo", "safety")
    from safetensors.torch import load_file, save_file
    stage("04_train_spo.py", run, "--stop-after", "4", check=False)
    ckpt = run / "spo" / "ckpt" / "train_state.pt"
    before = ckpt.read_bytes()
    for f in (run / "spo" / "cache").glob("*/latents-*.safetensors"):  # a corrupted latent cache
        save_file({"x": torch.full_like(load_file(f)["x"], float("nan"))}, f)
    r = stage("04_train_spo.py", run, check=False)
    assert r.returncode == 1 and "non-finite DPO loss at step 4" in r.stderr and str(ckpt) in r.stderr
    assert "Traceback" not in r.stderr
    assert ckpt.read_bytes() == before and not (run / "spo" / "model").exists()


def test_allreduce_gradients_sums_over_two_gloo_processes(tmp_path):
    script = tmp_path / "ar.py"
    script.write_text(
        "import sys, torch; sys.path.insert(0, %r)\n"
        "from lib import utils as U\n"
        "d = U.setup_distributed(device='cpu')\n"
        "ps = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(1))]\n"
        "ps[0].grad = torch.full((3,), d.rank + 1.0); ps[1].grad = torch.full((2, 2), 10.0 * (d.rank + 1))\n"
        "U.allreduce_gradients(ps, bucket_numel=4)\n"   # ps[2] has no grad on either rank: zeros
        "out = [ps[0].grad.tolist(), ps[1].grad.flatten().tolist(), ps[2].grad.tolist(),\n"
        "       U.all_gather_cat(torch.tensor([d.rank])).tolist()]\n"
        "open(%r + f'/{d.rank}.json', 'w').write(str(out))\n"
        "U.cleanup_distributed()\n" % (str(ROOT), str(tmp_path)))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        f"--master_port={free_port()}", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    for rank in (0, 1):
        assert (tmp_path / f"{rank}.json").read_text() == "[[3.0, 3.0, 3.0], [30.0, 30.0, 30.0, 30.0], [0.0], [0, 1]]"
