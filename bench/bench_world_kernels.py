"""Where one stage-0 UNet step spends its time, and what other kernel paths make of it (~100
lines).

bench/bench_world_step.py costs stage 0's steps at other model sizes; this bench keeps the toy
preset's sizes (VAE (16, 32, 64), UNet (64, 128) with the text encoder, batch 32) and asks
what is left to take without changing the world's design:
  1. the UNet step in its parts, as 00_toy_world.py's loop takes them: forward and loss,
     backward, gradient clipping, AdamW (multi-tensor), the weight average (ema_decay);
  2. both steps with channels-last weights and inputs (oneDNN's preferred layout);
  3. with --compile, the UNet's forward and loss through torch.compile (inductor, which needs
     a C++ compiler): the seconds of its first step, which compiles, then the median step.
Any of these paths rounds otherwise than stage 0's, so each would draw another world: a gain
must be worth measuring the draws again (docs/results.md). Random weights: a step's cost does
not depend on them.

    python bench/bench_world_kernels.py [--threads 2] [--reps 15] [--warmup 3] [--compile]
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from bench_world_step import UNET_SIZES, VAE_SIZES, seconds, unet_setup, unet_step, vae_step
from lib import utils as U  # noqa: E402 (bench_world_step's import put the repository on sys.path)

VAE, UNET = VAE_SIZES[0], UNET_SIZES[0]  # (widths, batch): the toy preset's, listed first there
PARTS = ("forward and loss", "backward", "gradient clipping", "AdamW", "weight average")


def unet_parts(reps: int, warmup: int) -> dict[str, float]:
    """Median milliseconds of each part of stage 0's UNet step at the preset's sizes."""
    unet, text_encoder, params, opt, ids, z, t = unet_setup(*UNET)
    decay = U.preset_defaults("toy", "world", False)["ema_decay"]  # set once stage 0 is loaded
    ema = [p.detach().clone() for p in params]
    times = {part: [] for part in PARTS}
    for rep in range(warmup + reps):
        clock = [time.perf_counter()]
        loss = F.mse_loss(unet(z, t, text_encoder(ids).last_hidden_state).sample,
                          torch.randn_like(z))
        opt.zero_grad(set_to_none=True)
        clock.append(time.perf_counter())
        loss.backward()
        clock.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        clock.append(time.perf_counter())
        opt.step()
        clock.append(time.perf_counter())
        with torch.no_grad():  # 00_toy_world.train_unet's update, at its decay
            for e, p in zip(ema, params):
                e.mul_(decay).add_(p.detach(), alpha=1 - decay)
        clock.append(time.perf_counter())
        if rep >= warmup:
            for part, start, end in zip(PARTS, clock, clock[1:]):
                times[part].append(end - start)
    return {part: 1000 * statistics.median(v) for part, v in times.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3, help="steps before the timed ones")
    p.add_argument("--compile", action="store_true", help="also time torch.compile's UNet step")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.threads} threads, median of {args.reps} steps\n")
    parts = unet_parts(args.reps, args.warmup)
    print("| part of the UNet + text step | ms |\n|---|---|")
    for part, ms in parts.items():
        print(f"| {part} | {ms:.1f} |")
    print(f"| the parts together | {sum(parts.values()):.1f} |\n", flush=True)

    print("| step | path | ms per step | against the plain path | first step, s |")
    print("|---|---|---|---|---|")
    cl = torch.channels_last
    paths = [("VAE", "plain", lambda: vae_step(*VAE)),
             ("VAE", "channels-last", lambda: vae_step(*VAE, cl)),
             ("UNet + text", "plain", lambda: unet_step(*UNET)),
             ("UNet + text", "channels-last", lambda: unet_step(*UNET, cl))]
    if args.compile:
        paths.append(("UNet + text", "torch.compile", lambda: unet_step(*UNET, compiled=True)))
    plain = {}
    for part, path, build in paths:
        step = build()
        start = time.perf_counter()
        step()  # the first step: torch.compile compiles here
        first = time.perf_counter() - start
        ms = 1000 * seconds(step, args.reps, args.warmup)
        plain.setdefault(part, ms)
        print(f"| {part} | {path} | {ms:.0f} | {ms / plain[part]:.2f} | {first:.1f} |", flush=True)


if __name__ == "__main__":
    main()
