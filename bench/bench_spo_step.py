"""Throughput of the stage-4 SPO training step: the optimised step of 04_train_spo.py against
a naive step of the same maths, in the same process, on the same batch, noise and timesteps.

  optimised (what 04_train_spo.py does): VAE latents and text embeddings cached once before
      training; winner and loser through the policy in ONE concatenated forward; the frozen
      reference in one no-grad forward (bf16 on GPU with the sd15 preset; LoRA: the same UNet
      with its adapters off).
  naive (Diffusion-DPO's public code): the VAE encodes both images and the
      text encoder embeds the prompt at every step; winner and loser in separate policy
      forwards; a separate full-precision (fp32) reference, also in two forwards.

Both then take the same backward, gradient clipping and AdamW step, from the same initial
weights, so their per-step losses agree up to float rounding (printed as a check). Each phase
builds its models, runs --warmup untimed steps, then times --steps steps. Pairs per second is
batch × steps / time; peak memory is torch.cuda.max_memory_allocated on GPU and the process's
peak RSS (VmHWM, reset per phase through /proc/self/clear_refs) on CPU. The one-off cache
cost of the optimised step is printed apart. With --dfm on, a third phase runs the optimised
step with the Dynamic Focusing Mechanism (Eqs. 10-11) at --dfm-tau and reports the share of
step time spent choosing and training the augmented copies.

Data: the relabelled pairs of RUN/hf/hf_pairs.jsonl and the model RUN/world/model (default
runs/t34), or, where those are absent or with --random-weights, drawn toy images and prompts
and the preset's architecture with random weights (toy: stage 0's models; sd15: SD-1.5's
configs, 860M-parameter UNet, at --resolution) — the step's cost does not depend on the
weights, so a machine without the checkpoints (or without internet) can still measure it.
The batch is the same --batch pairs at every step (a seeded draw), so the DFM queues fill as
they do over epochs of training.

    python bench/bench_spo_step.py                                   # toy preset, CPU
    python bench/bench_spo_step.py --preset sd15 --random-weights --device cuda    # SD-1.5 at 512 px
    python bench/bench_spo_step.py --preset sd15 --run runs/sd15 --model PATH --device cuda

The last line printed is `speedup <optimised / naive pairs per second>`.
"""
import argparse
import contextlib
import gc
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common as C  # noqa: E402
from lib import data as D  # noqa: E402
from lib import models as M  # noqa: E402
from lib import toyworld as W  # noqa: E402
from lib import utils as U  # noqa: E402


SPO = U.load_script("04_train_spo.py")  # also installs the spo presets


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--run", default="runs/t34", help="run folder with hf/ (and world/model); random data if absent")
    p.add_argument("--preset", default="toy", choices=["toy", "sd15"])
    p.add_argument("--model", help="T2I model folder (default: RUN/world/model)")
    p.add_argument("--random-weights", action="store_true",
                   help="time the preset's architecture with random weights on drawn pairs (no --run, no "
                        "download): toy = stage 0's models, sd15 = SD-1.5's configs at --resolution")
    p.add_argument("--resolution", type=int, default=512, help="pixels, with --random-weights --preset sd15")
    p.add_argument("--batch", type=int, help="pairs per step (default: the preset's)")
    p.add_argument("--micro-batch", type=int, help="pairs per forward (default: the preset's)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per phase")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before timing, per phase")
    p.add_argument("--rounds", type=int, default=3, help="times each phase is built and timed, alternating; "
                                                           "the median pairs/s is reported")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--lora-rank", type=int, help="default: the preset's (0, full fine-tuning)")
    p.add_argument("--dfm", choices=["on", "off"], default="off", help="also measure the DFM overhead")
    p.add_argument("--dfm-tau", type=float, help="τ of Eq. 10 for the DFM phase (default: the preset's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the figures to this JSON file")
    a = p.parse_args(argv)
    cfg = argparse.Namespace(**U.preset_defaults(a.preset, "spo", False))
    for k in ("model", "batch", "micro_batch", "lora_rank", "dfm_tau"):
        if getattr(a, k) is not None:
            setattr(cfg, k, getattr(a, k))
    cfg.micro_batch = cfg.micro_batch or cfg.batch
    if cfg.batch % cfg.micro_batch:
        raise SystemExit(f"--batch {cfg.batch} must split into micro-batches of {cfg.micro_batch}")
    return a, cfg


# ---------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------

def random_toy_models(**flags):
    """Stage 0's tokenizer, VAE, text encoder and UNet with random weights (no training);
    `flags` override the toy preset's stage-0 flags (e.g. unet_channels="32,64")."""
    world = U.load_script("00_toy_world.py")
    torch.manual_seed(0)
    return world.build_models(argparse.Namespace(**{**U.preset_defaults("toy", "world", False), **flags}))


def random_toy_model(folder: Path) -> Path:
    """Stage 0's architecture with random weights as a pipeline folder: enough to time a step."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    tokenizer, vae, text_encoder, unet = random_toy_models()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                           beta_end=0.012, clip_sample=False),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


def sd15_random_pipeline(folder: Path, sample_size: int = 64) -> Path:
    """A stock StableDiffusionPipeline folder with SD-1.5's architecture and random weights: the
    configs of stable-diffusion-v1-5/stable-diffusion-v1-5 written out (UNet 860M parameters, VAE,
    CLIP ViT-L/14 text tower, PNDM scheduler); sample_size 64 is its 512×512 pixels."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        act_fn="silu", norm_num_groups=32, norm_eps=1e-5, center_input_sample=False, downsample_padding=1,
        flip_sin_to_cos=True, freq_shift=0, mid_block_scale_factor=1)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, act_fn="silu",
        norm_num_groups=32, sample_size=sample_size * 8, scaling_factor=0.18215)
    text_encoder = CLIPTextModel(CLIPTextConfig(  # openai/clip-vit-large-patch14's text tower
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, layer_norm_eps=1e-5,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=1))
    scheduler = PNDMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", set_alpha_to_one=False, skip_prk_steps=True,
                              steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=M.clip_tokenizer(), unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


def random_pairs(folder: Path, n: int, seed: int) -> list[dict]:
    """n drawn harmful→safe pairs of the toy world (the harmful render wins nothing here:
    which side is x_w does not change the cost of a step)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    pairs = []
    for i in range(n):
        s = W.random_scene(rng, "harmful")
        files = {}
        for side, harm in (("w", False), ("l", True)):
            scene = W.Scene(s) if harm else W.Scene(s, severity=0, concept=None, category=None)
            files[side] = {"file": str(folder / f"{i:05d}{side}.png")}
            U.save_png(files[side]["file"], W.render(scene))
        pairs.append({"id": f"rand-{i:05d}", "kind": "harmful-safe", "prompt": W.scene_to_prompt(s), **files})
    return pairs


def load_data(a, cfg, work: Path) -> tuple[list[dict], str]:
    hf = Path(a.run) / "hf" / "hf_pairs.jsonl"
    if a.random_weights:
        if a.preset == "sd15":
            cfg.model = str(sd15_random_pipeline(work / "model", a.resolution // 8))
        else:
            cfg.model = str(random_toy_model(work / "model"))
        pairs = random_pairs(work / "images", max(64, cfg.batch), a.seed)
        return pairs, f"{len(pairs)} drawn toy pairs, random weights"
    if hf.exists():
        raw, _ = D.load_hf_pairs(hf, skip_bad=True)
        pairs, _ = SPO.preference_pairs(raw, "spo", cfg.lam, cfg.margin)
        cfg.model = cfg.model or str(Path(a.run) / "world" / "model")
        return pairs, f"{len(pairs)} relabelled pairs of {hf}"
    if cfg.model is None:
        if a.preset != "toy":
            raise SystemExit(f"no {hf}: pass --model PATH (an SD-1.5 folder), or --random-weights")
        cfg.model = str(random_toy_model(work / "model"))
    pairs = random_pairs(work / "images", max(64, cfg.batch), a.seed)
    return pairs, f"{len(pairs)} drawn toy pairs (no {hf})"


# ---------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------

class Meter:
    """Wall time with device synchronisation, and peak memory of one phase."""

    def __init__(self, device: torch.device):
        self.device = device

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def now(self) -> float:
        self.sync()
        return time.perf_counter()

    def reset_peak(self):
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            with contextlib.suppress(OSError):  # Linux: "5" resets the peak RSS (VmHWM) to the current RSS
                Path("/proc/self/clear_refs").write_text("5")

    def current(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        with contextlib.suppress(OSError):
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def peak(self) -> tuple[float, str]:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device), "peak GPU memory allocated"
        with contextlib.suppress(OSError):
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024, "peak RSS"
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak RSS (whole process)"


# ---------------------------------------------------------------------------------------
# The two steps
# ---------------------------------------------------------------------------------------

class Phase:
    """Models, optimizer and the fixed batch of one measured phase."""

    def __init__(self, cfg, pairs, sel, device, naive: bool, work: Path, dfm: bool = False):
        self.cfg, self.pairs, self.sel, self.device, self.naive, self.dfm = cfg, pairs, sel, device, naive, dfm
        load_cfg = argparse.Namespace(**vars(cfg))
        if naive:
            load_cfg.bf16 = False  # load_training_models' reference dtype: the naive reference is fp32
        unet, ref, vae, prompt_encoder, sched = M.load_training_models(load_cfg, device, frozen_unet=False)
        if naive and ref is None:  # LoRA: the naive step keeps a separate fp32 reference UNet
            from diffusers import UNet2DConditionModel
            ref = UNet2DConditionModel.from_pretrained(cfg.model, subfolder="unet")
            ref = ref.requires_grad_(False).eval().to(device)
        self.unet, self.ref, self.vae, self.sched = unet, ref, vae, sched
        self.prompt_encoder = prompt_encoder
        self.size = unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
        use_bf16 = cfg.bf16 and device.type == "cuda"
        self.autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()
        self.params = [p for p in unet.parameters() if p.requires_grad]
        self.opt = U.adamw(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.lr_sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup)))
        batch = [pairs[i] for i in sel]
        self.cache_seconds = 0.0
        if naive:  # decoded pixels in memory (not counted); VAE and text encoder run every step
            self.pixels = {s: torch.stack([M.load_image(p[s]["file"], self.size) for p in batch]) for s in ("w", "l")}
            self.prompts = [p["prompt"] for p in batch]
        else:     # what 04 does before training: every latent and embedding computed once
            t0 = time.perf_counter()
            dist = U.Dist(0, 1, 0, device)
            self.latents, self.text, self.index = M.build_caches(cfg, batch, vae, prompt_encoder,
                                                                 work / ("cache-" + str(id(self))), dist, self.size)
            self.cache_seconds = time.perf_counter() - t0
            self.n_cached = (len(self.latents), len(self.text))
            prompt_encoder.cpu()
        if dfm:
            self.dfm_modules = M.dfm_layers(unet, cfg)  # the LoRA factors under --lora-rank
            self.queue = C.DescentRateQueue(cfg.dfm_k, cfg.dfm_tau, cfg.dfm_patience)
        self.dfm_seconds, self.dfm_train_seconds, self.dfm_hard, self.encode_seconds = 0.0, 0.0, 0, 0.0
        self.meter = Meter(device)

    def noise(self, step: int):
        g = U.step_generator(self.cfg.seed, step)
        t = torch.randint(0, self.sched.config.num_train_timesteps, (self.cfg.batch,), generator=g)
        lat_shape = (self.unet.config.in_channels, self.unet.config.sample_size, self.unet.config.sample_size)
        return t, torch.randn((self.cfg.batch, *lat_shape), generator=g)

    def step(self, step: int, meter: Meter) -> torch.Tensor:
        cfg, dev = self.cfg, self.device
        t_all, noise_all = self.noise(step)
        self.opt.zero_grad(set_to_none=True)
        losses = []
        for m in range(0, cfg.batch, cfg.micro_batch):
            sl = slice(m, m + cfg.micro_batch)
            t, noise = t_all[sl].to(dev), noise_all[sl].to(dev)
            per_pair = (self.naive_losses if self.naive else self.optimised_losses)(sl, t, noise)
            (per_pair.sum() / cfg.batch).backward()
            losses.append(per_pair.detach())
        losses = torch.cat(losses).float().cpu()
        n_aug = self.dfm_step(step, losses, t_all, noise_all, meter) if self.dfm else 0
        if n_aug:
            for p in self.params:
                p.grad.mul_(cfg.batch / (cfg.batch + n_aug))
        torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
        self.opt.step()
        self.lr_sched.step()
        return losses

    def optimised_losses(self, sl, t, noise):
        """04_train_spo.py's step: cached latents and embeddings, one policy forward of 2b."""
        idx = self.index[sl]
        per_pair, _, _ = C.dpo_pair_losses(
            self.unet, self.ref, self.sched, self.latents[idx[:, 0]].to(self.device),
            self.latents[idx[:, 1]].to(self.device), self.text[idx[:, 2]].to(self.device), t, noise,
            self.cfg.beta, self.autocast)
        return per_pair

    def naive_losses(self, sl, t, noise):
        """The same loss the naive way: VAE + text encoder now, winner and loser apart, fp32 reference."""
        t0 = self.meter.now()
        z_w = M.encode_images(self.vae, self.pixels["w"][sl])
        z_l = M.encode_images(self.vae, self.pixels["l"][sl])
        emb = self.prompt_encoder(self.prompts[sl], self.size)
        self.encode_seconds += self.meter.now() - t0
        err_w = C.denoising_errors(self.unet, self.sched, z_w, t, noise, emb, self.autocast)
        err_l = C.denoising_errors(self.unet, self.sched, z_l, t, noise, emb, self.autocast)
        with torch.no_grad():
            ref_w = C.denoising_errors(self.ref, self.sched, z_w, t, noise, emb, contextlib.nullcontext)
            ref_l = C.denoising_errors(self.ref, self.sched, z_l, t, noise, emb, contextlib.nullcontext)
        _, per_pair = C.diffusion_dpo_loss(err_w, err_l, ref_w, ref_l, self.cfg.beta)
        return per_pair

    def dfm_step(self, step, losses, t_all, noise_all, meter) -> int:
        """04's DFM block: hard pairs (Eq. 10) get the augmented copy Eq. 11 picks, in this batch.
        Times apart: choosing (dfm_augmented_copies) and training the copies (their forward/backward)."""
        t0 = meter.now()
        hard_ids = set(self.queue.update(list(range(len(self.sel))), losses))
        hard = [j for j in range(len(self.sel)) if j in hard_ids]
        if hard:
            dev, batch = self.device, [self.pairs[i] for i in self.sel]
            picks = C.dfm_augmented_copies(self.unet, self.sched, self.dfm_modules, [
                C.HardPair(batch[j], self.latents[self.index[j, :2]].to(dev), self.text[self.index[j, 2]][None].to(dev),
                           t_all[j:j + 1].to(dev), noise_all[j:j + 1].to(dev),
                           U.step_generator(self.cfg.seed, step, stream=1 + j))
                for j in hard], self.vae, self.size, self.autocast)
            t1 = meter.now()
            self.dfm_seconds += t1 - t0
            z = torch.stack([z for _, z in picks])
            per_pair, _, _ = C.dpo_pair_losses(self.unet, self.ref, self.sched, z[:, 0], z[:, 1],
                                                 self.text[self.index[hard, 2]].to(dev), t_all[hard].to(dev),
                                                 noise_all[hard].to(dev), self.cfg.beta, self.autocast)
            (per_pair.sum() / self.cfg.batch).backward()
            self.dfm_train_seconds += meter.now() - t1
        else:
            self.dfm_seconds += meter.now() - t0
        self.dfm_hard += len(hard)
        return len(hard)


def release_memory():
    """Collect garbage and hand freed heap back to the OS (glibc), so that one phase's peak
    RSS does not include what an earlier phase freed."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def measure(name, a, cfg, pairs, sel, device, work, naive, dfm=False) -> dict:
    """Build one phase's models, warm up, time a.steps steps; free everything again."""
    meter = Meter(device)
    base = meter.current()
    U.seed_everything(a.seed)  # the same initial weights (LoRA adapters included) in every phase
    ph = Phase(cfg, pairs, sel, device, naive, work, dfm)
    release_memory()
    meter.reset_peak()  # from here: resident models and optimizer, plus what the steps allocate
    losses = [ph.step(s, meter) for s in range(a.warmup)]
    ph.dfm_seconds, ph.dfm_train_seconds, ph.dfm_hard, ph.encode_seconds = 0.0, 0.0, 0, 0.0
    t0 = meter.now()
    losses += [ph.step(a.warmup + s, meter) for s in range(a.steps)]
    seconds = meter.now() - t0
    peak, peak_what = meter.peak()
    r = {"phase": name, "pairs_per_s": cfg.batch * a.steps / seconds, "s_per_step": seconds / a.steps,
         "peak_bytes": peak, "peak_above_start_bytes": peak - base, "peak_what": peak_what,
         "cache_seconds": ph.cache_seconds, "losses": torch.stack(losses).tolist()}
    if naive:
        r["encode_share"] = ph.encode_seconds / seconds
    else:
        r["cached"] = ph.n_cached
    if dfm:
        r.update(dfm_share=ph.dfm_seconds / seconds, dfm_train_share=ph.dfm_train_seconds / seconds,
                 dfm_hard_per_step=ph.dfm_hard / a.steps)
    del ph
    release_memory()
    return r


def summarise(rounds: list[dict]) -> dict:
    """One phase over all rounds: median throughput, largest peak, mean shares."""
    r = dict(rounds[0])
    r["pairs_per_s_rounds"] = [x["pairs_per_s"] for x in rounds]
    r["pairs_per_s"] = float(np.median(r["pairs_per_s_rounds"]))
    r["s_per_step"] = float(np.median([x["s_per_step"] for x in rounds]))
    for k in ("peak_bytes", "peak_above_start_bytes"):
        r[k] = max(x[k] for x in rounds)
    for k in ("encode_share", "dfm_share", "dfm_train_share", "dfm_hard_per_step"):
        if k in r:
            r[k] = float(np.mean([x[k] for x in rounds]))
    return r


def main(argv=None):
    a, cfg = parse(argv)
    cfg.seed = a.seed
    device = M.pick_device(a.device)
    if cfg.bf16 and device.type != "cuda":
        cfg.bf16 = False  # as 04: bf16 autocast is GPU-only
    U.seed_everything(a.seed)
    with tempfile.TemporaryDirectory(prefix="bench-spo-") as tmp:
        work = Path(tmp)
        pairs, source = load_data(a, cfg, work)
        if len(pairs) < cfg.batch:
            raise SystemExit(f"{source}: fewer than one batch of {cfg.batch}")
        sel = random.Random(a.seed).sample(range(len(pairs)), cfg.batch)
        where = (torch.cuda.get_device_name(device) if device.type == "cuda"
                 else f"{U.machine()}, {torch.get_num_threads()} threads")
        print(f"bench_spo_step: preset {a.preset}, {device.type} ({where}), batch {cfg.batch} pairs in micro-batches "
              f"of {cfg.micro_batch}, {'LoRA rank ' + str(cfg.lora_rank) if cfg.lora_rank else 'full fine-tuning'}, "
              f"bf16 {cfg.bf16}, grad checkpointing {cfg.grad_checkpointing}; {a.steps} timed steps after "
              f"{a.warmup} warm-up per phase, {a.rounds} round(s); data: {source}; model: {cfg.model}", flush=True)
        phases = [("optimised", False, False), ("naive", True, False)]
        if a.dfm == "on":
            phases.append(("optimised+DFM", False, True))
        results = {name: [] for name, _, _ in phases}
        if device.type == "cpu":  # load every library once, untimed, so RSS growth is models and steps only
            warm = argparse.Namespace(**{**vars(a), "steps": 1, "warmup": 1})
            for _, naive, dfm in phases:
                measure("", warm, cfg, pairs, sel, device, work, naive=naive, dfm=dfm)
        for _ in range(a.rounds):  # phases alternate, so a change in machine load hits them alike
            for name, naive, dfm in phases:
                results[name].append(measure(name, a, cfg, pairs, sel, device, work, naive=naive, dfm=dfm))
        runs = [summarise(results[name]) for name, _, _ in phases]
        opt, naive = runs[0], runs[1]
    for r in runs:
        print(f"{r['phase']:>14}: {r['pairs_per_s']:8.2f} pairs/s ({r['s_per_step'] * 1000:8.1f} ms/step; rounds "
              f"{', '.join(f'{x:.3g}' for x in r['pairs_per_s_rounds'])}), {r['peak_what']} "
              f"{r['peak_bytes'] / 2**30:.2f} GiB ({r['peak_above_start_bytes'] / 2**20:.0f} MiB above the "
              f"phase's start)"
              + (f"; DFM (τ={cfg.dfm_tau:g}, {r['dfm_hard_per_step']:.2f} hard pairs per step): choosing "
                 f"(dfm_augmented_copies) {r['dfm_share']:.1%} of step time, training the copies "
                 f"{r['dfm_train_share']:.1%}" if "dfm_share" in r else "")
              + (f"; VAE + text encoder: {r['encode_share']:.1%} of step time" if "encode_share" in r else ""),
              flush=True)
    print(f"one-off cache of the optimised step: {opt['cached'][0]} latents, {opt['cached'][1]} text embeddings "
          f"in {opt['cache_seconds']:.2f} s")
    lo, ln = np.array(opt["losses"]), np.array(naive["losses"])
    diff = float(np.abs(lo - ln).max() / max(1e-12, np.abs(ln).max()))
    print(f"check: per-pair losses of the two steps over all {len(lo)} steps agree to {diff:.1e} "
          f"(max difference / max loss; float rounding{', bf16 reference' if cfg.bf16 else ''})")
    speedup = opt["pairs_per_s"] / naive["pairs_per_s"]
    if a.json:
        U.atomic_write_json(a.json, {"args": vars(a), "config": vars(cfg), "device": where, "phases": runs,
                                     "loss_agreement": diff, "speedup": speedup})
    print(f"speedup {speedup:.2f}")
    return speedup


if __name__ == "__main__":
    main()
