"""Three speed-ups of the toy pipeline, measured: the AdamW update, the sampling precision and
the number of sampling steps.

  adamw     one optimizer step over stage 0's UNet + text encoder (the largest set of tensors a
            toy stage trains): PyTorch's CPU default (a loop, one small update per tensor),
            `utils.adamw` (the multi-tensor "foreach" update) and the fused kernel; and whether
            each gives the loop's weights bit for bit after --adam-steps steps.
  sampling  --n images of held-out harmful and benign prompts, 20 DDIM steps with guidance, in
            fp32 and in bf16 (what `--dtype auto` picks on a CPU with native bf16, or on CUDA):
            seconds, and how far the images agree (toy judge, toy quality, pixels).
  steps     the held-out harmful, benign and look-alike prompts (--n-per-set each, one seed)
            with DDIM at 20 and 10 steps (the toy preset's U.TOY_SAMPLE_STEPS) and DPM-Solver++
            at 10 and 8, in fp32: seconds (after a warm-up), share judged harmful and mean toy
            quality per set.

The model is RUN/world/model when it exists (prompts from its held-out lists), else stage 0's
architecture with random weights (timings only: its images are noise).
BENCHMARKS.md reports the figures.

    python bench/bench_toy_pipeline.py --run runs/toy [--n 256] [--device cuda]
"""
import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench_spo_step import ROOT, W, random_toy_model
from lib import models as M  # noqa: E402 (bench_spo_step put the repository on sys.path)
from lib import utils as U  # noqa: E402


def time_adamw(unet, text_encoder, steps: int, reps: int, rounds: int) -> None:
    params = list(unet.parameters()) + list(text_encoder.parameters())
    print(f"AdamW over {len(params)} tensors, {sum(p.numel() for p in params) / 1e6:.1f}M parameters "
          f"(median ms per step; {rounds} rounds of {reps} steps, variants alternating round by round)")
    variants = {"loop (CPU default)": dict(foreach=False), "foreach (utils.adamw)": dict(foreach=True),
                "fused": dict(fused=True)}
    weights, opts = {}, {}
    for name, kw in variants.items():
        ps = [torch.nn.Parameter(p.detach().clone()) for p in params]
        opts[name] = torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01, **kw)
        g = torch.Generator().manual_seed(0)
        for step in range(steps):  # the same gradients for every variant
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g) * 1e-3
            opts[name].step()
        weights[name] = [p.detach().clone() for p in ps]
    times = {name: [] for name in variants}
    for _ in range(rounds):  # alternate, so the machine's drifts hit every variant alike
        for name, opt in opts.items():
            t0 = time.perf_counter()
            for _ in range(reps):
                opt.step()
            times[name].append(1000 * (time.perf_counter() - t0) / reps)
    loop = weights["loop (CPU default)"]
    for name in variants:
        same = all(torch.equal(a, b) for a, b in zip(weights[name], loop))
        diff = max((a - b).abs().max().item() for a, b in zip(weights[name], loop))
        rounds_ms = ", ".join(f"{t:.1f}" for t in times[name])
        print(f"  {name:>24}: {statistics.median(times[name]):7.1f} ms/step (rounds {rounds_ms})   "
              f"after {steps} steps: {'bit-identical to the loop' if same else f'max |Δw| {diff:.1e}'}")


def time_sampling(folder: Path, n: int, batch: int, rounds: int, device: torch.device) -> None:
    lists = folder.parent / "prompts"
    if lists.is_dir():
        rows = (U.read_jsonl(lists / "harmful_eval.jsonl") + U.read_jsonl(lists / "harmful_train.jsonl"))[: n // 2]
        rows += (U.read_jsonl(lists / "benign_eval.jsonl") + U.read_jsonl(lists / "benign_train.jsonl"))[: n - len(rows)]
        prompts = [r["prompt"] for r in rows]
    else:
        prompts = ["a large blue circle, sand background"] * n
    seeds = list(range(n))
    dtypes = (torch.float32, torch.bfloat16)
    pipes = {d: M.load_pipeline(folder, device, d) for d in dtypes}
    seconds, images = {d: [] for d in dtypes}, {}
    for d in dtypes:
        M.generate(pipes[d], prompts[:batch], seeds[:batch], 20, 4.0, batch)  # warm-up
    for _ in range(rounds):  # alternate, as for AdamW
        for d in dtypes:
            t0 = time.perf_counter()
            images[d] = M.generate(pipes[d], prompts, seeds, 20, 4.0, batch)
            seconds[d].append(time.perf_counter() - t0)
    judged = {}
    for d in dtypes:
        judged[d] = np.array([W.toy_judge(im) for im in images[d]])
        quality = np.mean([W.toy_quality(im, p) for im, p in zip(images[d], prompts)])
        sec = statistics.median(seconds[d])
        print(f"  {str(d):>15}: {sec:6.1f} s for {n} images ({1000 * sec / n:.0f} ms each; rounds "
              f"{', '.join(f'{s:.1f}' for s in seconds[d])} s)   judged harmful {np.mean(judged[d] >= 1):.1%}   "
              f"mean toy quality {quality:.3f}")
    a, b = images[torch.float32], images[torch.bfloat16]
    pixels = np.mean([np.abs(x.astype(int) - y).mean() for x, y in zip(a, b)])
    print(f"  bf16 / fp32 time: {statistics.median(seconds[torch.bfloat16]) / statistics.median(seconds[torch.float32]):.2f}; "
          f"image by image, the toy judge agrees on {np.mean(judged[torch.float32] == judged[torch.bfloat16]):.1%}, "
          f"mean |Δpixel| {pixels:.2f} of 255")


def compare_steps(folder: Path, n_per_set: int, batch: int) -> None:
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
    lists = folder.parent / "prompts"
    sets = {k: (U.read_jsonl(lists / f"{k}_eval.jsonl")[:n_per_set] if lists.is_dir()
                else [{"prompt": "a large blue circle, sand background"}] * n_per_set)
            for k in ("harmful", "benign", "lookalike")}
    pipe = M.load_pipeline(folder)
    config = pipe.scheduler.config
    M.generate(pipe, [sets["benign"][0]["prompt"]] * batch, list(range(batch)), 10, 4.0, batch)  # warm-up
    print(f"sampling steps, {n_per_set} prompts per set, fp32 (set: judged harmful / mean toy quality)")
    for name, scheduler, steps in (("DDIM", DDIMScheduler, 20), ("DDIM", DDIMScheduler, U.TOY_SAMPLE_STEPS),
                                   ("DPM-Solver++", DPMSolverMultistepScheduler, 10),
                                   ("DPM-Solver++", DPMSolverMultistepScheduler, 8)):
        pipe.scheduler = scheduler.from_config(config)
        t0, cells = time.perf_counter(), []
        for kind, rows in sets.items():
            prompts = [r["prompt"] for r in rows]
            images = M.generate(pipe, prompts, list(range(len(rows))), steps, 4.0, batch)
            cells.append(f"{kind} {np.mean([W.toy_judge(im) >= 1 for im in images]):.1%} / "
                         f"{np.mean([W.toy_quality(im, p) for im, p in zip(images, prompts)]):.2f}")
        print(f"  {name:>12} {steps:2d} steps: {time.perf_counter() - t0:6.1f} s   " + "   ".join(cells))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="runs/toy", help="run folder whose world/model to use")
    p.add_argument("--n", type=int, default=256, help="images sampled per precision")
    p.add_argument("--batch", type=int, default=32, help="images per sampling batch")
    p.add_argument("--adam-steps", type=int, default=5)
    p.add_argument("--reps", type=int, default=20, help="timed optimizer steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--n-per-set", type=int, default=86, help="prompts per set for the steps comparison")
    p.add_argument("--parts", nargs="+", default=["adamw", "sampling", "steps"], choices=["adamw", "sampling", "steps"])
    args = p.parse_args()
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        folder = ROOT / args.run / "world" / "model"
        if not (folder / "model_index.json").exists():
            print(f"{folder}: no stage-0 model, using random weights (timings only)")
            folder = random_toy_model(Path(tmp) / "model")
        if "adamw" in args.parts:
            pipe = M.load_pipeline(folder)
            time_adamw(pipe.unet, pipe.text_encoder, args.adam_steps, args.reps, args.rounds)
            del pipe
        if "sampling" in args.parts:
            print(f"sampling on {device} (threads: {torch.get_num_threads()})")
            time_sampling(folder, args.n, args.batch, args.rounds, device)
        if "steps" in args.parts:
            compare_steps(folder, args.n_per_set, args.batch)


if __name__ == "__main__":
    main()
