"""Can the UNet's own work in the SPO step get cheaper? Times the two UNet calls of the
optimised step of 04_train_spo.py — the policy forward + backward and the reference forward
without gradient — in several numeric and memory-layout variants, on the same inputs:

  fp32            what stage 4 does on a CPU
  bf16            torch.autocast bf16 (on a CPU: AVX-512 BF16 / AMX where the chip has them)
  channels_last   the UNet and its input in channels-last layout, fp32
  compile         torch.compile (inductor), fp32; compile time printed apart (--compile)

BENCHMARKS.md reports the figures; the ratio of the variants says whether any of them could
lift the SPO step's speedup. The UNet is RUN/world/model/unet when it exists, else stage 0's
toy architecture with random weights (the cost does not depend on the weights).

    python bench/bench_unet_variants.py --batch 32 [--compile] [--device cuda]
"""
import argparse
import contextlib
import statistics
import time
from pathlib import Path

import torch

from bench_spo_step import ROOT, random_toy_models


def toy_unet(run: Path):
    from diffusers import UNet2DConditionModel
    folder = run / "world" / "model" / "unet"
    return UNet2DConditionModel.from_pretrained(folder) if folder.is_dir() else random_toy_models()[3]


def median_ms(fn, warmup: int, reps: int, sync) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="runs/toy", help="run folder whose world/model/unet to time")
    p.add_argument("--batch", type=int, default=32, help="UNet samples (2 per pair: winner and loser)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="also time torch.compile (slow to compile on a CPU)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    unet = toy_unet(ROOT / args.run).to(dev)
    cfg = unet.config
    x = torch.randn(args.batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, device=dev)
    t = torch.randint(0, 1000, (args.batch,), device=dev)
    emb = torch.randn(args.batch, 32, cfg.cross_attention_dim, device=dev)
    fp32 = contextlib.nullcontext
    bf16 = lambda: torch.autocast(dev.type, dtype=torch.bfloat16)

    def train_call(net, x, cast):
        def f():
            with cast():
                out = net(x, t, emb).sample
            out.float().square().mean().backward()
        return f

    def ref_call(net, x, cast):
        def f():
            with torch.no_grad(), cast():
                net(x, t, emb)
        return f

    def row(name, net, x, cast):
        tr = median_ms(train_call(net, x, cast), args.warmup, args.reps, sync)
        rf = median_ms(ref_call(net, x, cast), args.warmup, args.reps, sync)
        print(f"{name:>14}: policy forward+backward {tr:8.1f} ms   reference forward {rf:8.1f} ms", flush=True)

    print(f"UNet {sum(q.numel() for q in unet.parameters()) / 1e6:.1f}M parameters, batch {args.batch}, "
          f"latents {cfg.sample_size}x{cfg.sample_size}, {dev}, {torch.get_num_threads()} threads")
    row("fp32", unet, x, fp32)
    row("bf16", unet, x, bf16)
    row("channels_last", unet.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last), fp32)
    unet.to(memory_format=torch.contiguous_format)
    if args.compile:
        compiled = torch.compile(unet)
        for name, call in (("forward+backward", train_call), ("forward", ref_call)):
            t0 = time.perf_counter()
            call(compiled, x, fp32)()
            print(f"{'compile':>14}: first {name} (compiling) {time.perf_counter() - t0:.1f} s", flush=True)
        row("compile", compiled, x, fp32)


if __name__ == "__main__":
    main()
