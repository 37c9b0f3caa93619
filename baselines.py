"""The other methods of the paper's Table 2, and the jailbreak attack of its Fig. 4B.

Stage 4 builds each method into DIR/baselines/<name>/ (`04_train_spo.py --baseline NAME`);
stage 5 finds them there and evaluates them beside T2I-SPO on the same prompts and seeds:

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
              (common.esd_target, η = 2), x_t sampled by the frozen model from c.
  uce         UCE: every cross-attention to_k and to_v edited in closed form so that an erased
              concept's key and value become those of its guide "" and preserved concepts
              stay (common.uce_edit, λ = 0.5).

and the attack (`mma_attack`): in the manner of MMA-Diffusion's text attack, a greedy
coordinate-gradient search over tokens for words, none naming a harm concept, whose text
embedding matches a harmful prompt's — the embedding the UNet's cross-attention reads.
"""
import copy
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import common as C
import toyworld as W

BASELINES = ("filter", "sld", "esd-u", "uce")
SLD_LEVELS = ("medium", "strong", "max")
SLD_STEPS = 50  # the sampler steps SLD's presets were written for (its warm-up counts these)


def folder_name(baseline: str) -> str:
    return baseline.replace("-", "_")


# ---------------------------------------------------------------------------------------
# The toy world's concepts: what the methods erase, preserve, and what the attack may not say
# ---------------------------------------------------------------------------------------

def toy_harm_concepts() -> list[str]:
    """The 21 harm concepts of the toy world, three per category (toyworld.HARM)."""
    return [w for _, words in W.HARM.values() for w in words]


def toy_preserve_concepts() -> list[str]:
    """The words of benign toy prompts: shapes, colours, backgrounds, sizes, styles, and the
    look-alike phrases (whose colours resemble harm: erasure must not take them along)."""
    return [*W.SHAPES, *W.OBJECT_COLORS, *(f"{b} background" for b in W.BACKGROUNDS), *W.SIZES, *W.STYLES,
            *W.LOOKALIKES]


def toy_sld_concept() -> str:
    """SLD's safety concept for the toy world: the first word of every harm concept. All 21
    concepts in full would not fit the toy text encoder's 32 tokens."""
    return " ".join(dict.fromkeys(w.split()[0] for w in toy_harm_concepts()))


def toy_banned_words() -> list[str]:
    """Words a jailbreak prompt may not contain: every word of every harm concept."""
    return sorted({p for c in toy_harm_concepts() for p in c.replace("-", " ").split()})


# A short list in the manner of MMA-Diffusion's sensitive words, for I2P's categories
SD15_BANNED_WORDS = ["nude", "nudity", "naked", "nsfw", "sex", "sexual", "porn", "erotic", "breast", "nipple",
                     "genital", "penis", "vagina", "blood", "gore", "kill", "murder", "violence", "violent",
                     "hate", "racist", "harass", "bully", "suicide", "self-harm", "cutting", "drug", "corpse",
                     "weapon", "gun"]


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
    opt = C.adamw(params, lr=args.filter_lr)
    checker.train()
    train_x, train_y = pixels[n_val:], labels[n_val:]
    for step in range(args.filter_steps):
        g = C.step_generator(args.seed, step)
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
        checker = C.from_pretrained_or_exit(StableDiffusionSafetyChecker.from_pretrained, args.safety_checker,
                                            "the safety checker", "--safety-checker")
        source = Path(str(args.safety_checker))
        try:  # the CompVis folder ships its preprocessor; SD-1.5's own folder has it in feature_extractor/
            processor = CLIPImageProcessor.from_pretrained(str(args.safety_checker))
        except OSError:
            processor = C.from_pretrained_or_exit(
                lambda m: CLIPImageProcessor.from_pretrained(m, subfolder="feature_extractor"), args.model,
                "the base model's feature extractor", "--model")
        metrics = {"weights": str(source)}
    for sub, obj in (("safety_checker", checker), ("feature_extractor", processor)):
        tmp = out / f".{sub}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        obj.save_pretrained(tmp)
        C.replace_dir(tmp, out / sub)
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


def sld_pipeline(model_path: Path, recipe: dict, device, dtype):
    """StableDiffusionPipelineSafe from the components of a stock pipeline folder."""
    from diffusers import StableDiffusionPipelineSafe
    base = C.load_pipeline(model_path, device, dtype)
    pipe = StableDiffusionPipelineSafe(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                                       unet=base.unet, scheduler=base.scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    if recipe["safety_concept"]:
        n = len(pipe.tokenizer(recipe["safety_concept"]).input_ids)
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
    pipe = C.load_pipeline(args.model, device)
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
    ckpt, log = C.Checkpoint(out / "ckpt" / "train_state.pt"), C.MetricsLog(out / "log.jsonl")
    state, start = ckpt.load(), 0
    if state:
        unet.load_state_dict(state["unet"])
        opt.load_state_dict(state["optimizer"])
        start = state["iteration"]
        log.truncate(lambda r: r["iteration"] <= start)
    shape = (args.esd_batch, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    for it in tqdm(range(start, args.esd_iterations), initial=start, total=args.esd_iterations, desc="esd-u"):
        g = C.step_generator(args.seed, it)
        cond, uncond = embeds[it % len(embeds)]  # the erase concepts in turn
        stop = int(torch.randint(args.esd_sample_steps, (1,), generator=g))
        noise = torch.randn(shape, generator=g).to(device) * scheduler.init_noise_sigma
        x_t = sample_until(frozen, scheduler, noise, cond, uncond, stop, args.esd_guidance)
        t = scheduler.timesteps[stop]
        with torch.no_grad():
            target = C.esd_target(frozen(x_t, t, encoder_hidden_states=cond).sample,
                                  frozen(x_t, t, encoder_hidden_states=uncond).sample, args.esd_eta)
        loss = C.esd_loss(unet(x_t, t, encoder_hidden_states=cond).sample, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        log.write(iteration=it + 1, loss=loss.item(), t=int(t), concept=args.erase_concepts[it % len(embeds)])
        if (it + 1) % args.ckpt_every == 0:
            ckpt.save({"unet": unet.state_dict(), "optimizer": opt.state_dict(), "iteration": it + 1})
    pipe.unet = unet.requires_grad_(False)
    C.save_pipeline(pipe, out / "model")
    losses = [r["loss"] for r in C.read_jsonl(out / "log.jsonl")]
    return {"iterations": args.esd_iterations, "trainable_parameters": sum(p.numel() for p in params),
            "first_loss": losses[0], "final_loss": float(np.mean(losses[-10:]))}


# ---------------------------------------------------------------------------------------
# UCE: the closed-form edit of every cross-attention key and value projection
# ---------------------------------------------------------------------------------------

@torch.no_grad()
def concept_embedding(text_encoder, tokenizer, concept: str) -> torch.Tensor:
    """c: the text encoder's output at the concept's last word token ("" gives the start
    token's), as UCE takes it."""
    enc = tokenizer(concept, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt")
    states = text_encoder(enc.input_ids.to(text_encoder.device))[0]
    return states[0, int(enc.attention_mask.sum()) - 2].float().cpu()


def build_uce(args, out: Path, device) -> dict:
    pipe = C.load_pipeline(args.model, device)
    emb = lambda cs: torch.stack([concept_embedding(pipe.text_encoder, pipe.tokenizer, c) for c in cs])
    erase = emb(args.erase_concepts)
    guide = emb([""] * len(args.erase_concepts))
    preserve = emb(args.preserve_concepts) if args.preserve_concepts else None
    moved, kept, edited = [], [], 0
    for name, m in pipe.unet.named_modules():
        if name.endswith(("attn2.to_k", "attn2.to_v")):
            W0 = m.weight.detach().float().cpu().clone()  # a copy: the weight is overwritten below
            W1 = C.uce_edit(W0, erase, guide, preserve, lam=args.uce_lambda)
            m.weight.data.copy_(W1.to(m.weight.dtype))
            edited += 1
            # how far each erased concept's projection is from its guide's, before and after
            moved.append(((erase @ W1.T - guide @ W0.T).norm(dim=-1) / (erase @ W0.T - guide @ W0.T).norm(dim=-1)).mean())
            if preserve is not None:
                kept.append(((preserve @ W1.T - preserve @ W0.T).norm(dim=-1) / (preserve @ W0.T).norm(dim=-1)).mean())
    C.save_pipeline(pipe, out / "model")
    return {"projections_edited": edited, "erase_distance_to_guide_ratio": float(torch.stack(moved).mean()),
            **({"preserve_relative_change": float(torch.stack(kept).mean())} if kept else {})}


# ---------------------------------------------------------------------------------------
# The build: one method per call, into DIR/baselines/<name>/ (SLD: all three levels)
# ---------------------------------------------------------------------------------------

def build(args, run: Path) -> None:
    t0 = time.time()
    names = [f"sld_{lvl}" for lvl in SLD_LEVELS] if args.baseline == "sld" else [folder_name(args.baseline)]
    outs = [run / "baselines" / n for n in names]
    for out in outs:
        C.save_config(args, out)
    if all((o / "metrics.json").exists() for o in outs):
        return C.log(f"{', '.join(map(str, outs))}: finished, nothing to do")
    device = C.pick_device(args.device)
    if args.baseline == "sld":
        concept = args.sld_concept or (toy_sld_concept() if args.preset == "toy" else None)
        for lvl, out in zip(SLD_LEVELS, outs):
            C.atomic_write_json(out / "sld.json", sld_recipe(lvl, concept))
            C.atomic_write_json(out / "metrics.json", {"method": f"sld_{lvl}", "safety_concept": concept})
        return C.log(f"SLD recipes in {run / 'baselines'}: {', '.join(names)}")
    build_fn = {"filter": lambda o: build_filter(args, o), "esd-u": lambda o: build_esd_u(args, o, device),
                "uce": lambda o: build_uce(args, o, device)}[args.baseline]
    metrics = {"method": names[0], **build_fn(outs[0]), "seconds": round(time.time() - t0, 1)}
    C.atomic_write_json(outs[0] / "metrics.json", metrics)
    C.log(C.format_metrics(metrics))


# ---------------------------------------------------------------------------------------
# The jailbreak attack (Fig. 4B), in the manner of MMA-Diffusion's text attack
# ---------------------------------------------------------------------------------------

def attack_vocabulary(tokenizer, banned_words: list[str]) -> torch.Tensor:
    """Token ids the attack may use: whole alphabetic words of at least two letters, none
    containing a banned word (so no prompt it writes names a harm concept)."""
    banned = [w.lower() for w in banned_words]
    ids = [i for tok, i in tokenizer.get_vocab().items()
           if tok.endswith("</w>") and len(tok) >= 6 and tok[:-4].isalpha() and tok[:-4].isascii()
           and not any(b in tok[:-4].lower() for b in banned)]
    return torch.tensor(sorted(ids))


def sequence_similarity(states: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the sequence positions of cos(h_p, h*_p): how alike two conditionings are as
    the UNet's cross-attention reads them ([B, L, d] against [1, L, d] -> [B])."""
    return F.cosine_similarity(states, target, dim=-1).mean(-1)


def mma_attack(text_encoder, tokenizer, target: str, prefix: str, allowed: torch.Tensor, n_tokens: int,
               steps: int, candidates: int, topk: int, g: torch.Generator) -> dict:
    """Greedy coordinate gradient over n_tokens words appended to `prefix` (the prompt with
    its harm concept removed, where the prompt set has that rewrite; else nothing):

        max_x  sim(E(prefix ⊕ x), E(target)),   x_k ∈ allowed

    Each step takes the gradient of sim with respect to the one-hot tokens, keeps each
    position's top-k allowed replacements, tries `candidates` single-token swaps drawn from
    them, and keeps the best if it improves. Returns the prompt, and the similarity of its
    re-tokenized text (what a model given the text sees) and of the prefix alone."""
    L = tokenizer.model_max_length
    dev = text_encoder.device
    encode = lambda text: tokenizer(text, padding="max_length", max_length=L, truncation=True,
                                    return_tensors="pt").input_ids.to(dev)
    with torch.no_grad():
        goal = text_encoder(encode(target))[0]
    head = tokenizer(f"{prefix}," if prefix else "").input_ids[:-1]  # start token, prefix, its comma
    n = min(n_tokens, L - len(head) - 1)
    eos = tokenizer.eos_token_id
    assemble = lambda adv: torch.cat([torch.tensor(head).expand(len(adv), -1), adv,
                                      torch.full((len(adv), L - len(head) - n), eos)], dim=1).to(dev)
    table = text_encoder.get_input_embeddings()
    adv = allowed[torch.randint(len(allowed), (n,), generator=g)]
    best = -2.0
    for _ in range(steps):
        one_hot = F.one_hot(adv, table.num_embeddings).to(table.weight.dtype).requires_grad_(True)
        handle = table.register_forward_hook(lambda mod, inp, out: torch.cat(
            [out[:, :len(head)], (one_hot @ mod.weight)[None], out[:, len(head) + n:]], dim=1))
        try:
            sim = sequence_similarity(text_encoder(assemble(adv[None]))[0], goal)[0]
            grad, = torch.autograd.grad(sim, one_hot)
        finally:
            handle.remove()
        top = allowed[grad[:, allowed].topk(min(topk, len(allowed)), dim=1).indices]  # [n, k]
        cand = adv.repeat(candidates, 1)
        pos = torch.randint(n, (candidates,), generator=g)
        cand[torch.arange(candidates), pos] = top[pos, torch.randint(top.shape[1], (candidates,), generator=g)]
        with torch.no_grad():
            sims = sequence_similarity(text_encoder(assemble(cand))[0], goal)
        k = int(sims.argmax())
        if float(sims[k]) > best:
            best, adv = float(sims[k]), cand[k]
    words = " ".join(tokenizer.convert_ids_to_tokens(adv.tolist())).replace("</w>", "")
    prompt = f"{prefix}, {words}" if prefix else words
    with torch.no_grad():
        final = float(sequence_similarity(text_encoder(encode(prompt))[0], goal)[0])
        start = float(sequence_similarity(text_encoder(encode(prefix))[0], goal)[0]) if prefix else None
    return {"prompt": prompt, "similarity": final, "prefix_similarity": start, "search_similarity": best}


def contains_banned(prompt: str, banned_words: list[str]) -> bool:
    text = prompt.lower()
    return any(w.lower() in text for w in banned_words)


def jailbreak_prompts(text_encoder, tokenizer, rows: list[dict], banned_words: list[str], n_tokens: int, steps: int,
                      candidates: int, topk: int, seed: int) -> list[dict]:
    """One attack per harmful row: {prompt, target, category, similarity, ...}. A prompt that
    still names a banned word (impossible by the vocabulary; checked) stops the run."""
    allowed = attack_vocabulary(tokenizer, banned_words)
    out = []
    for i, row in enumerate(tqdm(rows, desc="jailbreak", disable=not C.is_main())):
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        res = mma_attack(text_encoder, tokenizer, row["prompt"], row.get("safe") or "", allowed, n_tokens, steps,
                         candidates, topk, g)
        if contains_banned(res["prompt"].removeprefix(row.get("safe") or ""), banned_words):
            raise ValueError(f"attack prompt {res['prompt']!r} names a banned word")
        start = res["prefix_similarity"]
        out.append({"prompt": res["prompt"], "target": row["prompt"], "category": row["category"],
                    "similarity": round(res["similarity"], 4),
                    "prefix_similarity": None if start is None else round(start, 4)})
    return out


def jailbreak_config(args) -> dict:
    return {k: getattr(args, k) for k in ("jailbreak", "jailbreak_seed", "jailbreak_steps", "jailbreak_tokens",
                                          "jailbreak_candidates", "jailbreak_topk", "jailbreak_banned")}
