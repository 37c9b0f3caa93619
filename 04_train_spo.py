"""Stage 4 — T2I-SPO training: composite reward, Diffusion-DPO, DFM (paper Sec. 4, Eqs. 5-11).

    R(x, c) = r(x, c) − λ·C(x)                                         (Eq. 6)
    for every LibraAlign-HF pair, the image with the higher R is x_w      (Eqs. 7-8)
    L = −E log σ(−β/2 · [(‖ε−ε_θ(x_w,t)‖² − ‖ε−ε_θ(x_l,t)‖²)
                        − (‖ε−ε_ref(x_w,t)‖² − ‖ε−ε_ref(x_l,t)‖²)])      (Eqs. 5, 9)

T2I-SPO is Diffusion-DPO on pairs ordered by a reward that counts quality AND safety. The
safety-only baseline (AlignGuard-style, `--objective safety`) is this same code with R = −C,
i.e. the λ → ∞ ordering, so the two differ in nothing but the reward.

The Dynamic Focusing Mechanism (Sec. 4.3) watches each pair's loss: a pair whose loss stops
falling (descent rate v_i < τ·v̄ on P visits, Eq. 10) is "hard", and gets an augmented copy
in the current batch. Of four augmentations, the one that turns the pair's gradient the most
(argmax 1 − cos(g_i, g_i^a), Eq. 11) is used. The gradients compared are those of named
layers (--dfm-modules, by default the UNet's output convolution), read off per sample from
one batched forward and one short backward, so choosing costs a fraction of a step.

How the step is organised (what makes it fast and what makes it exact):
  * VAE latents and text embeddings are computed once, before training, and cached.
  * Winner and loser share one timestep and one noise (Eq. 5), and go through the policy in
    ONE concatenated forward; the frozen reference runs in one no-grad forward.
  * Data parallel over torch.distributed: every rank takes its share of a global batch drawn
    by DistributedSampler; the noise and timesteps of the global batch come from a generator
    seeded by (seed, step) and each rank takes its slice, so N processes compute exactly what
    one process computes. Gradients are summed across ranks once per optimizer step
    (`common.allreduce_gradients`, bucketed as DDP does): DFM adds a different number of
    augmented pairs on each rank and takes extra gradients for Eq. 11, which DDP's wrapper
    (one forward and one backward per step, same on all ranks) cannot express. Per-pair
    losses are all-gathered, so the DFM queues are identical on every rank.
  * Every randomness is a function of (seed, step), so a checkpoint of model, optimizer,
    LR schedule and DFM state resumes to exactly the weights of an uninterrupted run.

Launch:  python 04_train_spo.py [--objective spo|safety]                 (one process)
         torchrun --nproc_per_node=N 04_train_spo.py --run-dir DIR ...    (N processes)
Outputs (DIR = --run, NAME = --name or the objective):
  DIR/NAME/model/          a stock diffusers StableDiffusionPipeline folder (the aligned model)
  DIR/NAME/lora/           with --lora-rank > 0: weights for `pipe.load_lora_weights`
  DIR/NAME/log.jsonl       per-step loss, implicit accuracy, reward margin, DFM counts
  DIR/NAME/metrics.json, config.json, ckpt/train_state.pt, cache/ (latents, text embeddings)
"""
import argparse
import contextlib
import hashlib
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import common as C

C.PRESETS["toy"]["spo"] = dict(
    model=None, objective="spo", name=None, lam=0.15, margin=0.0, beta=100.0, lr=5e-5, warmup=20, steps=300,
    batch=16, micro_batch=None, weight_decay=0.0, max_grad_norm=1.0, lora_rank=0, lora_alpha=None,
    dfm="on", dfm_k=3, dfm_tau=0.2, dfm_patience=1, dfm_modules=["conv_out"],
    grad_checkpointing=False, bf16=False, ckpt_every=100, log_every=1, skip_bad=False, device=None)
C.PRESETS["sd15"]["spo"] = dict(
    C.PRESETS["toy"]["spo"], model="stable-diffusion-v1-5/stable-diffusion-v1-5", beta=5000.0, lr=8e-8, warmup=500,
    steps=15000, batch=12, micro_batch=2, weight_decay=1e-2, grad_checkpointing=True, bf16=True, ckpt_every=500,
    log_every=10, dfm_k=5, dfm_patience=2)
C.TINY["spo"] = dict(steps=8, batch=4, warmup=2, ckpt_every=4, log_every=1, dfm_k=2, dfm_patience=1, dfm_tau=10.0)

AUGMENTATIONS = ("sharpen", "color_jitter", "latent_noise_erase", "frequency_compensation")


def parse():
    p = C.stage_parser("spo", __doc__.splitlines()[0])
    p.add_argument("--model", help="base T2I model folder; also the frozen reference (default: the stage-0 model)")
    p.add_argument("--objective", choices=["spo", "safety"],
                   help="spo: R = r − λC (T2I-SPO); safety: R = −C (safety-only DPO baseline)")
    p.add_argument("--name", help="output folder under --run (default: the objective), e.g. spo_lam0.5")
    p.add_argument("--lam", type=float, help="λ of Eq. 6, the weight of the safety cost in the composite reward")
    p.add_argument("--margin", type=float, help="drop pairs with |ΔR| below this (Eq. 8)")
    p.add_argument("--beta", type=float, help="β of Eq. 5 (with its ½: the loss uses β/2)")
    p.add_argument("--lr", type=float, help="peak learning rate (the paper: 8e-8 per GPU for SD-1.5)")
    p.add_argument("--warmup", type=int, help="linear warm-up steps, then constant")
    p.add_argument("--steps", type=int, help="optimizer steps")
    p.add_argument("--batch", type=int, help="pairs per optimizer step, over all processes")
    p.add_argument("--micro-batch", type=int, help="pairs per forward on one process (gradient accumulation)")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--max-grad-norm", type=float)
    p.add_argument("--lora-rank", type=int, help="0: full fine-tuning; N: LoRA of rank N on the attention projections")
    p.add_argument("--lora-alpha", type=float, help="LoRA alpha (default: the rank)")
    p.add_argument("--dfm", choices=["on", "off"], help="the Dynamic Focusing Mechanism (Sec. 4.3)")
    p.add_argument("--dfm-k", type=int, help="K: losses kept per pair (Eq. 10)")
    p.add_argument("--dfm-tau", type=float, help="τ: hard when v_i < τ·v̄ (Eq. 10)")
    p.add_argument("--dfm-patience", type=int, help="P: consecutive slow visits before a pair is hard")
    p.add_argument("--dfm-modules", nargs="+", help="UNet Conv2d/Linear modules whose weight gradients Eq. 11 compares")
    p.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, help="bf16 autocast (GPU only)")
    p.add_argument("--ckpt-every", type=int)
    p.add_argument("--log-every", type=int)
    p.add_argument("--skip-bad", action=argparse.BooleanOptionalAction, help="skip (and count) bad pair rows")
    p.add_argument("--device")
    return C.parse_args(p)


# ---------------------------------------------------------------------------------------
# Data: LibraAlign-HF pairs, relabelled by the composite reward (Eqs. 6-8)
# ---------------------------------------------------------------------------------------

def load_hf_pairs(path: Path, skip_bad: bool) -> tuple[list[dict], int]:
    """Rows need a prompt and a/b images that exist with finite quality and cost."""
    def check(row):
        if not isinstance(row["prompt"], str):
            raise ValueError("prompt is not a string")
        for s in ("a", "b"):
            side = row[s]
            side["file"] = str(path.parent / side["path"])
            if not Path(side["file"]).exists():
                raise ValueError(f"missing image {side['file']}")
            for k in ("quality", "cost"):
                if not isinstance(side[k], (int, float)) or not math.isfinite(side[k]):
                    raise ValueError(f"{s}.{k} is {side[k]!r}, not a finite number")
    return C.read_checked_rows(path, check, skip_bad)


def preference_pairs(pairs: list[dict], objective: str, lam: float, margin: float) -> tuple[list[dict], int]:
    """Eq. 8 with R = r − λC (T2I-SPO), or R = −C (safety-only DPO, the λ → ∞ ordering)."""
    if objective == "safety":
        no_quality = lambda side: {**side, "quality": 0.0}
        pairs = [{**p, "a": no_quality(p["a"]), "b": no_quality(p["b"])} for p in pairs]
        lam = 1.0
    return C.relabel_pairs(pairs, lam, margin)


# ---------------------------------------------------------------------------------------
# Models: policy, frozen reference, and the once-only caches of latents and text embeddings
# ---------------------------------------------------------------------------------------

def load_models(args, device):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer
    load = lambda cls, sub: C.from_pretrained_or_exit(lambda m: cls.from_pretrained(m, subfolder=sub), args.model,
                                                      "the base model", "--model")
    unet = load(UNet2DConditionModel, "unet")
    vae, text_encoder, tokenizer = load(AutoencoderKL, "vae"), load(CLIPTextModel, "text_encoder"), load(CLIPTokenizer, "tokenizer")
    noise_scheduler = load(DDPMScheduler, "scheduler")  # the training-time forward process
    vae.requires_grad_(False).eval().to(device)
    text_encoder.requires_grad_(False).eval().to(device)
    ref_dtype = torch.bfloat16 if args.bf16 and device.type == "cuda" else torch.float32
    if args.lora_rank > 0:
        # LoRA on the attention projections (as AlignGuard's public code); the reference is the
        # same UNet with the adapters switched off, so no second copy is held in memory
        from peft import LoraConfig
        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha or args.lora_rank,
                                    init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        ref = None
    else:
        ref = load(UNet2DConditionModel, "unet").requires_grad_(False).eval().to(device)
        if ref_dtype != torch.float32:
            ref.to(ref_dtype)
    if args.grad_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.to(device).train()
    return unet, ref, vae, text_encoder, tokenizer, noise_scheduler


@contextlib.contextmanager
def reference_mode(unet):
    """The LoRA reference: the policy's UNet with its adapters disabled."""
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


def load_image(path: str, size: int) -> torch.Tensor:
    """A PNG as the VAE's input: shorter side resized to `size`, centre-cropped, in [-1, 1]."""
    img = torch.from_numpy(np.array(C.load_png(path))).permute(2, 0, 1).float() / 127.5 - 1
    h, w = img.shape[1:]
    if (h, w) != (size, size):
        s = size / min(h, w)
        img = F.interpolate(img[None], size=(max(size, round(h * s)), max(size, round(w * s))), mode="bicubic",
                            align_corners=False, antialias=True)[0].clamp(-1, 1)
        top, left = (img.shape[1] - size) // 2, (img.shape[2] - size) // 2
        img = img[:, top:top + size, left:left + size]
    return img


@torch.no_grad()
def encode_images(vae, images: torch.Tensor) -> torch.Tensor:
    """VAE latents, scaled as the UNet expects. The posterior mean, not a sample: a cached
    latent must be one fixed tensor (SD's VAE posterior std is tiny next to its mean)."""
    return vae.encode(images.to(vae.device, vae.dtype)).latent_dist.mean * vae.config.scaling_factor


def cached(fn, items: list, folder: Path, name: str, dist: C.Dist, chunk: int = 512) -> torch.Tensor:
    """fn(list of items) -> tensor, computed once per chunk of items and kept as safetensors
    files; ranks share the chunks round-robin and then all read all of them."""
    from safetensors.torch import load_file, save_file
    files = [folder / f"{name}-{c:05d}.safetensors" for c in range(0, len(items), chunk)]
    for n, f in enumerate(files):
        if n % dist.world_size == dist.rank and not f.exists():
            folder.mkdir(parents=True, exist_ok=True)
            tmp = f.with_suffix(f".tmp{dist.rank}")
            save_file({"x": fn(items[n * chunk:(n + 1) * chunk]).float().cpu().contiguous()}, str(tmp))
            tmp.replace(f)
    if dist.enabled:
        torch.distributed.barrier()
    return torch.cat([load_file(str(f))["x"] for f in files])


def build_caches(args, pairs, vae, text_encoder, tokenizer, out: Path, dist: C.Dist, size: int):
    """Latents of every image and embeddings of every prompt, each computed exactly once."""
    files = sorted({p[s]["file"] for p in pairs for s in ("w", "l")})
    prompts = sorted({p["prompt"] for p in pairs})
    key = hashlib.sha1("\n".join([str(args.model), str(size), *files, *prompts]).encode()).hexdigest()[:12]
    folder = out / "cache" / key

    def embed(batch):
        ids = tokenizer(batch, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(text_encoder.device)
        with torch.no_grad():
            return text_encoder(ids)[0]

    latents = cached(lambda b: encode_images(vae, torch.stack([load_image(f, size) for f in b])), files, folder,
                     "latents", dist, chunk=256)
    text = cached(embed, prompts, folder, "text", dist, chunk=256)
    file_index = {f: i for i, f in enumerate(files)}
    prompt_index = {p: i for i, p in enumerate(prompts)}
    index = torch.tensor([[file_index[p["w"]["file"]], file_index[p["l"]["file"]], prompt_index[p["prompt"]]]
                          for p in pairs])
    return latents, text, index


# ---------------------------------------------------------------------------------------
# The loss of one batch of pairs (Eqs. 5 and 9)
# ---------------------------------------------------------------------------------------

def denoising_target(noise_scheduler, z0, noise, t):
    if noise_scheduler.config.prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(z0, noise, t)
    return noise


def denoising_errors(net, noise_scheduler, z0, t, noise, emb, autocast) -> torch.Tensor:
    """Per-image mean squared error of `net`'s denoising prediction at step t (in fp32)."""
    x_t = noise_scheduler.add_noise(z0, noise, t)
    with autocast():
        pred = net(x_t.to(net.dtype), t, emb.to(net.dtype)).sample
    return (pred.float() - denoising_target(noise_scheduler, z0, noise, t)).pow(2).mean(dim=(1, 2, 3))


def dpo_pair_losses(unet, ref, noise_scheduler, z_w, z_l, emb, t, noise, beta: float, autocast):
    """Per-pair Diffusion-DPO losses, with Δ_θ and Δ_ref for logging. Winner and loser are
    noised with the same t and ε and go through the policy in ONE forward of 2b samples."""
    args = (noise_scheduler, torch.cat([z_w, z_l]), torch.cat([t, t]), torch.cat([noise, noise]), torch.cat([emb, emb]))
    err_w, err_l = denoising_errors(unet, *args, autocast).chunk(2)
    with torch.no_grad(), (reference_mode(unet) if ref is None else contextlib.nullcontext(ref)) as r:
        ref_w, ref_l = denoising_errors(r, *args, autocast).chunk(2)
    _, per_pair = C.diffusion_dpo_loss(err_w, err_l, ref_w, ref_l, beta)   # Eq. 5 / 9
    return per_pair, (err_w - err_l).detach(), (ref_w - ref_l).detach()


# ---------------------------------------------------------------------------------------
# The Dynamic Focusing Mechanism (Sec. 4.3): the augmentation pool and Eq. 11's choice
# ---------------------------------------------------------------------------------------

def sharpen(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Unsharp mask on pixels in [-1, 1]: x + a·(x − blur(x))."""
    amount = 0.5 + torch.rand(1, generator=g).item()
    blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    return (x + amount * (x - blur)).clamp(-1, 1)


def color_jitter(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Brightness, contrast and saturation factors in [0.8, 1.2], the same for both images."""
    b, c, s = (0.8 + 0.4 * torch.rand(3, generator=g)).tolist()
    x = (x + 1) / 2 * b
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * c + mean
    grey = x.mean(dim=1, keepdim=True)
    return (((x - grey) * s + grey).clamp(0, 1)) * 2 - 1


def frequency_compensation(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Boost the upper frequency band (radial frequency >= 0.25 cycles/pixel, up to Nyquist)
    by a gain in [1.2, 1.6]: generated images lose high-band energy; this gives detail back."""
    gain = 1.2 + 0.4 * torch.rand(1, generator=g).item()
    f = torch.fft.rfft2(x)
    fy = torch.fft.fftfreq(x.shape[-2]).abs().view(-1, 1)
    fx = torch.fft.rfftfreq(x.shape[-1]).view(1, -1)
    band = (torch.sqrt(fy ** 2 + fx ** 2) >= 0.25).to(x.dtype)
    return torch.fft.irfft2(f * (1 + (gain - 1) * band), s=x.shape[-2:]).clamp(-1, 1)


def latent_noise_erase(z: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Gaussian noise of std 0.1 on the latents plus one erased (zeroed) patch of 1/16 area."""
    z = z + 0.1 * torch.randn(z.shape[1:], generator=g).to(z)
    h, w = z.shape[-2:]
    ph, pw = max(1, h // 4), max(1, w // 4)
    y0, x0 = (torch.randint(h - ph + 1, (1,), generator=g).item(), torch.randint(w - pw + 1, (1,), generator=g).item())
    z = z.clone()
    z[..., y0:y0 + ph, x0:x0 + pw] = 0
    return z


def augment(name: str, pair: dict, z: torch.Tensor, vae, size: int, g: torch.Generator) -> torch.Tensor:
    """Both images of a pair [2, C, h, w] (winner, loser) under one augmentation with shared
    parameters: pixel-space ones decode nothing — they start from the PNGs and re-encode."""
    if name == "latent_noise_erase":
        return latent_noise_erase(z, g)
    pixels = torch.stack([load_image(pair[s]["file"], size) for s in ("w", "l")])
    fn = {"sharpen": sharpen, "color_jitter": color_jitter, "frequency_compensation": frequency_compensation}[name]
    return encode_images(vae, fn(pixels, g)).to(z)


def per_sample_grads(module, inputs: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """[N, P] gradients of a Conv2d or Linear layer's weight and bias, one row per sample,
    from the layer's input and the gradient at its output (both [N, ...]) of ONE backward.
    Exact because each sample's loss depends on its own rows only (no batch statistics)."""
    if isinstance(module, torch.nn.Conv2d):
        gw = torch.stack([torch.nn.grad.conv2d_weight(inputs[i:i + 1], module.weight.shape, grad_out[i:i + 1],
                                                    module.stride, module.padding, module.dilation, module.groups)
                        for i in range(len(inputs))])
        gb = grad_out.sum(dim=(2, 3))
    elif isinstance(module, torch.nn.Linear):
        gw = torch.einsum("n...o,n...i->noi", grad_out, inputs)
        gb = grad_out.reshape(len(grad_out), -1, grad_out.shape[-1]).sum(1)
    else:
        raise TypeError(f"DFM gradients need Conv2d or Linear modules, got {type(module).__name__}")
    return torch.cat([gw.flatten(1), (gb if module.bias is not None else gb[:, :0])], dim=1).float()


def dfm_augmented_copies(unet, noise_scheduler, modules, hard, args, vae, size, autocast):
    """Eq. 11 for all hard pairs of this rank at once: a* = argmax_a (1 − cos(g_i, g_i^a)).

    `hard` holds (pair, z [2, C, h, w], emb [1, L, D], t [1], noise [1, C, h, w], generator).
    Every pair and its four augmentations go through ONE forward, and one backward reaches
    the named `modules` (--dfm-modules, by default the output convolution); the gradient of
    each variant over those modules' weights is then read off per sample. Since
    ∂L_DPO/∂θ = β/2·σ(·)·∂Δ_θ/∂θ, a positive multiple of ∂Δ_θ/∂θ, the cosine needs
    neither the reference network nor β. Returns, per hard pair, (chosen index, latents)."""
    n = 1 + len(AUGMENTATIONS)
    variants = [torch.stack([z] + [augment(a, pair, z, vae, size, g) for a in AUGMENTATIONS])
                for pair, z, _, _, _, g in hard]                                  # H x [n, 2, C, h, w]
    zz = torch.cat(variants)

    def repeat(k):  # field k of each hard pair, once per variant, for the winners then the losers
        x = torch.cat([h[k].expand(n, *h[k].shape[1:]) for h in hard])
        return torch.cat([x, x])

    seen = {}
    hooks = [m.register_forward_hook(lambda m, i, o: seen.__setitem__(m, (i[0], o))) for m in modules]
    try:
        err = denoising_errors(unet, noise_scheduler, torch.cat([zz[:, 0], zz[:, 1]]), repeat(3), repeat(4),
                               repeat(2), autocast)
    finally:
        for h in hooks:
            h.remove()
    delta = err[:len(zz)] - err[len(zz):]                                        # Δ_θ of every variant
    grad_out = torch.autograd.grad(delta.sum(), [seen[m][1] for m in modules])
    g = torch.cat([per_sample_grads(m, seen[m][0].detach(), go) for m, go in zip(modules, grad_out)], dim=1)
    g = g[:len(zz)] + g[len(zz):]                                                # winner + loser rows
    picks = []
    for h in range(len(hard)):
        a = C.choose_augmentation(g[h * n], g[h * n + 1:(h + 1) * n])
        picks.append((a, variants[h][1 + a]))
    return picks


# ---------------------------------------------------------------------------------------
# Saving: checkpoints for exact resume, and the final model as stock diffusers folders
# ---------------------------------------------------------------------------------------

def trainable_state(unet, lora: bool) -> dict:
    if lora:
        from peft import get_peft_model_state_dict
        return get_peft_model_state_dict(unet)
    return unet.state_dict()


def load_trainable_state(unet, state: dict, lora: bool) -> None:
    if lora:
        from peft import set_peft_model_state_dict
        set_peft_model_state_dict(unet, state)
    else:
        unet.load_state_dict(state)


def replace_dir(tmp: Path, final: Path) -> None:
    """Swap a finished folder into place (the old one, if any, is removed after the swap)."""
    old = final.with_name(final.name + ".old")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def save_final(args, unet, out: Path) -> None:
    """The aligned model as a stock StableDiffusionPipeline folder; LoRA also as its own
    weights file that `pipe.load_lora_weights(out / "lora")` loads onto the base model."""
    from diffusers import StableDiffusionPipeline
    pipe = C.load_pipeline(args.model)
    if args.lora_rank > 0:
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft import get_peft_model_state_dict
        tmp = out / ".lora.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        StableDiffusionPipeline.save_lora_weights(
            tmp, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)))
        replace_dir(tmp, out / "lora")
        pipe.load_lora_weights(out / "lora")
        pipe.fuse_lora()
        pipe.unload_lora_weights()
    else:
        pipe.unet.load_state_dict(unet.state_dict())
    tmp = out / ".model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp)
    replace_dir(tmp, out / "model")


# ---------------------------------------------------------------------------------------
# The training loop
# ---------------------------------------------------------------------------------------

def main():
    args = parse()
    t0 = time.time()
    dist = C.setup_distributed(args.device)
    C.seed_everything(args.seed)
    hf, world = C.stage_dir(args.run, "hf"), C.stage_dir(args.run, "world")
    args.model = args.model or str(world / "model")
    args.name = args.name or args.objective
    out = Path(args.run) / args.name
    C.require_inputs([hf / "hf_pairs.jsonl"], "hf")
    per_rank, rem = divmod(args.batch, dist.world_size)
    micro = args.micro_batch or per_rank
    if rem or per_rank % micro:
        raise SystemExit(f"--batch {args.batch} must split evenly over {dist.world_size} processes "
                         f"and then into micro-batches of {micro}")
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        C.save_config(args, out, world_size=dist.world_size, grad_accum=per_rank // micro)

    # Eqs. 6-8: relabel every pair by the composite reward (or by −C for the baseline)
    raw, n_bad = load_hf_pairs(hf / "hf_pairs.jsonl", args.skip_bad)
    pairs, n_dropped = preference_pairs(raw, args.objective, args.lam, args.margin)
    if len(pairs) < args.batch:
        raise C.DataError(f"{hf / 'hf_pairs.jsonl'}: {len(pairs)} pairs left after relabelling "
                          f"({n_dropped} dropped, {n_bad} bad rows), fewer than one batch of {args.batch}")
    hs = [p for p in pairs if p["kind"] == "harmful-safe"]
    safe_won = sum(p["w"]["role"] == "safe" for p in hs) / max(1, len(hs))
    C.log(f"{len(pairs)} pairs after relabelling (objective {args.objective}, λ={args.lam}); "
          f"{n_dropped} dropped, {n_bad} bad rows skipped; the safe image wins {safe_won:.1%} of harmful-safe "
          f"pairs; {dist.world_size} process(es), "
          f"{per_rank // micro} micro-batch(es) of {micro} per process")

    device = dist.device
    unet, ref, vae, text_encoder, tokenizer, noise_scheduler = load_models(args, device)
    size = unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
    latents, text, index = build_caches(args, pairs, vae, text_encoder, tokenizer, out, dist, size)
    text_encoder.cpu()  # done with it: the cache holds every embedding
    params = [p for p in unet.parameters() if p.requires_grad]
    named = dict(unet.named_modules())
    if args.dfm == "on" and not all(m in named for m in args.dfm_modules):
        raise SystemExit(f"--dfm-modules: no module {sorted(set(args.dfm_modules) - set(named))} in the UNet")
    dfm_modules = [named[m] for m in args.dfm_modules]
    opt = C.adamw(params, lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, args.warmup)))
    queue = C.DescentRateQueue(args.dfm_k, args.dfm_tau, args.dfm_patience)
    use_bf16 = args.bf16 and device.type == "cuda"
    autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()

    ckpt = C.Checkpoint(out / "ckpt" / "train_state.pt")
    state, step, totals = ckpt.load(), 0, {"dfm_flagged": 0, "aug_wins": dict.fromkeys(AUGMENTATIONS, 0)}
    if state:
        load_trainable_state(unet, state["model"], args.lora_rank > 0)
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        queue.load_state_dict(state["dfm"])
        step, totals = state["step"], state["totals"]
        C.log(f"resumed from {ckpt.path} at step {step}")
        if dist.is_main and (out / "log.jsonl").exists():  # forget rows of steps about to be redone
            C.write_jsonl(out / "log.jsonl", [r for r in C.read_jsonl(out / "log.jsonl") if r["step"] <= step])

    sampler = torch.utils.data.DistributedSampler(range(len(pairs)), num_replicas=dist.world_size, rank=dist.rank,
                                                  shuffle=True, seed=args.seed, drop_last=True)
    steps_per_epoch = len(sampler) // per_rank
    log = C.MetricsLog(out / "log.jsonl")
    bar = tqdm(total=args.steps, initial=step, desc=f"{args.name}", disable=not dist.is_main)
    while step < args.steps:
        if args.stop_after is not None and step >= args.stop_after:
            raise SystemExit(f"stopped after {step} steps (--stop-after); run again to resume")
        epoch, k = divmod(step, steps_per_epoch)
        sampler.set_epoch(epoch)
        mine = list(sampler)[k * per_rank:(k + 1) * per_rank]     # this rank's pairs of the global batch
        # the global batch's timesteps and noise, drawn from (seed, step); rank r holds global
        # positions r, r + N, r + 2N, ... (DistributedSampler's interleaving)
        g = C.step_generator(args.seed, step)
        t_all = torch.randint(0, noise_scheduler.config.num_train_timesteps, (args.batch,), generator=g)
        noise_all = torch.randn((args.batch, *latents.shape[1:]), generator=g)
        t_mine, noise_mine = t_all[dist.rank::dist.world_size], noise_all[dist.rank::dist.world_size]

        # 1. the pairs of this step, in micro-batches; loss weight 1/batch, summed over ranks
        opt.zero_grad(set_to_none=True)
        losses, d_theta, d_ref = [], [], []
        for m in range(0, per_rank, micro):
            sl = slice(m, m + micro)
            idx = index[mine[sl]]
            per_pair, dt, dr = dpo_pair_losses(
                unet, ref, noise_scheduler, latents[idx[:, 0]].to(device), latents[idx[:, 1]].to(device),
                text[idx[:, 2]].to(device), t_mine[sl].to(device), noise_mine[sl].to(device), args.beta, autocast)
            (per_pair.sum() / args.batch).backward()
            losses.append(per_pair.detach())
            d_theta.append(dt)
            d_ref.append(dr)
        losses, d_theta, d_ref = (torch.cat(x).float().cpu() for x in (losses, d_theta, d_ref))

        # every rank sees every pair's loss: NaN stops all of them, DFM queues stay identical
        ids_all = C.all_gather_cat(torch.tensor(mine))
        losses_all, dt_all, dr_all = (C.all_gather_cat(x) for x in (losses, d_theta, d_ref))
        if not torch.isfinite(losses_all).all():
            raise FloatingPointError(f"non-finite DPO loss at step {step}; the last good checkpoint is "
                                     f"{ckpt.path if ckpt.path.exists() else '(none yet)'}")

        # 2. DFM (Eqs. 10-11): hard pairs of this batch get an augmented copy in this batch
        n_aug = 0
        if args.dfm == "on":
            hard_ids = set(queue.update(ids_all.tolist(), losses_all))
            totals["dfm_flagged"] += len(hard_ids)
            hard = [(j, i) for j, i in enumerate(mine) if i in hard_ids]
            chosen = torch.zeros(len(AUGMENTATIONS), dtype=torch.long)
            if hard:
                js = [j for j, _ in hard]
                picks = dfm_augmented_copies(unet, noise_scheduler, dfm_modules, [
                    (pairs[i], latents[index[i, :2]].to(device), text[index[i, 2]][None].to(device),
                     t_mine[j:j + 1].to(device), noise_mine[j:j + 1].to(device),
                     C.step_generator(args.seed, step, stream=1 + j * dist.world_size + dist.rank))  # global position
                    for j, i in hard], args, vae, size, autocast)
                for a, _ in picks:
                    chosen[a] += 1
                # the augmented copies join this batch: one forward, weighted like any pair of it
                z = torch.stack([z for _, z in picks])
                per_pair, _, _ = dpo_pair_losses(
                    unet, ref, noise_scheduler, z[:, 0], z[:, 1], text[index[[i for _, i in hard], 2]].to(device),
                    t_mine[js].to(device), noise_mine[js].to(device), args.beta, autocast)
                (per_pair.sum() / args.batch).backward()
            chosen = C.all_gather_cat(chosen[None]).sum(0)
            n_aug = int(chosen.sum())
            for a, n in zip(AUGMENTATIONS, chosen.tolist()):
                totals["aug_wins"][a] += n

        # 3. one gradient sum over ranks; rescale to the mean over the batch and its copies
        C.allreduce_gradients(params)
        if n_aug:
            for p in params:
                p.grad.mul_(args.batch / (args.batch + n_aug))
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        opt.step()
        sched.step()
        step += 1
        bar.update(1)

        acc = (dt_all < dr_all).float().mean().item()  # implicit accuracy: the policy prefers x_w more than ref
        if step % args.log_every == 0 or step == args.steps:
            log.write(step=step, loss=losses_all.mean().item(), implicit_accuracy=acc,
                      reward_margin=(-0.5 * args.beta * (dt_all - dr_all)).mean().item(), lr=sched.get_last_lr()[0],
                      grad_norm=float(grad_norm), dfm_hard=n_aug, dfm_flagged_total=totals["dfm_flagged"])
            bar.set_postfix(loss=f"{losses_all.mean().item():.4f}", acc=f"{acc:.2f}")
        if dist.is_main and (step % args.ckpt_every == 0 or step == args.steps):
            ckpt.save({"model": trainable_state(unet, args.lora_rank > 0), "opt": opt.state_dict(),
                       "sched": sched.state_dict(), "dfm": queue.state_dict(), "step": step, "totals": totals,
                       "rng": torch.get_rng_state()})
    bar.close()

    if dist.is_main:
        save_final(args, unet, out)
        # headline figures: the mean over the logged steps of the last tenth of training
        rows = {r["step"]: r for r in C.read_jsonl(out / "log.jsonl")}
        last = [r for s, r in rows.items() if s > 0.9 * args.steps] or [rows[max(rows)]]
        metrics = {"final_loss": float(np.mean([r["loss"] for r in last])),
                   "implicit_accuracy": float(np.mean([r["implicit_accuracy"] for r in last])),
                   "safe_side_wins_harmful_safe": safe_won,
                   "pairs_dropped": n_dropped, "dfm_flagged": totals["dfm_flagged"], "aug_wins": totals["aug_wins"],
                   "n_pairs": len(pairs), "bad_rows_skipped": n_bad, "objective": args.objective, "lam": args.lam,
                   "world_size": dist.world_size, "seconds": round(time.time() - t0, 1)}
        C.atomic_write_json(out / "metrics.json", metrics)
        C.log(C.format_metrics(metrics))
    C.cleanup_distributed()


if __name__ == "__main__":
    main()
