"""What one training step of stage 0 costs at other sizes (~100 lines).

Stage 0 trains the toy world's VAE (700 steps) and then its UNet with the text encoder (1,500
steps); on two cores they are most of its time and the longest part of `make toy`. This bench
times one step of each, as 00_toy_world.py takes it (the VAE: encode, sample, decode, L1 +
MSE, AdamW; the UNet: text encoder, ε-prediction MSE, backward, AdamW), at the toy preset's
widths and batch and at smaller widths and larger batches, so that a faster design can be
costed before it is trained. A step's cost does not depend on the weights, so the models are
random. It measures time only, not what a size does to the world (its harm rates, its
quality): that needs stage 0 trained at that size.

    python bench/bench_world_step.py [--threads 2] [--reps 15] [--warmup 3]
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from bench_spo_step import random_toy_models
from lib import utils as U  # noqa: E402 (bench_spo_step put the repository on sys.path)

# (VAE widths, batch): the toy preset's first
VAE_SIZES = [((16, 32, 64), 32), ((16, 32, 64), 64), ((8, 16, 32), 32), ((8, 16, 32), 64)]
# (UNet widths, batch): the toy preset's first
UNET_SIZES = [("64,128", 32), ("64,128", 64), ("48,96", 32), ("32,64", 32), ("32,64", 64)]


def vae_step(widths: tuple, batch: int, memory_format=torch.contiguous_format):
    """One VAE training step of stage 0 at `widths` (stage 0's config otherwise)."""
    from diffusers import AutoencoderKL
    vae = random_toy_models()[1]
    vae = AutoencoderKL.from_config({**vae.config, "block_out_channels": widths,
                                     "norm_num_groups": min(vae.config.norm_num_groups, widths[0])})
    vae.to(memory_format=memory_format)
    opt = U.adamw(vae.parameters(), lr=1e-4)
    x = (torch.rand(batch, 3, 32, 32) * 2 - 1).to(memory_format=memory_format)

    def step():
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.mean + post.std * torch.randn_like(post.mean)).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def unet_setup(widths: str, batch: int, memory_format=torch.contiguous_format):
    """Stage 0's UNet and text encoder at `widths` with random weights, their AdamW, and one
    random batch: (unet, text_encoder, params, opt, ids, z, t)."""
    tokenizer, _, text_encoder, unet = random_toy_models(unet_channels=widths)
    unet.to(memory_format=memory_format)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = U.adamw(params, lr=1e-4, weight_decay=0.0)
    ids = torch.randint(0, tokenizer.vocab_size, (batch, tokenizer.model_max_length))
    z = torch.randn(batch, 4, 8, 8).to(memory_format=memory_format)
    return unet, text_encoder, params, opt, ids, z, torch.randint(0, 1000, (batch,))


def unet_step(widths: str, batch: int, memory_format=torch.contiguous_format, compiled=False):
    """One UNet + text encoder training step of stage 0 at `widths`; `compiled`: its forward
    and loss through torch.compile (inductor), which compiles on the first step."""
    unet, text_encoder, params, opt, ids, z, t = unet_setup(widths, batch, memory_format)

    def forward(z, t, ids, noise):
        return F.mse_loss(unet(z, t, text_encoder(ids).last_hidden_state).sample, noise)
    forward = torch.compile(forward) if compiled else forward

    def step():
        loss = forward(z, t, ids, torch.randn_like(z))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    return step


def seconds(step, reps: int, warmup: int) -> float:
    """Median seconds of one step, after `warmup` steps."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3, help="steps before the timed ones")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.threads} threads, median of {args.reps} steps\n")
    print("| part | widths | batch | ms per step | ms per sample | per sample, against the preset |")
    print("|---|---|---|---|---|---|")
    for part, sizes, build in (("VAE", VAE_SIZES, vae_step), ("UNet + text", UNET_SIZES, unet_step)):
        base = None
        for widths, batch in sizes:
            per_sample = seconds(build(widths, batch), args.reps, args.warmup) / batch
            base = base or per_sample
            print(f"| {part} | {widths} | {batch} | {1000 * per_sample * batch:.0f} | "
                  f"{1000 * per_sample:.2f} | {per_sample / base:.2f} |", flush=True)


if __name__ == "__main__":
    main()
