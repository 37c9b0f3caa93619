"""The other methods of the paper's Table 2 (~530 lines): the safety filter, SLD, ESD-u and
UCE, built into DIR/baselines/<name>/, and the report section that compares them with T2I-SPO.

  filter      SD-v1.5 "w/ Safety Filter": diffusers' StableDiffusionSafetyChecker, a CLIP image
              tower and concept embeddings; an image whose cosine to a concept passes that
              concept's threshold is replaced by a black one. sd15: the CompVis weights. toy:
              the same module trained here on drawn scenes — a learned classifier, never the
              exact judge (a filter that is the judge would score a perfect, meaningless IP).
              The folder holds safety_checker/ and feature_extractor/, added to the base.
  sld_medium, sld_strong, sld_max
              Safe Latent Diffusion: diffusers' own StableDiffusionPipelineSafe built from the
              model's components, at its SafetyConfig presets. The folder holds the recipe,
              sld.json. The presets' warm-up counts steps of SLD's 50-step sampler; stage 5
              scales it to its own step count (sld_call_kwargs).
  esd_u       ESD-u: the UNet's layers OUTSIDE cross-attention fine-tuned so that, for an erase
              concept c, ε_θ(x_t, c, t) follows the frozen model guided away from c
              (esd_target, η = 2), x_t sampled by the frozen model from c.
  uce         UCE: every cross-attention to_k and to_v edited in closed form so that an erased
              concept's key and value become those of its guide "" and preserved concepts
              stay (uce_edit, λ = 0.5).

Command:  python -m systems.baselines build --baseline filter|sld|esd-u|uce --run DIR
Each folder ends with a model.json, so stage 5 evaluates it beside T2I-SPO on the same
prompts and seeds; its `section` (registry.SECTIONS) writes DIR/eval/baselines.md, with RECE
(systems/rece.py, built on uce_edit) in the table. The attacks of Fig. 4B are in systems/attacks.py.
"""
import copy
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import common as C
from lib import models as M
from lib import stats
from lib import toyworld as W
from lib import utils as U

BASELINES = ("filter", "sld", "esd-u", "uce")
SLD_LEVELS = ("medium", "strong", "max")
SLD_STEPS = 50  # the sampler steps SLD's presets were written for (its warm-up counts these)


def folder_name(baseline: str) -> str:
    return baseline.replace("-", "_")


# ---------------------------------------------------------------------------------------
# The toy world's concepts: what the methods erase, preserve, and what the attack may not say
# ---------------------------------------------------------------------------------------

def toy_preserve_concepts() -> list[str]:
    """The words of benign toy prompts: shapes, colours, backgrounds, sizes, styles, and the
    look-alike phrases (whose colours resemble harm: erasure must not take them along)."""
    return [*W.SHAPES, *W.OBJECT_COLORS, *(f"{b} background" for b in W.BACKGROUNDS), *W.SIZES, *W.STYLES,
            *W.LOOKALIKES]


def toy_sld_concept() -> str:
    """SLD's safety concept for the toy world: the first word of every harm concept. All 21
    concepts in full would not fit the toy text encoder's 32 tokens."""
    return " ".join(dict.fromkeys(w.split()[0] for w in W.harm_concepts()))


# ---------------------------------------------------------------------------------------
# The erasure math: UCE's closed form and ESD's target (Gandikota et al.)
# ---------------------------------------------------------------------------------------

def uce_edit(W: torch.Tensor, erase: torch.Tensor, guide: torch.Tensor, preserve: torch.Tensor | None = None,
             lam: float = 0.5, erase_scale: float = 1.0, preserve_scale: float = 1.0) -> torch.Tensor:
    """Unified Concept Editing's closed form for one cross-attention projection W [out, in]
    (a to_k or to_v), with c_i the embeddings of the concepts to erase, g_i their guides and
    c_j those to preserve (rows of `erase`, `guide`, `preserve`, each [n, in]):

        v*_i = W g_i
        W' = (λW + Σ_i v*_i c_iᵀ + Σ_j W c_j c_jᵀ) · (λI + Σ_i c_i c_iᵀ + Σ_j c_j c_jᵀ)⁻¹

    W' minimises λ‖W' − W‖² + Σ_i ‖W'c_i − v*_i‖² + Σ_j ‖W'c_j − W c_j‖²: an erased concept
    is projected where its guide was, a preserved one stays. Erase and preserve sums carry
    the weights `erase_scale` and `preserve_scale` (UCE's defaults: 1). Solved in float64.
    """
    if erase.shape != guide.shape:
        raise ValueError(f"erase {tuple(erase.shape)} and guide {tuple(guide.shape)} must match")
    W64, ce, cg = W.double(), erase.double(), guide.double()
    cp = preserve.double() if preserve is not None and len(preserve) else ce[:0]
    v_star = cg @ W64.T                                                       # [n_e, out]
    lhs = lam * W64 + erase_scale * v_star.T @ ce + preserve_scale * (cp @ W64.T).T @ cp
    rhs = (lam * torch.eye(W.shape[1], dtype=torch.float64) + erase_scale * ce.T @ ce
           + preserve_scale * cp.T @ cp)
    # W' = lhs · rhs⁻¹, and rhs is symmetric: solve rhs · W'ᵀ = lhsᵀ
    return torch.linalg.solve(rhs, lhs.T).T.to(W.dtype)


def esd_target(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, eta: float,
               eps_from: torch.Tensor | None = None) -> torch.Tensor:
    """Erased Stable Diffusion's target for the fine-tuned model's ε_θ(x_t, c, t), from the
    frozen model ε*:

        ε_target = ε*(x_t, c_from, t) − η · (ε*(x_t, c, t) − ε*(x_t, ∅, t))

    with c_from = c unless a concept is erased "from" another (the public code's form; the
    ESD paper writes ε*(x_t, ∅, t) for the first term). Guiding the model away from c by η
    makes it unlearn c. The loss is ‖ε_θ(x_t, c, t) − ε_target‖² (esd_loss).
    """
    first = eps_cond if eps_from is None else eps_from
    return first - eta * (eps_cond - eps_uncond)


def esd_loss(eps_model: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE(ε_θ(x_t, c, t), ε_target), the target held fixed."""
    return F.mse_loss(eps_model.float(), target.detach().float())


# ---------------------------------------------------------------------------------------
# filter: diffusers' StableDiffusionSafetyChecker (sd15: CompVis weights; toy: trained here)
# ---------------------------------------------------------------------------------------

CHECKER_CONCEPTS = 17  # the module's concept_embeds rows (3 more special-care rows)
NEVER = 2.0            # a threshold no cosine reaches: the rows the toy filter leaves unused
FILTER_TEMPERATURE = 20.0  # logits = T·(cos − threshold) while training the toy filter


def toy_safety_checker(seed: int):
    """The checker's architecture at toy size: a 2-layer ViT on 32-px images, patch 4."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=8),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           image_size=W.IMAGE_SIZE, patch_size=4),
        projection_dim=32)
    checker = StableDiffusionSafetyChecker(config)
    size = W.IMAGE_SIZE
    processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return checker, processor


def drawn_filter_data(n: int, seed: int) -> tuple[list[np.ndarray], torch.Tensor]:
    """n drawn scenes, a third each harmful, benign and look-alike, and their labels: one
    column per harm category (1 for the scene's category), from the drawing, not a judge."""
    rng = random.Random(seed)
    cats = list(W.HARM)
    images, labels = [], torch.zeros(n, len(cats))
    for i in range(n):
        s = W.random_scene(rng, ("harmful", "benign", "lookalike")[i % 3])
        images.append(W.render(s))
        if s["category"]:
            labels[i, cats.index(s["category"])] = 1.0
    return images, labels


def checker_scores(checker, pixels: torch.Tensor, k: int) -> torch.Tensor:
    """cos(image, concept_c) − threshold_c for the first k concepts, as the module computes."""
    emb = checker.visual_projection(checker.vision_model(pixels)[1])
    cos = F.normalize(emb, dim=-1) @ F.normalize(checker.concept_embeds[:k], dim=-1).T
    return cos - checker.concept_embeds_weights[:k]


def train_toy_filter(args) -> tuple[object, object, dict]:
    """The toy checker: one concept embedding and threshold per harm category, learned with
    binary cross-entropy on drawn scenes (lightly noised, since generated images are not
    crisp drawings), per concept and on the module's decision (the largest score); the
    unused concept rows get thresholds no cosine reaches."""
    checker, processor = toy_safety_checker(args.seed)
    images, labels = drawn_filter_data(args.filter_images, args.seed)
    pixels = processor(images=images, return_tensors="pt").pixel_values
    n_val = max(1, len(images) // 10)
    k = len(W.HARM)
    with torch.no_grad():
        checker.concept_embeds_weights[:] = NEVER
        checker.special_care_embeds_weights[:] = NEVER
        checker.concept_embeds_weights[:k] = 0.5
    for p in checker.parameters():
        p.requires_grad_(True)
    for p in (checker.special_care_embeds, checker.special_care_embeds_weights):
        p.requires_grad_(False)
    params = [p for p in checker.parameters() if p.requires_grad]
    opt = U.adamw(params, lr=args.filter_lr)
    checker.train()
    train_x, train_y = pixels[n_val:], labels[n_val:]
    for step in range(args.filter_steps):
        g = U.step_generator(args.seed, step)
        idx = torch.randint(len(train_x), (64,), generator=g)
        x = train_x[idx] + 0.1 * torch.randn(train_x[idx].shape, generator=g)
        logits = FILTER_TEMPERATURE * checker_scores(checker, x, k)
        # per concept, and for the decision the module takes: flagged iff any concept fires
        loss = (F.binary_cross_entropy_with_logits(logits, train_y[idx])
                + F.binary_cross_entropy_with_logits(logits.max(-1).values, train_y[idx].amax(-1)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    checker.eval()
    with torch.no_grad():
        flagged = (checker_scores(checker, pixels[:n_val], k) > 0).any(-1)
    harmful = labels[:n_val].any(-1)
    metrics = {"held_out_images": n_val, "recall_harmful": float(flagged[harmful].float().mean()),
               "false_positive_rate": float(flagged[~harmful].float().mean()), "final_loss": loss.item()}
    for p in checker.parameters():
        p.requires_grad_(False)
    return checker, processor, metrics


def build_filter(args, out: Path) -> dict:
    if args.preset == "toy":
        checker, processor, metrics = train_toy_filter(args)
    else:
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPImageProcessor
        checker = M.from_pretrained_or_exit(StableDiffusionSafetyChecker.from_pretrained, args.safety_checker,
                                            "the safety checker", "--safety-checker")
        source = Path(str(args.safety_checker))
        try:  # the CompVis folder ships its preprocessor; SD-1.5's own folder has it in feature_extractor/
            processor = CLIPImageProcessor.from_pretrained(str(args.safety_checker))
        except OSError:
            processor = M.from_pretrained_or_exit(
                lambda m: CLIPImageProcessor.from_pretrained(m, subfolder="feature_extractor"), args.model,
                "the base model's feature extractor", "--model")
        metrics = {"weights": str(source)}
    for sub, obj in (("safety_checker", checker), ("feature_extractor", processor)):
        tmp = out / f".{sub}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        obj.save_pretrained(tmp)
        U.replace_dir(tmp, out / sub)
    return metrics


def load_safety_checker(folder: Path):
    """(checker, feature extractor) from a filter folder, for StableDiffusionPipeline."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessor
    return (StableDiffusionSafetyChecker.from_pretrained(folder / "safety_checker"),
            CLIPImageProcessor.from_pretrained(folder / "feature_extractor"))


# ---------------------------------------------------------------------------------------
# SLD: diffusers' StableDiffusionPipelineSafe at its presets
# ---------------------------------------------------------------------------------------

def sld_recipe(level: str, concept: str | None) -> dict:
    """sld.json: the preset's five settings (diffusers' SafetyConfig) and the safety concept
    (None: the pipeline's own default, written for I2P's categories)."""
    from diffusers.pipelines.deprecated.stable_diffusion_safe import SafetyConfig
    return {"level": level, "safety_concept": concept, **getattr(SafetyConfig, level.upper())}


def sld_call_kwargs(recipe: dict, steps: int) -> dict:
    """The pipeline call's SLD arguments; the warm-up, written in steps of a 50-step sampler,
    scaled to `steps` (MAX's 0 stays 0)."""
    kw = {k: v for k, v in recipe.items() if k.startswith("sld_")}
    kw["sld_warmup_steps"] = round(kw["sld_warmup_steps"] * steps / SLD_STEPS)
    return kw


def truncating(tokenizer):
    """A copy of the tokenizer whose every call truncates to its window. diffusers' SLD also
    tokenizes a batch untruncated, only to warn about the cut; with one prompt longer than the
    window that batch is ragged and the call fails. The ids the text encoder reads are the same."""
    class Truncating(type(tokenizer)):
        def __call__(self, *args, **kwargs):
            return super().__call__(*args, **{"truncation": True, **kwargs})

    out = copy.copy(tokenizer)
    out.__class__ = Truncating
    return out


def sld_pipeline(model_path: Path, recipe: dict, device, dtype):
    """StableDiffusionPipelineSafe from the components of a stock pipeline folder (its tokenizer
    `truncating`, so a batch may hold prompts longer than the window)."""
    from diffusers import StableDiffusionPipelineSafe
    base = M.load_pipeline(model_path, device, dtype)
    pipe = StableDiffusionPipelineSafe(vae=base.vae, text_encoder=base.text_encoder,
                                       tokenizer=truncating(base.tokenizer),
                                       unet=base.unet, scheduler=base.scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    if recipe["safety_concept"]:
        n = len(base.tokenizer(recipe["safety_concept"]).input_ids)
        if n > pipe.tokenizer.model_max_length:
            raise SystemExit(f"the SLD safety concept is {n} tokens, longer than the text encoder's "
                             f"{pipe.tokenizer.model_max_length}: shorten --sld-concept")
        pipe.safety_concept = recipe["safety_concept"]
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


# ---------------------------------------------------------------------------------------
# ESD-u: negative-guidance fine-tuning outside cross-attention
# ---------------------------------------------------------------------------------------

def esd_u_parameters(unet) -> list[torch.nn.Parameter]:
    """ESD-u's trainable set (the public code's `esd-u`): the weights of every Linear and
    Conv2d module whose name does not contain attn2, i.e. everything but cross-attention."""
    return [p for name, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
            and "attn2" not in name for p in m.parameters()]


@torch.no_grad()
def sample_until(unet, scheduler, latents, cond, uncond, stop: int, guidance: float) -> torch.Tensor:
    """x_t: the frozen model's sampler run from noise for `stop` of its steps, with guidance."""
    for t in scheduler.timesteps[:stop]:
        e_u, e_c = unet(torch.cat([latents, latents]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample.chunk(2)
        latents = scheduler.step(e_u + guidance * (e_c - e_u), t, latents).prev_sample
    return latents


def build_esd_u(args, out: Path, device) -> dict:
    from diffusers import DDIMScheduler
    pipe = M.load_pipeline(args.model, device)
    frozen = pipe.unet.requires_grad_(False).eval()
    unet = copy.deepcopy(frozen)
    params = esd_u_parameters(unet)
    for p in params:
        p.requires_grad_(True)
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(args.esd_sample_steps)
    with torch.no_grad():
        embeds = [pipe.encode_prompt(c, device, args.esd_batch, True, "") for c in args.erase_concepts]
    opt = torch.optim.Adam(params, lr=args.esd_lr)
    ckpt, log = U.Checkpoint(out / "ckpt" / "train_state.pt"), U.MetricsLog(out / "log.jsonl")
    state, start = ckpt.load(), 0
    if state:
        unet.load_state_dict(state["unet"])
        opt.load_state_dict(state["optimizer"])
        start = state["iteration"]
        log.truncate(lambda r: r["iteration"] <= start)
    shape = (args.esd_batch, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    for it in tqdm(range(start, args.esd_iterations), initial=start, total=args.esd_iterations, desc="esd-u"):
        g = U.step_generator(args.seed, it)
        cond, uncond = embeds[it % len(embeds)]  # the erase concepts in turn
        stop = int(torch.randint(args.esd_sample_steps, (1,), generator=g))
        noise = torch.randn(shape, generator=g).to(device) * scheduler.init_noise_sigma
        x_t = sample_until(frozen, scheduler, noise, cond, uncond, stop, args.esd_guidance)
        t = scheduler.timesteps[stop]
        with torch.no_grad():
            target = esd_target(frozen(x_t, t, encoder_hidden_states=cond).sample,
                                  frozen(x_t, t, encoder_hidden_states=uncond).sample, args.esd_eta)
        loss = esd_loss(unet(x_t, t, encoder_hidden_states=cond).sample, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        log.write(iteration=it + 1, loss=loss.item(), t=int(t), concept=args.erase_concepts[it % len(embeds)])
        if (it + 1) % args.ckpt_every == 0:
            ckpt.save({"unet": unet.state_dict(), "optimizer": opt.state_dict(), "iteration": it + 1})
    pipe.unet = unet.requires_grad_(False)
    M.save_pipeline(pipe, out / "model")
    losses = [r["loss"] for r in U.read_jsonl(out / "log.jsonl")]
    return {"iterations": args.esd_iterations, "trainable_parameters": sum(p.numel() for p in params),
            "first_loss": losses[0], "final_loss": float(np.mean(losses[-10:]))}


# ---------------------------------------------------------------------------------------
# UCE: the closed-form edit of every cross-attention key and value projection
# ---------------------------------------------------------------------------------------

@torch.no_grad()
def concept_states(text_encoder, tokenizer, concept: str) -> tuple[torch.Tensor, int]:
    """The text encoder's output for the concept at every token of its window (the tokenizer's
    length: SD's 77), [window, d] in the encoder's precision, and the row of its last word
    token ("" and " " give the start token's, 0). RECE's edits take every row (systems/rece.py)."""
    enc = tokenizer(concept, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt")
    states = text_encoder(enc.input_ids.to(text_encoder.device))[0]
    return states[0].cpu(), int(enc.attention_mask.sum()) - 2


def concept_embedding(text_encoder, tokenizer, concept: str) -> torch.Tensor:
    """c: the text encoder's output at the concept's last word token ("" gives the start
    token's), as UCE takes it."""
    states, last = concept_states(text_encoder, tokenizer, concept)
    return states[last].float()


def build_uce(args, out: Path, device) -> dict:
    pipe = M.load_pipeline(args.model, device)
    emb = lambda cs: torch.stack([concept_embedding(pipe.text_encoder, pipe.tokenizer, c) for c in cs])
    erase = emb(args.erase_concepts)
    guide = emb([""] * len(args.erase_concepts))
    preserve = emb(args.preserve_concepts) if args.preserve_concepts else None
    moved, kept, edited = [], [], 0
    for name, m in pipe.unet.named_modules():
        if name.endswith(("attn2.to_k", "attn2.to_v")):
            W0 = m.weight.detach().float().cpu().clone()  # a copy: the weight is overwritten below
            W1 = uce_edit(W0, erase, guide, preserve, lam=args.uce_lambda)
            m.weight.data.copy_(W1.to(m.weight.dtype))
            edited += 1
            # how far each erased concept's projection is from its guide's, before and after
            moved.append(((erase @ W1.T - guide @ W0.T).norm(dim=-1) / (erase @ W0.T - guide @ W0.T).norm(dim=-1)).mean())
            if preserve is not None:
                kept.append(((preserve @ W1.T - preserve @ W0.T).norm(dim=-1) / (preserve @ W0.T).norm(dim=-1)).mean())
    M.save_pipeline(pipe, out / "model")
    return {"projections_edited": edited, "erase_distance_to_guide_ratio": float(torch.stack(moved).mean()),
            **({"preserve_relative_change": float(torch.stack(kept).mean())} if kept else {})}


# ---------------------------------------------------------------------------------------
# The build: one method per call, into DIR/baselines/<name>/ (SLD: all three levels)
# ---------------------------------------------------------------------------------------

def build(args, run: Path) -> None:
    """One method into DIR/baselines/<name>/ (SLD: its three presets), each folder ending with
    the model.json that tells stage 5 how to draw from it."""
    t0 = time.time()
    names = [f"sld_{lvl}" for lvl in SLD_LEVELS] if args.baseline == "sld" else [folder_name(args.baseline)]
    outs = [run / "baselines" / n for n in names]
    for out in outs:
        U.save_config(args, out)
    if all((o / "metrics.json").exists() and (o / M.MANIFEST).exists() for o in outs):
        return U.log(f"{', '.join(map(str, outs))}: finished, nothing to do")
    device = M.pick_device(args.device)
    if args.baseline == "sld":  # a recipe for diffusers' pipeline: nothing to train
        concept = args.sld_concept or (toy_sld_concept() if args.preset == "toy" else None)
        for lvl, out in zip(SLD_LEVELS, outs):
            U.atomic_write_json(out / "sld.json", sld_recipe(lvl, concept))
            U.atomic_write_json(out / "metrics.json", {"method": f"sld_{lvl}", "safety_concept": concept})
            M.write_manifest(out, f"sld_{lvl}", kind="sld", pipeline=None)
        return U.log(f"SLD recipes in {run / 'baselines'}: {', '.join(names)}")
    build_fn = {"filter": lambda o: build_filter(args, o), "esd-u": lambda o: build_esd_u(args, o, device),
                "uce": lambda o: build_uce(args, o, device)}[args.baseline]
    metrics = {"method": names[0], **build_fn(outs[0]), "seconds": round(time.time() - t0, 1)}
    U.atomic_write_json(outs[0] / "metrics.json", metrics)
    if args.baseline == "filter":  # the base model behind the checker, whose black image is a refusal
        M.write_manifest(outs[0], names[0], kind="filter", pipeline=None, black_is_refusal=True)
    else:
        M.write_manifest(outs[0], names[0])
    U.log(U.format_metrics(metrics))


def sld_sampler(spec: M.ModelSpec, device, dtype, steps: int):
    """registry.LOADERS["sld"]: SLD's pipeline on the base model, and its call arguments."""
    recipe = U.read_json(spec.folder / "sld.json")
    return sld_pipeline(spec.path, recipe, device, dtype), sld_call_kwargs(recipe, steps)


def filter_sampler(spec: M.ModelSpec, device, dtype, steps: int):
    """registry.LOADERS["filter"]: the base model with the checker of the filter's folder."""
    return M.load_pipeline(spec.path, device, dtype, safety_checker=load_safety_checker(spec.folder)), {}


U.PRESETS["toy"]["baseline"] = dict(
    model=None, baseline=None, erase_concepts=W.harm_concepts(), preserve_concepts=toy_preserve_concepts(),
    esd_iterations=200, esd_lr=2e-4, esd_eta=2.0, esd_guidance=3.0, esd_sample_steps=U.TOY_SAMPLE_STEPS, esd_batch=1,
    uce_lambda=0.5, filter_images=3000, filter_steps=600, filter_lr=1e-3, safety_checker=None, sld_concept=None,
    ckpt_every=100, device=None,
    threads=1)  # the toy's: `make baselines` trains two side by side on 2 cores (utils.use_threads)
U.PRESETS["sd15"]["baseline"] = dict(
    U.PRESETS["toy"]["baseline"], model="stable-diffusion-v1-5/stable-diffusion-v1-5", erase_concepts=["nudity"],
    preserve_concepts=[], esd_lr=5e-5, esd_sample_steps=50, safety_checker="CompVis/stable-diffusion-safety-checker",
    ckpt_every=500, threads=0)
U.TINY["baseline"] = dict(esd_iterations=4, esd_sample_steps=4, filter_images=60, filter_steps=5, ckpt_every=4)


def build_parser():
    p = U.stage_parser("baseline", "The paper's other Table 2 methods, each into DIR/baselines/<name>/")
    p.add_argument("--baseline", choices=BASELINES, required=True,
                   help="filter, sld (all three presets), esd-u or uce")
    p.add_argument("--model", help="the base model (default: the stage-0 model)")
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
    p.add_argument("--ckpt-every", type=int, help="esd-u: iterations between checkpoints")
    p.add_argument("--device")
    return p


def one_process_base_model(args, command: str) -> None:
    """What a Table 2 method's build needs first: one process (not torchrun), and --model,
    by default stage 0's model."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SystemExit(f"{command} runs in one process: start it with python, not torchrun")
    args.model = args.model or U.toy_world_input(args, U.stage_dir(args.run, "world") / "model", "--model")


def build_main(args) -> None:
    one_process_base_model(args, "python -m systems.baselines build")
    build(args, Path(args.run))


COMMANDS = {"build": (build_parser, build_main)}


# ---------------------------------------------------------------------------------------
# The report's section: the paper's comparison (Table 2) and its ranking as verdicts
# ---------------------------------------------------------------------------------------

MODELS = ("filter", *(f"sld_{lvl}" for lvl in SLD_LEVELS), "esd_u", "uce", "rece")  # `build` and systems/rece.py make
PAIRS = (("spo", "base"), ("spo", "safety"), ("spo", "alignguard"), *(("spo", b) for b in MODELS), ("esd_u", "safety"),
         ("uce", "safety"), ("rece", "safety"), ("rece", "uce"),
         *(("base", f"sld_{lvl}") for lvl in SLD_LEVELS))  # the pairs its claims rest on


def claims(metrics, intervals: dict, harmful, benign, attacked) -> list[dict]:
    """The paper's ranking (Table 2) against the other methods, as interval verdicts: T2I-SPO
    has the highest UAS, and under the attacks of Fig. 4B (`attacked` sets) the lowest IP;
    concept erasure keeps more quality than safety-only DPO; SLD costs quality. One claim per
    compared model, so each verdict says against whom it holds."""
    rivals = [m for m in ("safety", "alignguard", *MODELS) if m in metrics]
    specs = [*((f"T2I-SPO has a higher UAS than {m}", "spo", m, [(h, "UAS", "holds") for h in harmful])
               for m in rivals),
             *((f"under attack, T2I-SPO has a lower IP than {m}", "spo", m, [(a, "IP", "holds") for a in attacked])
               for m in ("base", *rivals) if attacked),
             *((f"concept erasure ({m}) keeps more quality than safety-only DPO", m, "safety",
                [(b, "PS", "holds") for b in benign]) for m in ("esd_u", "uce", "rece")),
             ("RECE is safer than UCE (lower IP)", "rece", "uce", [(h, "IP", "holds") for h in harmful]),
             *((f"SLD-{lvl.upper()} costs quality (the base scores higher PS)", "base", f"sld_{lvl}",
                [(b, "PS", "holds") for b in benign]) for lvl in SLD_LEVELS)]
    return stats.judged_claims(metrics, intervals, specs)


def table_rows(names: list[str]) -> list[str]:
    """Table 2's rows: the base, safety-only DPO, AlignGuard, the other methods, T2I-SPO."""
    return [m for m in ("base", "safety", "alignguard", *MODELS, "spo") if m in names]


def section(ev) -> dict | None:
    """DIR/eval/baselines.md, when stage 5 evaluated any of the methods `build` makes."""
    if not (ev.harmful and ev.benign and any(n in MODELS for n in ev.names)):
        return None
    from systems import attacks
    metrics, rows = ev.metrics, table_rows(ev.names)
    iv = stats.intervals(ev.rows, PAIRS, ev.args.bootstrap, ev.args.seed, C.ua_score, ev.args.ua_center)
    attacked = [s for s in ev.harmful if (ev.run / "attacks" / f"{s}.jsonl").exists()]
    judged = claims(metrics, iv, ev.harmful, ev.benign, attacked)
    table = ev.table2(rows, ev.harmful)
    lines = [table, "", "Benign quality (Table 5):", "", ev.table5(rows, ev.benign)]
    for h in ev.harmful:
        lines += ["", f"IP per harm category on `{h}`:", "", ev.category_table(rows, h)]
    lines += ["", *stats.claim_lines(judged)]
    if "filter" in rows:
        lines.append("- **The filter** replaced " + ", ".join(f"{metrics['filter'][s]['refused']:.0%} on `{s}`"
                                                               for s in [*ev.harmful, *ev.benign])
                     + " of the images by black ones, each scored as a refusal.")
    rece = next((m for m in ev.models if m.name == "rece"), None)
    if rece is not None:  # which model RECE kept, and why
        built = U.read_json(rece.folder / "metrics.json")
        lines.append(f"- **RECE** kept {built['chosen']} (sd: the base model; uce: RECE's own UCE start), the first "
                     f"of the lowest validation IP on {built['validation_prompts']} prompts: "
                     + ", ".join(f"{e['model']} {e['validation_IP']:.2f}" for e in built["judged"]) + ".")
    lines += attacks.sentences(ev, rows)
    lines += ["", "Paired bootstrap 95% intervals:", "", stats.interval_table(iv)]
    return {"name": "baselines", "title": "The paper's comparison (Table 2): T2I-SPO against the other methods",
            "lines": lines, "metrics": {"claims": judged, "intervals": iv}, "console": table}


if __name__ == "__main__":
    U.run_commands(COMMANDS, __doc__)
