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

Where the code is: the equations live in common.py part 1 (relabel_pairs, dpo_pair_losses,
DescentRateQueue, dfm_augmented_copies); this script holds the data, the models and the
loop: setup(), then train_step() with its three numbered phases until --steps, then finish().

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
import dataclasses
import hashlib
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import baselines as B
import common as C
import psa as P

C.PRESETS["toy"]["spo"] = dict(
    model=None, data="hf", categories=None, objective="spo", name=None, lam=0.15, margin=0.0, beta=100.0, lr=5e-5,
    warmup=20, steps=300, batch=16, micro_batch=None, weight_decay=0.0, max_grad_norm=1.0, lora_rank=0,
    lora_alpha=None, pair_subset=0, dfm="on", dfm_k=3, dfm_tau=0.2, dfm_patience=1, dfm_modules=["conv_out"], dfm_augmentations=list(C.AUGMENTATIONS),
    grad_checkpointing=False, bf16=False, ckpt_every=100, log_every=1, skip_bad=False, device=None,
    merge_experts=None, merge_method="comerge", merge_weight=None, merge_density=0.5, merge_calibration=64,
    baseline=None, erase_concepts=B.toy_harm_concepts(), preserve_concepts=B.toy_preserve_concepts(), esd_iterations=200,
    esd_lr=2e-4, esd_eta=2.0, esd_guidance=3.0, esd_sample_steps=C.TOY_SAMPLE_STEPS, esd_batch=1, uce_lambda=0.5,
    filter_images=3000, filter_steps=600, filter_lr=1e-3, safety_checker=None, sld_concept=None,
    psa_users_per_pair=4, psa_lam_banned=10.0, psa_fidelity=2.0, psa_tokens=1, psa_scale=1.0, psa_profile_dim=32,
    psa_llm=None, sage=None)
C.PRESETS["sd15"]["spo"] = dict(
    C.PRESETS["toy"]["spo"], model="stable-diffusion-v1-5/stable-diffusion-v1-5", beta=5000.0, lr=8e-8, warmup=500,
    steps=15000, batch=12, micro_batch=2, weight_decay=1e-2, grad_checkpointing=True, bf16=True, ckpt_every=500,
    log_every=10, dfm_k=5, dfm_patience=2, erase_concepts=["nudity"], preserve_concepts=[], esd_lr=5e-5,
    esd_sample_steps=50, safety_checker="CompVis/stable-diffusion-safety-checker", psa_fidelity=0.0,
    psa_llm="Qwen/Qwen2.5-7B-Instruct")
C.TINY["spo"] = dict(steps=8, batch=4, warmup=2, ckpt_every=4, log_every=1, dfm_k=2, dfm_patience=1, dfm_tau=10.0,
                    esd_iterations=4, esd_sample_steps=4, filter_images=60, filter_steps=5, psa_users_per_pair=2)


def parse():
    p = C.stage_parser("spo", __doc__.splitlines()[0])
    p.add_argument("--model", help="base T2I model folder; also the frozen reference (default: the stage-0 model)")
    p.add_argument("--data", help="folder under --run whose hf_pairs.jsonl to train on (stage 3's --name: hf, coprov2)")
    p.add_argument("--categories", nargs="+", help="train on the harmful-safe pairs of these harm categories only "
                                                   "(an AlignGuard safety expert; default: every pair)")
    p.add_argument("--objective", choices=["spo", "safety", "safe-wins", "psa"],
                   help="spo: R = r − λC (T2I-SPO); safety: R = −C (safety-only DPO baseline); safe-wins: the safe "
                        "image of each harmful-safe pair wins whatever the annotations (AlignGuard); psa: R_u per "
                        "user, training PSA's cross-attention adapter with the UNet frozen (psa.py)")
    p.add_argument("--name", help="output folder under --run (default: the objective), e.g. spo_lam0.5")
    p.add_argument("--lam", type=float, help="λ of Eq. 6, the weight of the safety cost in the composite reward")
    p.add_argument("--margin", type=float, help="drop pairs with |ΔR| below this (Eq. 8)")
    p.add_argument("--pair-subset", type=int,
                   help="train on N of the relabelled pairs (0: all), the same N for every --seed: a small set "
                        "trained long visits each pair often enough for Eq. 10's descent rates (make dfm)")
    p.add_argument("--beta", type=float, help="β of Eq. 5 (with its ½: the loss uses β/2)")
    p.add_argument("--lr", type=float,
                   help="the optimizer's peak learning rate. Gradients are the mean over the global --batch, so "
                        "it is the same on any number of GPUs, unscaled (the paper's '8e-8 per GPU' is 8e-8 here)")
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
    p.add_argument("--dfm-augmentations", nargs="+", choices=C.AUGMENTATIONS, help="the pool A of Eq. 11")
    p.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, help="bf16 autocast (GPU only)")
    p.add_argument("--ckpt-every", type=int)
    p.add_argument("--log-every", type=int)
    p.add_argument("--skip-bad", action=argparse.BooleanOptionalAction, help="skip (and count) bad pair rows")
    p.add_argument("--device")
    p.add_argument("--merge-experts", nargs="+", metavar="NAME",
                   help="instead of training: merge these stage-4 LoRA runs under --run into one LoRA (AlignGuard)")
    p.add_argument("--merge-method", choices=MERGES, help="comerge: common.co_merge; the rest: peft's add_weighted_adapter")
    p.add_argument("--merge-weight", type=float,
                   help="peft merges: every expert's weight (default: 1/experts for linear, an average; 1 for the "
                        "others, task arithmetic)")
    p.add_argument("--merge-density", type=float, help="peft ties and dare_ties: the share of values kept")
    p.add_argument("--merge-calibration", type=int,
                   help="comerge: pairs (of every category in --data) whose UNet inputs measure each expert's activity")
    p.add_argument("--baseline", choices=B.BASELINES,
                   help="instead of training T2I-SPO: build one of the paper's Table 2 methods into "
                        "--run/baselines/ (baselines.py): filter, sld (all three presets), esd-u, uce")
    p.add_argument("--erase-concepts", nargs="+", help="esd-u and uce: the concepts to erase")
    p.add_argument("--preserve-concepts", nargs="*", help="uce: the concepts whose keys and values must stay")
    p.add_argument("--esd-iterations", type=int)
    p.add_argument("--esd-lr", type=float, help="esd-u: Adam's learning rate (ESD's 5e-5 on SD-1.5)")
    p.add_argument("--esd-eta", type=float, help="esd-u: η, the negative guidance of the target")
    p.add_argument("--esd-guidance", type=float, help="esd-u: guidance of the frozen model sampling x_t")
    p.add_argument("--esd-sample-steps", type=int, help="esd-u: sampler steps; x_t is taken after a random number")
    p.add_argument("--esd-batch", type=int)
    p.add_argument("--uce-lambda", type=float, help="uce: λ, the weight keeping W' near W")
    p.add_argument("--filter-images", type=int, help="toy filter: drawn scenes it learns from")
    p.add_argument("--filter-steps", type=int)
    p.add_argument("--filter-lr", type=float)
    p.add_argument("--safety-checker", help="sd15 filter: the StableDiffusionSafetyChecker weights")
    p.add_argument("--sld-concept", help="sld: the safety concept (default: toy, every harm concept's first word; "
                                         "sd15, the pipeline's own, written for I2P's categories)")
    p.add_argument("--psa-users-per-pair", type=int, help="psa: training users drawn for each pair")
    p.add_argument("--psa-lam-banned", type=float, help="psa: λ_u,k of R_u for a category the user bans")
    p.add_argument("--psa-fidelity", type=float,
                   help="psa: w_f, the reward of showing an allowed concept asked for (toy: its quality reward "
                        "ignores harm pixels; sd15: 0, PickScore measures fidelity)")
    p.add_argument("--psa-tokens", type=int, help="psa: user tokens per profile")
    p.add_argument("--psa-scale", type=float, help="psa: s, the weight of the user branch")
    p.add_argument("--psa-profile-dim", type=int, help="psa toy: the profile encoder's width")
    p.add_argument("--psa-llm", help="psa sd15: the LLM embedding profile texts (masked sum of last hidden states)")
    p.add_argument("--sage", help="psa sd15: Sage's folder (metadata.jsonl, users.csv, images) instead of --data")
    return C.parse_args(p)


# ---------------------------------------------------------------------------------------
# Data: LibraAlign-HF pairs, relabelled by the composite reward (Eqs. 6-8)
# ---------------------------------------------------------------------------------------

def load_hf_pairs(path: Path, skip_bad: bool) -> tuple[list[dict], int]:
    """Rows need a prompt, a kind, and a/b images (with a role) that exist with finite
    quality and cost."""
    def check(row):
        if not isinstance(row["prompt"], str) or not isinstance(row["kind"], str):
            raise ValueError("prompt and kind must be strings")
        for s in ("a", "b"):
            side = row[s]
            if side["role"] not in ("harmful", "safe"):
                raise ValueError(f"{s}.role is {side['role']!r}, not 'harmful' or 'safe'")
            side["file"] = str(path.parent / side["path"])
            if not Path(side["file"]).exists():
                raise ValueError(f"missing image {side['file']}")
            for k in ("quality", "cost"):
                if not isinstance(side[k], (int, float)) or not math.isfinite(side[k]):
                    raise ValueError(f"{s}.{k} is {side[k]!r}, not a finite number")
    return C.read_checked_rows(path, check, skip_bad)


def preference_pairs(pairs: list[dict], objective: str, lam: float, margin: float) -> tuple[list[dict], int]:
    """Eq. 8 with R = r − λC (T2I-SPO), or R = −C (safety-only DPO, the λ → ∞ ordering), or
    R = −1[harmful] (AlignGuard: the safe side wins; a pair of two safe images ties, dropped)."""
    if objective == "safe-wins":
        by_role = lambda side: {**side, "quality": 0.0, "cost": float(side["role"] == "harmful")}
        pairs = [{**p, "a": by_role(p["a"]), "b": by_role(p["b"])} for p in pairs]
        lam = 1.0
    if objective == "safety":
        no_quality = lambda side: {**side, "quality": 0.0}
        pairs = [{**p, "a": no_quality(p["a"]), "b": no_quality(p["b"])} for p in pairs]
        lam = 1.0
    return C.relabel_pairs(pairs, lam, margin)


def data_stage(data: str) -> str:
    """The stage that writes --data's folder (for the message when it is missing)."""
    return data if data in C.STAGES else "hf"


def category_filter(pairs: list[dict], categories: list[str] | None, path: Path) -> list[dict]:
    """The pairs of the given harm categories (an AlignGuard expert's data); None keeps all."""
    if categories is None:
        return pairs
    have = sorted({p["category"] for p in pairs if p.get("category")})
    unknown = sorted(set(categories) - set(have))
    if unknown:
        raise C.DataError(f"{path}: no pairs of category {unknown} (--categories); its categories are {have}")
    return [p for p in pairs if p.get("category") in categories]


def pair_subset(pairs: list[dict], n: int) -> list[dict]:
    """n pairs (relabelled w/l or as read, a/b) chosen by a hash of their prompt and images
    (their paths inside the data folder): the same subset whatever the training seed, the
    objective or where the run folder lies, so seeds differ in training randomness only.
    n = 0 keeps all."""
    if n <= 0 or n >= len(pairs):
        return pairs

    def key(p):
        files = sorted(p[s]["path"] for s in ("a", "b", "w", "l") if s in p)
        return hashlib.sha1("\n".join([p["prompt"], *files]).encode()).hexdigest()
    return sorted(pairs, key=key)[:n]


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
    elif args.objective == "psa":  # PSA trains its adapter only; the reference is the UNet without it
        unet.requires_grad_(False)
        ref = None
    else:
        ref = load(UNet2DConditionModel, "unet").requires_grad_(False).eval().to(device)
        if ref_dtype != torch.float32:
            ref.to(ref_dtype)
    if args.grad_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.to(device).train()
    return unet, ref, vae, text_encoder, tokenizer, noise_scheduler


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

    latents = cached(lambda b: C.encode_images(vae, torch.stack([C.load_image(f, size) for f in b])), files, folder,
                     "latents", dist, chunk=256)
    text = cached(embed, prompts, folder, "text", dist, chunk=256)
    file_index = {f: i for i, f in enumerate(files)}
    prompt_index = {p: i for i, p in enumerate(prompts)}
    index = torch.tensor([[file_index[p["w"]["file"]], file_index[p["l"]["file"]], prompt_index[p["prompt"]]]
                          for p in pairs])
    return latents, text, index


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
        config = unet.peft_config["default"]  # r and α travel with the weights: load_lora_weights reads them
        StableDiffusionPipeline.save_lora_weights(
            tmp, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
            unet_lora_adapter_metadata={"r": config.r, "lora_alpha": config.lora_alpha,
                                        "target_modules": sorted(config.target_modules)})
        C.replace_dir(tmp, out / "lora")
        fuse_lora(pipe, out / "lora")
    else:
        pipe.unet.load_state_dict(unet.state_dict())
    C.save_pipeline(pipe, out / "model")


def fuse_lora(pipe, lora: Path) -> None:
    """The LoRA folder's ΔW added into the pipeline's UNet weights (stock diffusers calls)."""
    pipe.load_lora_weights(lora)
    pipe.fuse_lora()
    pipe.unload_lora_weights()


# ---------------------------------------------------------------------------------------
# The training loop: setup(), then train_step() until done, then finish()
# ---------------------------------------------------------------------------------------

@dataclasses.dataclass
class PSATraining:
    """--objective psa: the adapter (the only trainable weights), the training users' profile
    tokens (toy: token ids its encoder reads; sd15: frozen LLM vectors), each example's user."""
    adapter: P.PSAAdapter
    user_of: torch.Tensor            # [examples] the user of each relabelled pair
    ids: torch.Tensor | None = None  # toy: [users, L] profile token ids, and their mask
    mask: torch.Tensor | None = None
    vectors: torch.Tensor | None = None  # sd15: [users, D]

    def tokens(self, examples, device) -> torch.Tensor:
        """The user tokens of each example, [n, num_tokens, cross_attention_dim]: every training
        user's profile vector, standardized over them all, then those of the examples' users."""
        if self.vectors is not None:
            every = self.vectors.to(device)
        else:
            every = self.adapter.profile_vectors(self.ids.to(device), self.mask.to(device))
        return self.adapter.user_tokens(self.adapter.standardize(every, fit=True)[self.user_of[examples]])


@dataclasses.dataclass
class Training:
    """Everything the loop reads and updates, built once by setup()."""
    args: argparse.Namespace
    dist: C.Dist
    out: Path
    pairs: list[dict]           # relabelled: "w" the winner under R, "l" the loser (Eq. 8)
    data_counts: dict           # pairs_dropped, bad_rows_skipped, safe_side_wins_harmful_safe
    unet: torch.nn.Module       # the policy ε_θ
    ref: torch.nn.Module | None  # the frozen reference ε_ref (None with LoRA: adapters off)
    vae: torch.nn.Module
    noise_scheduler: object
    size: int                   # image side in pixels
    latents: torch.Tensor       # cached VAE latents of every image
    text: torch.Tensor          # cached text embeddings of every prompt
    index: torch.Tensor         # [pairs, 3]: latent row of x_w, of x_l, text row of the prompt
    params: list[torch.nn.Parameter]
    dfm_modules: list[torch.nn.Module]
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    queue: C.DescentRateQueue   # Eq. 10's loss queues
    sampler: torch.utils.data.DistributedSampler
    per_rank: int               # pairs of the global batch on this process
    micro: int                  # pairs per forward
    autocast: object
    ckpt: C.Checkpoint
    log: C.MetricsLog
    psa: PSATraining | None = None  # --objective psa: the adapter and the users
    step: int = 0
    totals: dict = dataclasses.field(
        default_factory=lambda: {"dfm_flagged": 0, "aug_wins": dict.fromkeys(C.AUGMENTATIONS, 0),
                                 "dfm_flagged_by_kind": {}, "dfm_pairs_flagged": []})


def psa_examples(args, raw: list[dict], hf_path: Path) -> tuple[list[dict], list[dict]]:
    """PSA's data: Sage's per-user pairs (--sage), or the LibraAlign-HF pairs relabelled for
    drawn training users by R_u (psa.relabel_for_users). Returns (examples, users)."""
    if args.sage:
        users, pairs = P.read_sage(Path(args.sage))
        index = {u["id"]: i for i, u in enumerate(users)}
        return [{**p, "user": index[p["user"]]} for p in pairs], users
    users_file = C.stage_dir(args.run, "world") / "users" / "train.jsonl"
    C.require_inputs([users_file], "world")
    users = P.read_users(users_file)
    for p in raw:
        for s in ("a", "b"):  # is the concept asked for shown? exact on the toy; sd15: the harmful side
            shown = P.concept_shown(C.load_png(p[s]["file"]), p["category"]) if args.preset == "toy" and p.get(
                "category") else p[s]["role"] == "harmful"
            p[s]["shows_concept"] = bool(shown)
    examples = P.relabel_for_users(raw, users, args.psa_users_per_pair, args.psa_lam_banned, args.psa_fidelity,
                                   args.seed)
    if not examples:
        raise C.DataError(f"{hf_path}: no pair is ordered by any user's reward")
    return examples, users


def psa_setup(args, unet, users: list[dict], examples: list[dict], device) -> PSATraining:
    """The adapter on the frozen UNet (installed), and the users' profile inputs."""
    toy = args.psa_llm is None
    vectors = None
    if not toy:
        vectors = P.llm_profile_vectors(args.psa_llm, [u["text"] for u in users], device)
    adapter = P.PSAAdapter(unet, args.psa_profile_dim if toy else vectors.shape[1], args.psa_tokens, args.psa_scale,
                           toy_encoder=toy).to(device)
    adapter.install(unet)
    ids, mask = P.tokenize_profiles([u["text"] for u in users]) if toy else (None, None)
    return PSATraining(adapter, torch.tensor([e["user"] for e in examples]), ids, mask, vectors)


def other_mode_flag(key: str) -> bool:
    return key.startswith(("merge_", "esd_", "uce_", "filter_")) or key in (
        "baseline", "erase_concepts", "preserve_concepts", "safety_checker", "sld_concept")


def setup(args) -> Training:
    dist = C.setup_distributed(args.device)
    C.seed_everything(args.seed)
    hf, world = Path(args.run) / args.data, C.stage_dir(args.run, "world")
    args.model = args.model or C.toy_world_input(args, world / "model", "--model")
    args.name = args.name or args.objective
    out = Path(args.run) / args.name
    if args.objective == "psa" and args.dfm == "on":  # before any work: PSA's loop has no descent rates
        raise SystemExit("--objective psa trains without DFM: pass --dfm off")
    if not (args.objective == "psa" and args.sage):
        C.require_inputs([hf / "hf_pairs.jsonl"], data_stage(args.data))
    per_rank, rem = divmod(args.batch, dist.world_size)
    micro = args.micro_batch or per_rank
    if rem or per_rank % micro:
        raise SystemExit(f"--batch {args.batch} must split evenly over {dist.world_size} processes "
                         f"and then into micro-batches of {micro}")
    if dist.is_main:  # the flags of --merge-experts and --baseline are not a training run's settings
        training = argparse.Namespace(**{k: v for k, v in vars(args).items() if not other_mode_flag(k)})
        C.save_config(training, out, world_size=dist.world_size, grad_accum=per_rank // micro)

    # Eqs. 6-8: relabel every pair by the composite reward (or by −C for the baseline)
    if args.objective == "psa" and args.sage:
        raw, n_bad = [], 0
    else:
        raw, n_bad = load_hf_pairs(hf / "hf_pairs.jsonl", args.skip_bad)
    if args.objective == "psa":
        pairs, users = psa_examples(args, raw, hf / "hf_pairs.jsonl")
        n_dropped = len(raw) * args.psa_users_per_pair - len(pairs) if not args.sage else 0
    else:
        pairs, n_dropped = preference_pairs(raw, args.objective, args.lam, args.margin)
    pairs = pair_subset(category_filter(pairs, args.categories, hf / "hf_pairs.jsonl"), args.pair_subset)
    if len(pairs) < args.batch:
        kept = f", of categories {args.categories}" if args.categories else ""
        raise C.DataError(f"{hf / 'hf_pairs.jsonl'}: {len(pairs)} pairs left after relabelling{kept} "
                          f"({n_dropped} dropped, {n_bad} bad rows), fewer than one batch of {args.batch}")
    hs = [p for p in pairs if p["kind"] == "harmful-safe"]
    safe_won = sum(p["w"]["role"] == "safe" for p in hs) / max(1, len(hs))
    C.log(f"{len(pairs)} pairs after relabelling (objective {args.objective}, λ={args.lam}); "
          f"{n_dropped} dropped, {n_bad} bad rows skipped; the safe image wins {safe_won:.1%} of harmful-safe "
          f"pairs; {dist.world_size} process(es), {per_rank // micro} micro-batch(es) of {micro} per process")

    unet, ref, vae, text_encoder, tokenizer, noise_scheduler = load_models(args, dist.device)
    size = unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
    latents, text, index = build_caches(args, pairs, vae, text_encoder, tokenizer, out, dist, size)
    text_encoder.cpu()  # done with it: the cache holds every embedding
    psa = None
    if args.objective == "psa":
        psa = psa_setup(args, unet, users, pairs, dist.device)
        unet, ref = P.UserConditionedUNet(unet, psa.adapter), P.UserConditionedUNet(unet, psa.adapter, reference=True)
        params = list(psa.adapter.parameters())
    else:
        params = [p for p in unet.parameters() if p.requires_grad]
    named = dict(unet.named_modules())
    if args.dfm == "on" and not all(m in named for m in args.dfm_modules):
        raise SystemExit(f"--dfm-modules: no module {sorted(set(args.dfm_modules) - set(named))} in the UNet")
    opt = C.adamw(params, lr=args.lr, weight_decay=args.weight_decay)
    use_bf16 = args.bf16 and dist.device.type == "cuda"
    tr = Training(
        args=args, dist=dist, out=out, pairs=pairs, unet=unet, ref=ref, vae=vae, noise_scheduler=noise_scheduler,
        data_counts={"pairs_dropped": n_dropped, "bad_rows_skipped": n_bad, "safe_side_wins_harmful_safe": safe_won},
        size=size, latents=latents, text=text, index=index, params=params,
        dfm_modules=[named[m] for m in args.dfm_modules] if args.dfm == "on" else [], opt=opt,
        sched=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, args.warmup))),
        queue=C.DescentRateQueue(args.dfm_k, args.dfm_tau, args.dfm_patience),
        sampler=torch.utils.data.DistributedSampler(range(len(pairs)), num_replicas=dist.world_size, rank=dist.rank,
                                                    shuffle=True, seed=args.seed, drop_last=True),
        per_rank=per_rank, micro=micro,
        autocast=lambda: torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext(),
        ckpt=C.Checkpoint(out / "ckpt" / "train_state.pt"), log=C.MetricsLog(out / "log.jsonl"), psa=psa)
    resume(tr)
    return tr


def resume(tr: Training) -> None:
    """Continue from the checkpoint, if there is one; the log keeps each step exactly once."""
    state = tr.ckpt.load()
    if state:
        if tr.psa:
            tr.psa.adapter.load_state_dict(state["model"])
        else:
            load_trainable_state(tr.unet, state["model"], tr.args.lora_rank > 0)
        tr.opt.load_state_dict(state["opt"])
        tr.sched.load_state_dict(state["sched"])
        tr.queue.load_state_dict(state["dfm"])
        tr.step, tr.totals = state["step"], state["totals"]
        C.log(f"resumed from {tr.ckpt.path} at step {tr.step}")
    tr.log.truncate(lambda r: r["step"] <= tr.step)  # rows of the steps about to be redone go


def draw_batch(tr: Training, step: int):
    """This rank's pair ids of the global batch, and their timesteps and noise. The global
    batch's t and ε are drawn from (seed, step); rank r holds global positions r, r + N,
    r + 2N, ... (DistributedSampler's interleaving), so N processes compute what one does."""
    args, dist = tr.args, tr.dist
    epoch, k = divmod(step, len(tr.sampler) // tr.per_rank)
    tr.sampler.set_epoch(epoch)
    mine = list(tr.sampler)[k * tr.per_rank:(k + 1) * tr.per_rank]
    g = C.step_generator(args.seed, step)
    t_all = torch.randint(0, tr.noise_scheduler.config.num_train_timesteps, (args.batch,), generator=g)
    noise_all = torch.randn((args.batch, *tr.latents.shape[1:]), generator=g)
    return mine, t_all[dist.rank::dist.world_size], noise_all[dist.rank::dist.world_size]


def pair_losses(tr: Training, ids, t, noise):
    """Eq. 5 on the pairs `ids` (with their t and ε): per-pair loss, Δ_θ and Δ_ref."""
    dev, idx = tr.dist.device, tr.index[ids]
    emb = tr.text[idx[:, 2]].to(dev)
    if tr.psa:  # PSA: each pair's user tokens join its text embeddings
        emb = torch.cat([emb, tr.psa.tokens(ids, dev)], dim=1)
    return C.dpo_pair_losses(tr.unet, tr.ref, tr.noise_scheduler, tr.latents[idx[:, 0]].to(dev),
                             tr.latents[idx[:, 1]].to(dev), emb, t.to(dev), noise.to(dev), tr.args.beta, tr.autocast)


def dfm_copies(tr: Training, step: int, mine: list, t, noise, hard_ids: set) -> torch.Tensor:
    """Eq. 11: the augmented copy of each hard pair of this rank joins this batch, weighted
    like any pair of it (its gradient accumulates). Returns, summed over ranks, the count of
    each augmentation (in C.AUGMENTATIONS order) and then the sum of the copies' losses."""
    args, dist, dev = tr.args, tr.dist, tr.dist.device
    hard = [(j, i) for j, i in enumerate(mine) if i in hard_ids]
    chosen = torch.zeros(len(C.AUGMENTATIONS) + 1)
    if hard:
        js = [j for j, _ in hard]
        picks = C.dfm_augmented_copies(tr.unet, tr.noise_scheduler, tr.dfm_modules, [
            C.HardPair(tr.pairs[i], tr.latents[tr.index[i, :2]].to(dev), tr.text[tr.index[i, 2]][None].to(dev),
                       t[j:j + 1].to(dev), noise[j:j + 1].to(dev),
                       C.step_generator(args.seed, step, stream=1 + j * dist.world_size + dist.rank))  # global position
            for j, i in hard], tr.vae, tr.size, tr.autocast, pool=args.dfm_augmentations)
        for a, _ in picks:
            chosen[C.AUGMENTATIONS.index(a)] += 1
        z = torch.stack([z for _, z in picks])
        per_pair, _, _ = C.dpo_pair_losses(tr.unet, tr.ref, tr.noise_scheduler, z[:, 0], z[:, 1],
                                           tr.text[tr.index[[i for _, i in hard], 2]].to(dev), t[js].to(dev),
                                           noise[js].to(dev), args.beta, tr.autocast)
        (per_pair.sum() / args.batch).backward()
        chosen[-1] = per_pair.detach().sum().float().cpu()
    return C.all_gather_cat(chosen[None]).sum(0)


def dfm_bookkeeping(tr: Training, ids: list, losses: torch.Tensor, hard_ids: set, counts: torch.Tensor) -> dict:
    """Which pairs Eq. 10 flags and what Eq. 11's copies do to them: the totals per
    augmentation and per pair kind, and this step's loss of the hard pairs beside the batch's
    and their copies' (a copy easier than its original gives the pair little new signal)."""
    tr.totals["dfm_flagged"] += len(hard_ids)
    for a, n in zip(C.AUGMENTATIONS, counts[:-1].tolist()):
        tr.totals["aug_wins"][a] += int(n)
    flagged = set(tr.totals["dfm_pairs_flagged"])
    for i in hard_ids:
        kind = tr.pairs[i]["kind"]
        tr.totals["dfm_flagged_by_kind"][kind] = tr.totals["dfm_flagged_by_kind"].get(kind, 0) + 1
        flagged.add(i)
    tr.totals["dfm_pairs_flagged"] = sorted(flagged)
    if not hard_ids:
        return {}
    hard_loss = losses[[k for k, i in enumerate(ids) if i in hard_ids]].mean().item()
    return {"dfm_hard_loss": hard_loss, "dfm_copy_loss": float(counts[-1]) / len(hard_ids)}


def nonfinite_loss(tr: Training, step: int, why: str) -> FloatingPointError:
    last = tr.ckpt.path if tr.ckpt.path.exists() else "(none yet)"
    return FloatingPointError(f"non-finite DPO loss at step {step} ({why}); the last good checkpoint is {last}")


def train_step(tr: Training) -> dict:
    """One optimizer step over one global batch; returns the step's log record."""
    args, step = tr.args, tr.step
    mine, t, noise = draw_batch(tr, step)

    # 1. Eq. 9 on this step's pairs, in micro-batches; loss weight 1/batch, summed over ranks
    tr.opt.zero_grad(set_to_none=True)
    parts = []
    for m in range(0, tr.per_rank, tr.micro):
        sl = slice(m, m + tr.micro)
        try:
            per_pair, dt, dr = pair_losses(tr, mine[sl], t[sl], noise[sl])
        except C.NonFiniteError as e:  # NaN in the denoising errors: diverged weights or bad latents
            raise nonfinite_loss(tr, step, str(e)) from None
        (per_pair.sum() / args.batch).backward()
        parts.append((per_pair.detach(), dt, dr))
    # every rank sees every pair's loss: NaN stops all of them, DFM queues stay identical
    losses, d_theta, d_ref = (C.all_gather_cat(torch.cat(x).float().cpu()) for x in zip(*parts))
    ids = C.all_gather_cat(torch.tensor(mine))
    if not torch.isfinite(losses).all():
        raise nonfinite_loss(tr, step, "the loss is NaN or inf")

    # 2. DFM: Eq. 10 flags the pairs whose loss stopped falling; Eq. 11 adds their copies
    n_aug, dfm_record = 0, {}
    if args.dfm == "on":
        hard_ids = set(tr.queue.update(ids.tolist(), losses))
        counts = dfm_copies(tr, step, mine, t, noise, hard_ids)
        n_aug = int(counts[:-1].sum())
        dfm_record = dfm_bookkeeping(tr, ids.tolist(), losses, hard_ids, counts)

    # 3. one gradient sum over ranks (hand-written, not DDP's wrapper: DFM's extra forwards
    #    differ per rank), rescaled to the mean over the batch and its copies; one update
    C.allreduce_gradients(tr.params)
    if n_aug:
        for p in tr.params:
            p.grad.mul_(args.batch / (args.batch + n_aug))
    grad_norm = torch.nn.utils.clip_grad_norm_(tr.params, args.max_grad_norm)
    tr.opt.step()
    tr.sched.step()
    tr.step += 1
    return dict(step=tr.step, loss=losses.mean().item(),
                implicit_accuracy=(d_theta < d_ref).float().mean().item(),  # the policy prefers x_w more than ref
                reward_margin=(-0.5 * args.beta * (d_theta - d_ref)).mean().item(), lr=tr.sched.get_last_lr()[0],
                grad_norm=float(grad_norm), dfm_hard=n_aug, dfm_flagged_total=tr.totals["dfm_flagged"], **dfm_record)


def save_checkpoint(tr: Training) -> None:
    model = tr.psa.adapter.state_dict() if tr.psa else trainable_state(tr.unet, tr.args.lora_rank > 0)
    tr.ckpt.save({"model": model, "opt": tr.opt.state_dict(),
                  "sched": tr.sched.state_dict(), "dfm": tr.queue.state_dict(), "step": tr.step,
                  "totals": tr.totals})


def finish(tr: Training, seconds: float) -> None:
    """The aligned model as stock folders, and the headline figures: the mean over the
    logged steps of the last tenth of training."""
    args = tr.args
    if tr.psa:  # the adapter, and the users it was trained for
        tr.psa.adapter.save(tr.out / "adapter")
    else:
        save_final(args, tr.unet, tr.out)
    rows = {r["step"]: r for r in C.read_jsonl(tr.out / "log.jsonl")}
    last = [r for s, r in rows.items() if s > 0.9 * args.steps] or [rows[max(rows)]]
    metrics = {"final_loss": float(np.mean([r["loss"] for r in last])),
               "implicit_accuracy": float(np.mean([r["implicit_accuracy"] for r in last])),
               **tr.data_counts, "dfm_flagged": tr.totals["dfm_flagged"], "aug_wins": tr.totals["aug_wins"],
               "dfm_flagged_by_kind": tr.totals["dfm_flagged_by_kind"],
               "dfm_pairs_flagged": len(tr.totals["dfm_pairs_flagged"]),
               "n_pairs": len(tr.pairs), "objective": args.objective, "lam": args.lam,
               "world_size": tr.dist.world_size, "seconds": round(seconds, 1)}
    C.atomic_write_json(tr.out / "metrics.json", metrics)
    C.log(C.format_metrics(metrics))


# ---------------------------------------------------------------------------------------
# AlignGuard: LoRA safety experts merged into one LoRA (--merge-experts), no training
# ---------------------------------------------------------------------------------------

MERGES = ("comerge", "linear", "ties", "dare_ties", "cat", "svd")


def read_experts(run: Path, names: list[str]) -> dict[str, dict]:
    """Each expert's LoRA factors {module: (B, A)}, from DIR/<name>/lora/ (stage 4's output)."""
    experts = {n: C.read_lora(run / n / "lora") for n in names}
    modules = set(experts[names[0]])
    for n in names[1:]:
        if set(experts[n]) != modules:
            raise C.DataError(f"{run / n / 'lora'}: LoRA on other modules than {run / names[0] / 'lora'}; "
                              f"the experts must share --lora-rank's targets")
    return experts


@torch.no_grad()
def expert_activities(args, experts: dict[str, dict], device) -> dict[str, torch.Tensor]:
    """Co-Merge's a_{e,i} for every LoRA module: the base UNet (no adapter) runs on noised
    latents of --merge-calibration pairs of EVERY category of --data (both images, their
    prompt, t and ε seeded), and a hook on each module accumulates expert_activity on its
    inputs — the inputs "across all" categories of AlignGuard's description."""
    from diffusers import DDPMScheduler
    pipe = C.load_pipeline(args.model, device)
    data = Path(args.run) / args.data / "hf_pairs.jsonl"
    C.require_inputs([data], data_stage(args.data))
    raw, _ = load_hf_pairs(data, args.skip_bad)
    pairs = pair_subset([p for p in raw if p["kind"] == "harmful-safe"], args.merge_calibration)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    names, sums, count = list(experts), {}, {}

    def hook(module_name):
        def fn(module, inputs, output):
            x = inputs[0]
            ups, downs = zip(*[(experts[e][module_name][0].to(x), experts[e][module_name][1].to(x)) for e in names])
            n = x.reshape(-1, x.shape[-1]).shape[0]
            sums[module_name] = sums.get(module_name, 0) + C.expert_activity(x, ups, downs) * n
            count[module_name] = count.get(module_name, 0) + n
        return fn

    modules = list(experts[names[0]])
    hooks = [pipe.unet.get_submodule(m).register_forward_hook(hook(m)) for m in modules]
    g = C.step_generator(args.seed, 0)
    try:
        for i in range(0, len(pairs), 8):
            part = pairs[i:i + 8]
            files = [p[s]["file"] for p in part for s in ("a", "b")]
            z = C.encode_images(pipe.vae, torch.stack([C.load_image(f, size) for f in files]).to(device))
            emb = pipe.encode_prompt([p["prompt"] for p in part for _ in "ab"], device, 1, False)[0]
            t = torch.randint(0, sched.config.num_train_timesteps, (len(z),), generator=g).to(device)
            noise = torch.randn(z.shape, generator=g).to(z)
            pipe.unet(sched.add_noise(z, noise, t), t, emb)
    finally:
        for h in hooks:
            h.remove()
    return {m: sums[m] / count[m] for m in modules}


def peft_merge(args, experts: dict[str, dict], weight: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """peft's own merge (LoraModel.add_weighted_adapter) of the experts, each at `weight`, on a
    fresh base UNet; returns the merged factors per module."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    from peft.tuners.lora import LoraModel
    unet = C.from_pretrained_or_exit(lambda m: UNet2DConditionModel.from_pretrained(m, subfolder="unet"),
                                     args.model, "the base model", "--model")
    names = list(experts)
    modules = sorted(experts[names[0]])
    rank = experts[names[0]][modules[0]][1].shape[0]
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=modules)  # α = r: B already holds α/r
    model = LoraModel(unet, {names[0]: config}, names[0])
    for n in names[1:]:
        model.peft_config[n] = config
        model.inject_adapter(unet, n)
    for m in modules:
        layer = unet.get_submodule(m)
        for n in names:
            layer.lora_B[n].weight.data.copy_(experts[n][m][0])
            layer.lora_A[n].weight.data.copy_(experts[n][m][1])
    kwargs = {"density": args.merge_density} if args.merge_method in ("ties", "dare_ties") else {}
    torch.manual_seed(args.seed)  # dare_ties drops values at random
    model.add_weighted_adapter(names, [weight] * len(names), "merged", combination_type=args.merge_method, **kwargs)
    merged = {}
    for m in modules:
        layer = unet.get_submodule(m)
        merged[m] = (layer.lora_B["merged"].weight.detach() * layer.scaling["merged"],
                     layer.lora_A["merged"].weight.detach())
    return merged


def merge_main(args) -> None:
    """AlignGuard's last step: the experts become one LoRA, saved as DIR/NAME/lora/ (what
    `pipe.load_lora_weights` reads) and fused into a stock pipeline DIR/NAME/model/."""
    t0 = time.time()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SystemExit("--merge-experts runs in one process: start it with python, not torchrun")
    run = Path(args.run)
    args.model = args.model or C.toy_world_input(args, C.stage_dir(run, "world") / "model", "--model")
    out = run / (args.name or f"alignguard/{args.merge_method}")
    C.save_config(args, out)
    if (out / "metrics.json").exists() and (out / "model" / "model_index.json").exists():
        return C.log(f"{out} is finished: nothing to do")
    experts = read_experts(run, args.merge_experts)
    metrics = {"method": args.merge_method, "experts": args.merge_experts}
    if args.merge_method == "comerge":
        activity = expert_activities(args, experts, C.pick_device(args.device))
        merged = {m: C.co_merge([experts[e][m][0] for e in experts], [experts[e][m][1] for e in experts], a)
                  for m, a in activity.items()}
        wins = torch.cat([a.argmax(0) for a in activity.values()])  # which expert each output unit keeps
        metrics["output_units_kept"] = {e: int((wins == i).sum()) for i, e in enumerate(experts)}
    else:
        weight = args.merge_weight or (1 / len(experts) if args.merge_method == "linear" else 1.0)
        merged = peft_merge(args, experts, weight)
        metrics["weight"] = weight
    C.write_lora(out / "lora", merged)
    pipe = C.load_pipeline(args.model)
    fuse_lora(pipe, out / "lora")
    C.save_pipeline(pipe, out / "model")
    metrics.update(rank=max(a.shape[0] for _, a in merged.values()), seconds=round(time.time() - t0, 1))
    C.atomic_write_json(out / "metrics.json", metrics)
    C.log(C.format_metrics(metrics))


def main():
    args = parse()
    if args.merge_experts:
        return merge_main(args)
    if args.baseline:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise SystemExit("--baseline runs in one process: start it with python, not torchrun")
        args.model = args.model or C.toy_world_input(args, C.stage_dir(args.run, "world") / "model", "--model")
        return B.build(args, Path(args.run))
    t0 = time.time()
    tr = setup(args)
    final = tr.out / ("adapter/psa_adapter.safetensors" if tr.psa else "model/model_index.json")
    if tr.step >= args.steps and (tr.out / "metrics.json").exists() and final.exists():
        C.log(f"{tr.out} is finished (step {tr.step} of {args.steps}): nothing to do")
        return C.cleanup_distributed()
    bar = tqdm(total=args.steps, initial=tr.step, desc=args.name, disable=not tr.dist.is_main)
    while tr.step < args.steps:
        if args.stop_after is not None and tr.step >= args.stop_after:
            raise SystemExit(f"stopped after {tr.step} steps (--stop-after); run again to resume")
        record = train_step(tr)
        bar.update(1)
        if tr.step % args.log_every == 0 or tr.step == args.steps:
            tr.log.write(**record)
            bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['implicit_accuracy']:.2f}")
        if tr.dist.is_main and (tr.step % args.ckpt_every == 0 or tr.step == args.steps):
            save_checkpoint(tr)
    bar.close()
    if tr.dist.is_main:
        finish(tr, time.time() - t0)
    C.cleanup_distributed()


if __name__ == "__main__":
    C.run_stage(main)
