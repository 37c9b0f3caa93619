"""Per-GPU memory of stage 4's training step (04_train_spo.py) for SD-1.5 and SDXL at the paper's
batch: a plan from exact parameter counts and a count of what autograd keeps, not a GPU
measurement (~400 lines). What one process holds, term by term:

  weights      the policy UNet's fp32 master weights (LoRA: the frozen UNet and its fp32 factors)
  gradients    fp32, of the trained weights
  optimizer    AdamW's two fp32 states of the trained weights (utils.adamw)
  reference    the frozen UNet in bf16 (--bf16 on CUDA), fp32 without; none under LoRA: the
               policy with its adapters off (models.load_training_models)
  VAE          fp32 and kept: DFM re-encodes its pixel augmentations (common.augment). The text
               encoders go to the CPU once the cache is built; latents and text embeddings are
               cached on the CPU (models.build_caches), so none of them count here.
  gather       --shard (FSDP2, lib/shard.py) divides the four terms above by N and adds the
               fp32 weights (and gradient) of the units it holds all-gathered at once: a unit
               is a down, mid or up block (`gathered`). The reference's own, in bf16 during
               its forward without gradient, are fewer and held at another moment.
  activations  what autograd keeps during the policy forward of one micro-batch (winner and
               loser: 2 x --micro-batch rows), or during DFM's Eq. 11 forward (common.
               augmentation_scores: 2 x (1 + 4 augmentations) rows per hard pair, all of a
               rank's hard pairs in one forward, graph kept); the larger of the two counts
  step         the optimizer step's one temporary, sqrt of the second moment (foreach AdamW),
               counted instead of the activations when larger

The total holds every term at once: the bound that a second micro-batch or DFM's forward, which
run with the gradients held, reach. DFM is counted at its worst case, every pair of the rank
hard (--dfm-hard sets how many; 0: DFM off).

The activation model. One forward of the UNet runs on the meta device at the real latent size
(nothing is allocated) under torch.autograd.graph.saved_tensors_hooks, which sees every tensor
autograd keeps for backward; each storage counts once, the weights not at all. Attention is
counted as flash / memory-efficient kernels keep it (q, k, v, output, log-sum-exp), the kernels
a GPU picks. --bf16 is emulated by CUDA autocast's op lists: matmuls and convolutions in bf16,
norms and softmax in fp32, one cached bf16 copy per trained weight. The count is a constant
(the weights' bf16 copies) plus a per-row part, and scales with the rows. Gradient
checkpointing (diffusers': each resnet and transformer block) keeps what is saved outside the
blocks and each block's inputs, and in backward one block's recomputed activations at a time.
Backward's working gradients are taken as 4 × the largest tensor kept, per row: calibrated, not
counted. `--check` runs one real step on the CPU and prints its measured bytes beside the
plan's (BENCHMARKS.md: within 3% for what a forward keeps).

What it is not: a GPU measurement. The CUDA context, cuBLAS/cuDNN workspaces and allocator
fragmentation are not counted (1 GiB of a card is left for them in the fit columns), nor the
transient buffers of a forward without gradient (the reference's).

    python bench/memory_plan.py                               # sd15 and SDXL, N = 1, 2, 4, 6, 8
    python bench/memory_plan.py --check sd15 --side 32 --lora-rank 4   # one CPU step, measured
"""
import argparse
import copy
import ctypes
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common as C  # noqa: E402
from lib import models as M  # noqa: E402
from lib import utils as U  # noqa: E402

GIB = 2 ** 30
# The UNets' configs as their checkpoints' unet/config.json hold them (the rest: diffusers'
# defaults). stable-diffusion-v1-5/stable-diffusion-v1-5: 859,520,964 parameters, 512 px
SD15 = dict(sample_size=64, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
            cross_attention_dim=768, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
# stabilityai/stable-diffusion-xl-base-1.0: 2,567,463,684 parameters, 1,024 px
SDXL = dict(sample_size=128, layers_per_block=2, block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
            cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
# the SD VAE (SDXL's has the same layers): 83,653,863 parameters
VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
TOKENS = {"sd15": 77, "sdxl": 77, "toy": 32}  # the prompt length: CLIP's; the toy tokenizer's
STATIC = ("weights", "gradients", "optimizer", "reference", "vae", "gather")
# CUDA autocast's lists (torch.amp docs, "CUDA Ops that can autocast to float16 / float32"):
# the members a UNet calls
TO_BF16 = {F.conv2d, F.linear, torch.matmul, torch.bmm, torch.baddbmm, torch.mm, torch.addmm,
           F.scaled_dot_product_attention}
TO_FP32 = {F.group_norm, F.layer_norm, F.softmax, torch.softmax, torch.exp}


def build(name: str, meta: bool = True, side: int | None = None, part: str = "unet"):
    """The UNet (or `part` "vae") of `name` (sd15, sdxl, toy: stage 0's) with random weights,
    on the meta device unless `meta` is False; `side`: its latent side, if not the model's."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    with torch.device("meta" if meta else "cpu"):
        if name == "toy":
            from bench_spo_step import random_toy_models
            _, vae, _, unet = random_toy_models()
        else:
            unet = UNet2DConditionModel(**{"sd15": SD15, "sdxl": SDXL}[name])
            vae = AutoencoderKL(**VAE) if part == "vae" else None
    if side:
        unet.register_to_config(sample_size=side)
    return vae if part == "vae" else unet


def inputs(unet, rows: int, tokens: int, device) -> tuple:
    """A batch of `rows` noised latents, timesteps and text conditioning for `unet`."""
    c, s = unet.config, unet.config.sample_size
    emb = torch.randn(rows, tokens, c.cross_attention_dim, device=device)
    kw = {}
    if c.addition_embed_type == "text_time":
        pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
        kw = {"added_cond_kwargs": {"text_embeds": torch.randn(rows, pooled, device=device),
                                    "time_ids": torch.randn(rows, 6, device=device)}}
    x = torch.randn(rows, c.in_channels, s, s, device=device)
    return x, torch.randint(0, 1000, (rows,), device=device), emb, kw


class Autocast(TorchFunctionMode):
    """CUDA's bf16 autocast, emulated where it cannot run (the meta device), and flash
    attention's saved tensors on the meta device (whose own attention keeps the score matrix)."""

    def __init__(self, bf16: bool):
        super().__init__()
        self.bf16, self.cached, self.copies = bf16, {}, set()  # copies: their storages

    def cast(self, x, dtype):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dtype == dtype:
            return x
        if not isinstance(x, torch.nn.Parameter):
            return x.to(dtype)
        # autocast caches a trained weight's copy for the whole forward; a frozen one is cast
        # at each use
        if not x.requires_grad or id(x) not in self.cached:
            self.cached[id(x)] = x.to(dtype)
            self.copies.add(self.cached[id(x)].untyped_storage()._cdata)
        return self.cached[id(x)]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.bf16 and (func in TO_BF16 or func in TO_FP32):
            dtype = torch.bfloat16 if func in TO_BF16 else torch.float32
            args = [self.cast(a, dtype) for a in args]
            kwargs = {k: self.cast(v, dtype) for k, v in kwargs.items()}
        if func is F.scaled_dot_product_attention and args[0].is_meta:
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(*args[:3])[0]
        return func(*args, **kwargs)


def saved_bytes(unet, rows: int, tokens: int, bf16: bool, ckpt: bool,
                regions: set | None = None) -> dict:
    """One forward of `rows` rows: the bytes autograd keeps (`saved`: outside checkpointed
    blocks, and their inputs), of them the bf16 weight copies (`copies`) and the largest other
    tensor (`largest`), the most one block keeps besides its weight copies (`region`, in a
    forward without checkpointing whose blocks are `regions`) and the checkpointed blocks."""
    weights = {p.untyped_storage()._cdata for p in unet.parameters()}
    seen, per_block, stack, blocks = {}, {}, [], set()
    mode = Autocast(bf16)

    def record(t):
        key = t.untyped_storage()._cdata
        if key not in weights and key not in seen:
            seen[key] = t.untyped_storage().nbytes()
            if stack and key not in mode.copies:
                per_block[stack[-1]] = per_block.get(stack[-1], 0) + seen[key]
        return t

    def checkpoint(module, *args):  # diffusers' default, and the inputs the checkpoint holds
        blocks.add(module)
        for a in args:
            if isinstance(a, torch.Tensor):
                record(a)
        return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)

    def leave(module, args, out):
        stack.pop()

    hooks = [h for m in regions or () for h in (
        m.register_forward_pre_hook(lambda m, a: stack.append(m)), m.register_forward_hook(leave))]
    if ckpt:
        unet.enable_gradient_checkpointing(checkpoint)
    unet.train()
    x, t, emb, kw = inputs(unet, rows, tokens, next(unet.parameters()).device)
    with torch.autograd.graph.saved_tensors_hooks(record, lambda t: t), mode:
        unet(x, t, emb, **kw).sample.float().sub(x).pow(2).mean()
    for h in hooks:
        h.remove()
    unet.disable_gradient_checkpointing()
    other = [n for k, n in seen.items() if k not in mode.copies]
    return {"saved": sum(seen.values()), "copies": sum(seen.values()) - sum(other),
            "largest": max(other), "region": max(per_block.values(), default=0), "blocks": blocks}


def activation_model(unet, tokens: int, bf16: bool) -> dict:
    """Bytes kept by a forward of r rows, `const + r · row` (const: the weight copies), without
    and with checkpointing (`ckpt_*`), and per row what backward adds: one block's recompute
    (with checkpointing) and its working gradients, `work` = 4 × the largest tensor kept (on
    the CPU: 3.3 × for SD-1.5 at 32×32 latents, 3.5 × for the toy; BENCHMARKS.md)."""
    with_ckpt = saved_bytes(unet, 1, tokens, bf16, ckpt=True)
    full = saved_bytes(unet, 1, tokens, bf16, ckpt=False, regions=with_ckpt["blocks"])
    return {"const": full["copies"], "row": full["saved"] - full["copies"],
            "ckpt_const": with_ckpt["copies"], "ckpt_row": with_ckpt["saved"] - with_ckpt["copies"],
            "recompute": full["region"], "work": 4 * full["largest"]}


def activations(model: dict, rows: int, ckpt: bool, backward: bool = True) -> int:
    """The most a forward of `rows` rows (and, with `backward`, its backward) holds."""
    if rows == 0:
        return 0
    kind = "ckpt_" if ckpt else ""
    backward_row = model["work"] + ckpt * model["recompute"]
    return model[kind + "const"] + rows * (model[kind + "row"] + backward * backward_row)


def gathered(unet) -> int:
    """The most parameters --shard holds all-gathered at once: FSDP2's units are the down, mid
    and up blocks; in forward unit i and the next one (prefetched), in backward unit i, its
    unsharded gradient and the unit before it (prefetched)."""
    units = [sum(p.numel() for p in u.parameters())
             for u in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]]
    return max(max(a + b, 2 * b + a) for a, b in zip(units, units[1:]))


def plan(name: str, args) -> dict:
    """Every setting's terms (bytes per GPU) for the UNet `name` under the preset's batch."""
    U.load_script("04_train_spo.py")  # its presets
    spo = U.preset_defaults(name, "spo", False)
    batch, micro = args.batch or spo["batch"], args.micro_batch or spo["micro_batch"]
    bf16 = spo["bf16"] if args.bf16 is None else args.bf16
    aug = len(spo["dfm_augmentations"])
    unet, vae = build(name), sum(p.numel() for p in build(name, part="vae").parameters())
    params, unit = sum(p.numel() for p in unet.parameters()), gathered(unet)
    models = {"full": activation_model(unet, TOKENS[name], bf16)}
    M.add_lora(unet, args.lora_rank, None)
    lora = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    models["lora"] = activation_model(unet, TOKENS[name], bf16)
    rows = []
    for method, n in [(m, n) for m in ("full", "lora", "shard") for n in args.gpus]:
        trained = lora if method == "lora" else params
        split = n if method == "shard" else 1
        pairs = -(-batch // n)
        hard = pairs if args.dfm_hard is None else min(args.dfm_hard, pairs)
        act = models["lora" if method == "lora" else "full"]
        row = {"setting": method, "gpus": n, "pairs_per_gpu": pairs,
               "weights": 4 * (params + lora * (method == "lora")) / split,
               "gradients": 4 * trained / split, "optimizer": 8 * trained / split,
               "reference": 0 if method == "lora" else (2 if bf16 else 4) * params / split,
               "vae": 4 * vae, "gather": 4 * unit if method == "shard" and n > 1 else 0,
               "step": 4 * trained / split}
        static = sum(row[k] for k in STATIC)
        for ckpt, key in ((True, "ckpt"), (False, "no_ckpt")):
            # the toy's micro-batch is None: every pair of the GPU in one forward
            row[f"act_{key}"] = activations(act, 2 * min(micro or pairs, pairs), ckpt)
            # Eq. 11's backward stops at its modules' outputs: no block is recomputed
            row[f"dfm_{key}"] = activations(act, 2 * (1 + aug) * hard, ckpt, backward=False)
            row[f"total_{key}"] = static + max(row[f"act_{key}"], row[f"dfm_{key}"], row["step"])
        rows.append(row)
    return {"model": name, "params": params, "lora_params": lora, "lora_rank": args.lora_rank,
            "vae_params": vae, "gathered": unit, "batch": batch, "micro_batch": micro,
            "bf16": bf16, "side": unet.config.sample_size, "activations": models, "rows": rows}


def fits(total: float, card: int) -> str:
    return "yes" if total / GIB + 1 <= card else "no"


def report(p: dict) -> None:
    a, g = p["activations"]["full"], lambda b: f"{b / GIB:.2f}"
    print(f"\n{p['model']}: UNet {p['params']:,} parameters (LoRA rank {p['lora_rank']}: "
          f"{p['lora_params']:,} trained), VAE {p['vae_params']:,}, --shard's all-gathered "
          f"{p['gathered']:,}; {p['side']}x{p['side']} latents, batch {p['batch']} in "
          f"micro-batches of {p['micro_batch']} pairs, {'bf16 autocast' if p['bf16'] else 'fp32'}")
    print(f"  activations, full fine-tuning: {g(a['row'])} GiB a row + {g(a['const'])} GiB of "
          f"weight copies; with checkpointing {g(a['ckpt_row'])} + {g(a['ckpt_const'])} GiB; "
          f"backward adds per row {g(a['work'])} GiB (+ {g(a['recompute'])} GiB recomputed)")
    cols = [*STATIC, "act_ckpt", "act_no_ckpt", "dfm_ckpt", "dfm_no_ckpt", "total_ckpt",
            "total_no_ckpt"]
    print(f"  GiB per GPU      pairs {' '.join(f'{c:>11}' for c in cols)}   24 GB    80 GB"
          f"  (fits: with checkpointing/without)")
    for r in p["rows"]:
        fit = [f"{fits(r['total_ckpt'], c)}/{fits(r['total_no_ckpt'], c)}" for c in (24, 80)]
        print(f"  {r['setting']:>5} N={r['gpus']:<2} {r['pairs_per_gpu']:>10} "
              f"{' '.join(f'{g(r[c]):>11}' for c in cols)}   {fit[0]:>6}   {fit[1]:>6}")


class MallInfo2(ctypes.Structure):
    _fields_ = [(f, ctypes.c_size_t) for f in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                               "usmblks", "fsmblks", "uordblks", "fordblks",
                                               "keepcost")]


LIBC = ctypes.CDLL(None)
LIBC.mallinfo2.restype = MallInfo2


def heap() -> int:
    """Bytes in use on the C heap, mmapped blocks included (glibc's mallinfo2), where torch's
    CPU allocator takes every tensor's memory."""
    info = LIBC.mallinfo2()
    return info.uordblks + info.hblkhd


class PeakHeap(TorchDispatchMode):
    """The peak of heap() read after every aten op, backward's included: on the CPU, what
    torch.cuda.max_memory_allocated is on a GPU, blind only to a buffer an op frees within."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(getattr(self, "peak", 0), heap())
        return out


def check(args) -> dict:
    """One real SPO step on the CPU in fp32 (the second: the first makes AdamW's states), the
    bytes it holds measured beside the plan's for the same UNet, rows and latent side."""
    from diffusers import DDPMScheduler
    torch.manual_seed(0)
    unet, meta = build(args.check, meta=False, side=args.side), build(args.check, side=args.side)
    ref = None if args.lora_rank else copy.deepcopy(unet).requires_grad_(False)
    for net in (unet, meta) if args.lora_rank else ():
        M.add_lora(net, args.lora_rank, None)
    model = activation_model(meta, TOKENS[args.check], bf16=False)
    if args.ckpt:
        unet.enable_gradient_checkpointing()
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = U.adamw(params, lr=1e-6, weight_decay=1e-2)
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    z, t, emb, _ = inputs(unet, 2 * args.pairs, TOKENS[args.check], "cpu")
    noise, t, emb = torch.randn_like(z[:args.pairs]), t[:args.pairs], emb[:args.pairs]
    marks = []

    def step(mark):
        opt.zero_grad(set_to_none=True)
        loss, _, _ = C.dpo_pair_losses(unet, ref, sched, z[:args.pairs], z[args.pairs:], emb, t,
                                       noise, beta=5000.0)
        mark(0)
        loss.mean().backward()
        mark(1)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    step(lambda _: None)
    opt.zero_grad(set_to_none=True)  # as stage 4's step begins: the base holds no gradient
    base = heap()
    with PeakHeap() as peak:
        step(lambda _: marks.append((heap() - base, peak.peak - base)))
    rows, grads = 2 * args.pairs, 4 * sum(p.numel() for p in params)
    act = activations(model, rows, args.ckpt)
    return {"model": args.check, "side": unet.config.sample_size, "pairs": args.pairs,
            "ckpt": args.ckpt, "lora_rank": args.lora_rank,
            "held_after_forward": [marks[0][0], activations(model, rows, args.ckpt, False)],
            "peak_forward_backward": [marks[1][1], act + grads],
            "peak_step": [peak.peak - base, max(act, grads) + grads]}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["sd15", "sdxl"], choices=["sd15", "sdxl", "toy"])
    p.add_argument("--gpus", nargs="+", type=int, default=[1, 2, 4, 6, 8])
    p.add_argument("--lora-rank", type=int, default=4, help="LoRA's (the README's 4); --check: "
                   "0 for full fine-tuning")
    p.add_argument("--batch", type=int, help="pairs per step over all GPUs (default: the preset's)")
    p.add_argument("--micro-batch", type=int, help="pairs per forward (default: the preset's)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, help="default: the preset's")
    p.add_argument("--dfm-hard", type=int, help="hard pairs of a GPU in DFM's forward (default: "
                   "all of its pairs, the worst case; 0: DFM off)")
    p.add_argument("--check", choices=["toy", "sd15"],
                   help="instead: one real step on the CPU, its bytes measured beside the plan's")
    p.add_argument("--side", type=int, help="--check: the latent side (default: the model's)")
    p.add_argument("--pairs", type=int, default=1, help="--check: pairs in the step")
    p.add_argument("--ckpt", action=argparse.BooleanOptionalAction, default=False,
                   help="--check: gradient checkpointing")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args()
    if min(args.gpus) < 1 or args.pairs < 1 or args.lora_rank < (0 if args.check else 1):
        p.error("--gpus and --pairs take numbers from 1 up; --lora-rank from 1 (--check: from 0)")
    if args.check:
        out = check(args)
        print(f"{out['model']} at {out['side']}x{out['side']} latents, {out['pairs']} pair(s), "
              f"{'LoRA rank %d' % args.lora_rank if args.lora_rank else 'full fine-tuning'}, "
              f"checkpointing {'on' if args.ckpt else 'off'}, fp32 (MiB: measured / planned)")
        for key in ("held_after_forward", "peak_forward_backward", "peak_step"):
            measured, planned = out[key]
            print(f"  {key.replace('_', ' '):>22}: {measured / 2**20:9.1f} / {planned / 2**20:9.1f}"
                  f"   ({measured / planned:.3f})")
    else:
        out = [plan(name, args) for name in args.models]
        for one in out:
            report(one)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
