"""bench/bench_spo_step.py runs, compares the optimised and naive SPO steps on the same maths,
and ends with the `speedup` line (a smoke test: the figures themselves are in BENCHMARKS.md)."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_bench_spo_step_same_losses_and_speedup_line(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "bench/bench_spo_step.py", "--random-weights", "--batch", "4", "--steps", "4",
                        "--warmup", "1", "--rounds", "1", "--dfm", "on", "--dfm-tau", "10", "--device", "cpu",
                        "--json", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    last = r.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"speedup \d+\.\d\d", last), last
    res = json.loads(out.read_text())
    opt, naive, dfm = res["phases"]
    assert (opt["phase"], naive["phase"], dfm["phase"]) == ("optimised", "naive", "optimised+DFM")
    assert float(last.split()[1]) == round(opt["pairs_per_s"] / naive["pairs_per_s"], 2)
    # the two steps compute the same losses from the same weights, batch, noise and timesteps
    assert res["loss_agreement"] < 1e-4 and len(opt["losses"]) == len(naive["losses"]) == 5
    assert all(abs(x - 0.6931472) < 1e-5 for x in opt["losses"][0])  # step 0: policy = reference, log 2
    assert opt["cached"] == [8, 4] and 0 < naive["encode_share"] < 1
    # DFM (K = 3, τ = 10): queues are full from the third visit; hard pairs then get augmented
    # copies, which change that step's update and so only the losses after it
    assert dfm["dfm_hard_per_step"] > 0 and 0 < dfm["dfm_share"] < 1
    first_hard = 3  # steps 0-2 fill the queues; a copy first trains at step 2 at the earliest
    assert dfm["losses"][:first_hard] == opt["losses"][:first_hard]
    assert dfm["losses"][-1] != opt["losses"][-1]


def test_bench_unet_variants_prints_each_variant():
    r = subprocess.run([sys.executable, "bench/bench_unet_variants.py", "--run", "runs/absent", "--batch", "2",
                        "--reps", "1", "--warmup", "0"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = re.findall(r"^\s*(\w+): policy forward\+backward\s+([\d.]+) ms\s+reference forward\s+([\d.]+) ms$",
                      r.stdout, re.M)
    assert [name for name, *_ in rows] == ["fp32", "bf16", "channels_last"]
    assert all(float(a) > 0 and float(b) > 0 for _, a, b in rows)


def test_bench_toy_pipeline_adamw_sampling_and_steps_lines():
    r = subprocess.run([sys.executable, "bench/bench_toy_pipeline.py", "--run", "runs/absent", "--n", "4", "--batch", "2",
                        "--adam-steps", "2", "--reps", "1", "--rounds", "1", "--n-per-set", "2"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    adam = dict(re.findall(r"^\s*(.+?): +[\d.]+ ms/step \(rounds [\d., ]+\)   after 2 steps: (.+)$", r.stdout, re.M))
    assert list(adam) == ["loop (CPU default)", "foreach (utils.adamw)", "fused"]
    assert adam["foreach (utils.adamw)"] == "bit-identical to the loop"  # what U.adamw promises
    sampled = re.findall(r"^\s*torch\.(\w+): +[\d.]+ s for 4 images", r.stdout, re.M)
    assert sampled == ["float32", "bfloat16"]
    assert re.search(r"^  bf16 / fp32 time: [\d.]+; image by image, the toy judge agrees on [\d.]+%, mean \|Δpixel\| [\d.]+ of 255$",
                     r.stdout, re.M)
    steps = re.findall(r"^\s*(DDIM|DPM-Solver\+\+)\s+(\d+) steps: +[\d.]+ s   harmful [\d.]+% / [\d.]+   benign",
                       r.stdout, re.M)
    assert steps == [("DDIM", "20"), ("DDIM", "10"), ("DPM-Solver++", "10"), ("DPM-Solver++", "8")]


def test_bench_parallel_runs_prints_each_kind_asked_for():
    # one of the three kinds, to keep it short: each round starts three worker processes
    r = subprocess.run([sys.executable, "bench/bench_parallel_runs.py", "--threads", "2", "--reps", "1", "--batch", "2",
                        "--rounds", "1", "--kinds", "scm-train"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = re.findall(r"^\s*([\w-]+): one process\s+([\d.]+) ms/unit, two side by side\s+([\d.]+) ms/unit"
                      r"   one / two: ([\d.]+)", r.stdout, re.M)
    assert [k for k, *_ in rows] == ["scm-train"]
    for _, one, two, ratio in rows:  # the printed ratio is the ratio of the printed times, to their rounding
        one, two, ratio = float(one), float(two), float(ratio)  # times to 0.05 ms, the ratio to 0.005
        assert one > 0 and two > 0 and abs(ratio - one / two) <= one / two * (0.05 / one + 0.05 / two) + 0.005


def test_bench_world_step_times_every_size_against_the_preset():
    r = subprocess.run([sys.executable, "bench/bench_world_step.py", "--threads", "1", "--reps", "1",
                        "--warmup", "0"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = re.findall(r"^\| (VAE|UNet \+ text) \| (.+?) \| (\d+) \| (\d+) \| ([\d.]+) \| ([\d.]+) \|$",
                      r.stdout, re.M)
    assert [(part, int(batch)) for part, _, batch, *_ in rows] == \
        [("VAE", 32), ("VAE", 64), ("VAE", 32), ("VAE", 64),
         ("UNet + text", 32), ("UNet + text", 64), ("UNet + text", 32), ("UNet + text", 32), ("UNet + text", 64)]
    assert rows[0][1] == "(16, 32, 64)" and rows[4][1] == "64,128"  # the preset's sizes come first
    firsts = {}
    for part, _, batch, per_step, per_sample, ratio in rows:
        firsts.setdefault(part, float(per_sample))
        # the step's time is the sample's times the batch, and the ratio is against the part's first row,
        # each to the rounding of the printed figures
        assert abs(int(per_step) - float(per_sample) * int(batch)) <= 0.5 + 0.005 * int(batch)
        assert abs(float(ratio) - float(per_sample) / firsts[part]) <= 0.01 + 0.005 / firsts[part]
    assert [float(row[5]) for row in (rows[0], rows[4])] == [1.0, 1.0]


def test_bench_world_kernels_splits_the_step_and_times_each_path():
    r = subprocess.run([sys.executable, "bench/bench_world_kernels.py", "--threads", "1", "--reps", "1",
                        "--warmup", "0"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    parts = re.findall(r"^\| ([a-zA-Z ]+) \| ([\d.]+) \|$", r.stdout, re.M)
    assert [name for name, _ in parts] == ["forward and loss", "backward", "gradient clipping", "AdamW",
                                           "weight average", "the parts together"]
    ms = [float(v) for _, v in parts]
    assert all(v > 0 for v in ms) and abs(sum(ms[:-1]) - ms[-1]) <= 0.25  # five roundings of 0.05
    paths = re.findall(r"^\| (VAE|UNet \+ text) \| ([\w.-]+) \| (\d+) \| ([\d.]+) \| ([\d.]+) \|$",
                       r.stdout, re.M)
    assert [(step, path) for step, path, *_ in paths] == [
        ("VAE", "plain"), ("VAE", "channels-last"), ("UNet + text", "plain"), ("UNet + text", "channels-last")]
    for (_, _, plain, *_), (_, _, other, ratio, _) in (paths[0:2], paths[2:4]):
        # each ratio is against its step's plain path, to the rounding of the printed milliseconds
        assert abs(float(ratio) - int(other) / int(plain)) <= 0.005 + int(other) / int(plain) ** 2
    assert float(paths[0][3]) == float(paths[2][3]) == 1.0


def test_memory_plan_counts_and_arithmetic_on_the_toy(tmp_path):
    """bench/memory_plan.py on the toy's UNet: 4 bytes a parameter of weights and of gradients
    and 8 of AdamW, a 1/N share of each under --shard, LoRA training what models.add_lora
    adds, and activations of a rows-long forward; its --check measures a real step's bytes
    within a few percent of the count."""
    import argparse
    sys.path.insert(0, str(ROOT / "bench"))
    import memory_plan as P
    from lib import models as M
    from lib import utils as U
    assert sum(p.numel() for p in P.build("sd15").parameters()) == 859_520_964  # the checkpoints'
    assert sum(p.numel() for p in P.build("sdxl").parameters()) == 2_567_463_684
    world = U.load_script("00_toy_world.py")
    _, vae, _, unet = world.build_models(argparse.Namespace(**U.preset_defaults("toy", "world", False)))
    params = sum(p.numel() for p in unet.parameters())
    M.add_lora(unet, 4, None)
    lora = sum(p.numel() for p in unet.parameters() if p.requires_grad)

    out = tmp_path / "plan.json"
    r = subprocess.run([sys.executable, "bench/memory_plan.py", "--models", "toy", "--gpus", "1", "2", "4",
                        "--json", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    plan, = json.loads(out.read_text())
    assert (plan["params"], plan["lora_params"]) == (params, lora) and lora == 30_720
    assert plan["vae_params"] == sum(p.numel() for p in vae.parameters())
    rows = {(x["setting"], x["gpus"]): x for x in plan["rows"]}
    full, act = rows["full", 1], plan["activations"]["full"]
    assert (full["weights"], full["gradients"], full["optimizer"]) == (4 * params, 4 * params, 8 * params)
    assert full["reference"] == 4 * params  # the toy preset trains in fp32: an fp32 reference
    for n in (2, 4):
        shard = rows["shard", n]
        # lib/shard.py shards the frozen reference as it shards the policy
        shared = ("weights", "gradients", "optimizer", "reference")
        assert all(shard[k] == pytest.approx(full[k] / n, rel=1e-12) for k in shared)
        assert shard["gather"] > 0 and shard["pairs_per_gpu"] == 16 // n
    lo = rows["lora", 1]
    assert (lo["weights"], lo["gradients"], lo["optimizer"], lo["reference"]) == (4 * (params + lora), 4 * lora, 8 * lora, 0)
    # fp32: no bf16 weight copies; 16 pairs in one forward (32 rows), and DFM's worst case:
    # every pair hard, 2 × (1 + 4 augmentations) rows each, the forward alone
    assert act["const"] == 0 and 0 < act["ckpt_row"] < act["row"]
    assert full["act_no_ckpt"] == 32 * (act["row"] + act["work"]) and full["dfm_no_ckpt"] == 160 * act["row"]
    assert full["total_no_ckpt"] == sum(full[k] for k in ("weights", "gradients", "optimizer", "reference", "vae")) + \
        max(full["act_no_ckpt"], full["dfm_no_ckpt"], full["step"])

    step = P.check(argparse.Namespace(check="toy", side=None, pairs=16, lora_rank=0, ckpt=False))
    measured, planned = step["held_after_forward"]  # 61.1 / 60.7 MiB on the CPU (BENCHMARKS.md)
    assert abs(measured / planned - 1) < 0.05, (measured, planned)
