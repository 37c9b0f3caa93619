"""The `sd15` preset at real size, without a download.

The real architectures are built with random weights from their configs — SD-1.5's
UNet2DConditionModel (860M parameters), its VAE and CLIP ViT-L/14 text encoder, and
OpenCLIP ViT-H-14 for the Safety Cost Model — and one SPO step and one SCM step run on the
CPU through the stage scripts with `--preset sd15`, the same code path a GPU run takes
(grad checkpointing on; bf16 autocast is GPU-only, so the CPU runs fp32). Only the
resolution is small: the UNet's sample_size is 8, i.e. 64×64 pixels, 8×8×4 latents.

Why `--lora-rank 4` in the SPO step: full fine-tuning of 860M parameters in fp32 holds the
policy, its gradients, AdamW's two moments and a frozen fp32 reference — 5 × 3.4 GB ≈ 17 GB —
plus a second copy of the pipeline when the result is saved: over 20 GB, too close to the
24 GiB of the CI machine. LoRA on the attention projections keeps one UNet (the reference is
the same UNet with its adapters off); everything else (caches, the DPO step, DFM, saving a
stock pipeline) is the sd15 path unchanged. Peak memory of each step is measured and checked.

The two real-size tests are marked `slow` (registered in tests/conftest.py): `make test-slow`
runs them, and `make test` (and so CI) leaves them out. With one thread of a 2-core AMD EPYC
Zen 3 they took 110 s (SCM) and 81 s (SPO) on 2026-12-01.

Also here (fast, unmarked): a missing real checkpoint stops stage 4 and stage 2 with one
message naming what to download and where to put it.
"""
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from lib import utils as U


ROOT = Path(__file__).resolve().parents[1]
GiB = 2 ** 30


def run_script(script, *argv, env=None):
    """Run a stage script; return (returncode, stderr, seconds, peak RSS of that process in bytes)."""
    t0 = time.time()
    with tempfile.TemporaryFile() as err:
        p = subprocess.Popen([sys.executable, script, *argv], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err,
                             env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
        _, status, usage = os.wait4(p.pid, 0)  # this child's own rusage (ru_maxrss in kB on Linux)
        p.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        return p.returncode, err.read().decode(errors="replace"), time.time() - t0, usage.ru_maxrss * 1024


# --------------------------------------------------------------------------------------
# SD-1.5 with random weights, from its configs (the builder bench/bench_spo_step.py also uses)
# --------------------------------------------------------------------------------------

def _bench():
    spec = importlib.util.spec_from_file_location("bench_spo_step", ROOT / "bench" / "bench_spo_step.py")
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return m


def sd15_pipeline_folder(folder: Path, sample_size: int = 8) -> Path:
    """SD-1.5's architecture with random weights as a stock pipeline folder; sample_size 8: 64×64 pixels."""
    return _bench().sd15_random_pipeline(folder, sample_size)


def random_png(path: Path, rng: np.random.Generator, size: int = 64) -> str:
    U.save_png(path, rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    return path.name


def hf_run(run: Path, n_pairs: int = 2) -> Path:
    """A run folder with only what stage 4 reads: hf/hf_pairs.jsonl (03_build_hf.py's rows)."""
    rng = np.random.default_rng(0)
    (run / "hf" / "images").mkdir(parents=True)
    rows = []
    for i in range(n_pairs):
        sides = {s: {"path": f"images/{random_png(run / 'hf' / 'images' / f'hf-{i:07d}_{s}.png', rng)}",
                     "role": role, "prompt": f"a photo of a cat number {i}", "quality": q, "cost": c}
                 for s, role, q, c in (("a", "harmful", 20.5, 2.0), ("b", "safe", 21.0, -1.0))}
        rows.append({"id": f"hf-{i:07d}", "kind": "harmful-safe", "prompt": f"a photo of a cat number {i}",
                     "category": "violence", **sides})
    U.write_jsonl(run / "hf" / "hf_pairs.jsonl", rows)
    return run


def coarse_run(run: Path) -> Path:
    """A run folder with only what stage 2 reads: coarse/pairs.jsonl (01_build_coarse.py's rows)."""
    rng = np.random.default_rng(1)
    (run / "coarse" / "images").mkdir(parents=True)
    rows = []
    for i, split in enumerate(("train", "eval")):
        side = lambda name, sign: {"path": f"images/{random_png(run / 'coarse' / 'images' / name, rng, 32)}",
                                   "sign": sign, "severity": 2 if sign == 1 else 0, "prompt": "x", "seed": i}
        rows.append({"id": f"pair-{i:07d}", "judge": "toy", "kind": "harmful-safe", "split": split,
                     "w": side(f"{i}w.png", 1), "l": side(f"{i}l.png", -1)})
    U.write_jsonl(run / "coarse" / "pairs.jsonl", rows)
    return run


# --------------------------------------------------------------------------------------
# Real size: one SPO step and one SCM step on the sd15 code path
# --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_sd15_spo_step_at_real_size(tmp_path):
    model = sd15_pipeline_folder(tmp_path / "sd15")
    run = hf_run(tmp_path / "run")
    rc, err, seconds, peak = run_script("04_train_spo.py", "--preset", "sd15", "--model", str(model), "--run", str(run),
                                  "--steps", "1", "--batch", "1", "--micro-batch", "1", "--lora-rank", "4",
                                  "--device", "cpu")
    assert rc == 0, err[-3000:]
    out = run / "spo"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["preset"] == "sd15" and cfg["grad_checkpointing"] and cfg["beta"] == 5000.0 and cfg["warmup"] == 500
    # at step 1 the policy IS the reference (LoRA's B starts at zero): Δθ = Δref, loss = log 2
    m = json.loads((out / "metrics.json").read_text())
    assert m["final_loss"] == pytest.approx(math.log(2), abs=1e-5) and m["n_pairs"] == 2
    # one AdamW step at the sd15 learning rate moved LoRA's B away from zero
    from safetensors.torch import load_file
    lora = load_file(out / "lora" / "pytorch_lora_weights.safetensors")
    b = [v for k, v in lora.items() if "lora_B" in k or "lora.up" in k]
    a = [v for k, v in lora.items() if "lora_A" in k or "lora.down" in k]
    # to_q, to_k, to_v, to_out.0 of the self- and cross-attention of SD-1.5's 16 transformer blocks, rank 4
    assert len(b) == len(a) == 4 * 2 * 16 and all(v.shape[1] == 4 for v in b)
    # Adam's first step is ±lr per entry (lr of the first warm-up step: lr / warmup)
    assert max(v.abs().max().item() for v in b) == pytest.approx(cfg["lr"] / cfg["warmup"], rel=1e-3)
    unet = json.loads((out / "model" / "unet" / "config.json").read_text())
    assert unet["block_out_channels"] == [320, 640, 1280, 1280] and unet["cross_attention_dim"] == 768
    print(f"\nsd15 SPO step (LoRA 4, 1 pair, 64x64): {seconds:.1f} s, peak RSS {peak / GiB:.1f} GiB")
    assert peak < 12 * GiB


@pytest.mark.slow
def test_sd15_scm_step_with_vit_h14(tmp_path):
    run = coarse_run(tmp_path / "run")
    rc, err, seconds, peak = run_script("02_train_scm.py", "--preset", "sd15", "--run", str(run), "--pretrained", "",
                                  "--steps", "1", "--batch", "1", "--no-no-anchor-baseline", "--device", "cpu")
    assert rc == 0, err[-3000:]
    out = run / "scm"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["arch"] == "ViT-H-14" and cfg["freeze_tower"] and cfg["hidden"] == 512
    m = json.loads((out / "metrics.json").read_text())
    assert m["n_train_pairs"] == 1 and m["n_eval_pairs"] == 1 and 0 <= m["pair_accuracy"] <= 1
    assert math.isfinite(m["mu_safe"]) and math.isfinite(m["safe_cost_mean"])
    from safetensors.torch import load_file
    w = load_file(out / "scm.safetensors")
    assert w["tower.conv1.weight"].shape == (1280, 3, 14, 14)          # ViT-H/14: width 1280, patch 14
    assert sum(v.numel() for k, v in w.items() if k.startswith("tower.")) > 600e6
    # the tower is frozen (sd15): the optimizer holds the adapter head only
    state = torch.load(out / "ckpt" / "train_state.pt", map_location="cpu", weights_only=False)
    assert sum(len(g["params"]) for g in state["opt"]["param_groups"]) == 6 == len(state["opt"]["state"])
    print(f"\nsd15 SCM step (ViT-H-14, 1 pair): {seconds:.1f} s, peak RSS {peak / GiB:.1f} GiB")
    assert peak < 12 * GiB


# --------------------------------------------------------------------------------------
# A missing real checkpoint: one message, what to download and where
# --------------------------------------------------------------------------------------

def test_sd15_spo_without_the_model_says_what_to_download(tmp_path):
    run = hf_run(tmp_path / "run")
    rc, err, _, _ = run_script("04_train_spo.py", "--preset", "sd15", "--run", str(run), "--steps", "1", "--batch", "2")
    assert rc != 0 and "Traceback" not in err
    name = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert f"cannot load the base model {name!r}" in err
    assert f"hf download {name}" in err and "--model PATH" in err


def test_sd15_scm_without_openclip_weights_says_what_to_download(tmp_path):
    run = coarse_run(tmp_path / "run")
    rc, err, _, _ = run_script("02_train_scm.py", "--preset", "sd15", "--run", str(run), "--steps", "1", "--batch", "2",
                         env={"HF_HOME": str(tmp_path / "empty-hf-home")})
    assert rc != 0 and "Traceback" not in err
    assert "cannot load OpenCLIP ViT-H-14 weights 'laion2b_s32b_b79k'" in err
    assert "hf download laion/CLIP-ViT-H-14-laion2B-s32B-b79K open_clip_pytorch_model.bin" in err
    assert "--pretrained PATH" in err
