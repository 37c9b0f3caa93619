"""bench/bench_spo_step.py runs, compares the optimised and naive SPO steps on the same maths,
and ends with the `speedup` line (a smoke test: the figures themselves are in BENCHMARKS.md)."""
import json
import re
import subprocess
import sys
from pathlib import Path

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
