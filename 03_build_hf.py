"""Stage 3 — LibraAlign-HF: high-fidelity preference pairs with dual annotation (paper Sec. 3.2).

The Coarse pairs of stage 1 only say which image is more harmful. To align a model without
teaching it that "safe" means "worse", the paper builds a second, smaller set of 10,760 pairs:

  * 8,265 harmful→safe pairs by safety-aware inpainting. Why not prompt editing: simple
    editing ("nude woman" → "woman") makes low-fidelity pairs with drastic semantic shifts,
    a strong bias that conflates safety with quality degeneration and instruction violation.
    Instead a harmful prompt c gives a harmful image x_h, and a safe rewrite c_safe of the
    prompt (GPT-4's job in the paper; the toy world's grammar drops the harm phrase) guides an
    img2img pipeline (SDXL's in the paper) INITIALISED FROM x_h: the safe counterpart x_s
    keeps x_h's background, composition and style, so the pair isolates the safety-relevant
    change. Both images are paired under the ORIGINAL harmful prompt c: this is what the
    aligned model should draw when asked for harm. The paper reports only the pairs it kept;
    here the judge keeps a pair when x_h shows harm and x_s, its "safe counterpart", none
    (`--keep harm-free`; or x_s merely the safer: `--keep safer`), and counts the rest.
  * 2,495 safe-safe pairs of varying quality from Pick-a-Pic, so that the model does not
    sacrifice quality on benign prompts: --safe-pairs reads such pairs (`python -m lib.data
    pickapic` writes them). Pick-a-Pic's images come from newer generators than SD-1.5, SDXL
    variants among them; so without --safe-pairs the toy pairs the model's sample of a prompt
    (--safe-prompts; default the prompt stage's harmless prompts) with its world's own image of
    it (`--safe-source world`), or with a second sample at another guidance (`samples`).

AlignGuard's CoProV2 pairs by PROMPT EDITING instead (`--pairing prompt-edit`: the safe image
a sample of the safe prompt, with a seed of its own; `--coprov2 FILE` reads its public CSV, whose
pairs the judge does not filter). Both pairings keep each pair's harm category (AlignGuard's
per-category experts) and plan the same harmful images and safe-safe pairs; `--reuse-images hf`
copies those samples from the inpainted build, so that a pair both keep differs in its safe side.

Every image is annotated twice, the paper's "dual-dimension preference vector": quality r(x, c)
(PickScore for sd15, as in the paper; the toy's exact quality reward) and cost C(x) from the
stage-2 SCM. Data labelled for safety alone teaches that safety costs quality; with both, stage
4 prefers the safer image without preferring a worse one (R = r − λ·C, Eqs. 6-8; Secs. 1, 3.2).
Safe-safe pairs get a cost too, to penalise subtle risks in otherwise benign-looking images.
This stage picks no winner; it records both sides, "a" and "b".

Reads (DIR = --run): the T2I model (--model; default stage 0's), harmful prompts with their
safe rewrites (--harmful-prompts: JSONL {prompt, safe_prompt, category}; default the prompt
stage's), safe prompts or pairs, and the SCM in DIR/scm.
Writes (NAME = --name: hf, or e.g. coprov2 for prompt-edited pairs):
  DIR/NAME/images/*.png                both images of every kept pair
  DIR/NAME/shards/pairs-*.json         annotated pairs, one file per chunk (written whole)
  DIR/NAME/hf_pairs.jsonl              all pairs: {"id", "kind", "prompt", "category", "a", "b"}
  DIR/NAME/metrics.json, config.json
A killed run skips the chunks whose shard exists. Runs as `python 03_build_hf.py` or under
`torchrun --nproc_per_node=N`: each process builds every N-th chunk, rank 0 assembles.
"""
import random
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from lib import data as D
from lib import judge_client as J
from lib import models as M
from lib import scorers as S
from lib import toyworld as W
from lib import utils as U

# Whose each number is. Sec. 3.2 gives LibraAlign-HF's make-up (8,265 harmful-safe pairs by
# SDXL image-to-image from the harmful image, 2,495 safe-safe pairs from Pick-a-Pic) and its
# quality reward (PickScore); it gives no img2img strength, sampler or guidance scale.
U.PRESETS["toy"]["hf"] = dict(
    name="hf", pairing="inpaint", coprov2=None, reuse_images=None,  # the paper's pairing
    model=None, img2img_model=None,  # None: stage 0's model draws both sides
    harmful_prompts=None, safe_prompts=None, safe_pairs=None,  # None: the prompt stage's files
    # the toy's: an even 600 + 600 (the paper's 8,265 : 2,495 is about 3.3 : 1), built in 95 s
    n_harmful_safe=600, n_safe_safe=600,
    keep="harm-free",  # ours: Sec. 3.2's "safe counterpart", free of harm (docs/results.md)
    # the toy's, the paper giving no strength: 6 of the 10 sampling steps re-run from x_h;
    # 94.4% of the safe sides judged the safer are then free of harm (docs/results.md)
    strength=0.6,
    sample_steps=U.TOY_SAMPLE_STEPS, guidance=4.0,  # every toy stage's sampling (lib/utils.py)
    # the toy's: none (1) to strong (7) around its 4, so a safe-safe pair differs in quality
    safe_guidances=[1.0, 2.0, 4.0, 7.0],
    safe_source="world",  # as Pick-a-Pic's, a stronger generator's image (docs/results.md)
    dtype="float32",  # the toy's, as stage 1's (its reason)
    chunk_size=200,  # the toy's: a kill redoes at most 200 pairs
    judge="toy", judge_model="gpt-4o",  # the toy's exact judge; gpt-4o for --judge openai
    judge_base_url=None, judge_timeout=60.0, judge_retries=5,  # as stage 1's (its reasons)
    quality="toy", pickscore_model=None, pickscore_processor=None,  # the toy's exact r(x, c)
    device=None)
U.PRESETS["sd15"]["hf"] = dict(
    name="hf", pairing="inpaint", coprov2=None, reuse_images=None,  # the paper's pairing
    # the paper draws with SDXL (Sec. 3.2); SD-1.5 here, unless --model / --img2img-model
    model="stable-diffusion-v1-5/stable-diffusion-v1-5", img2img_model=None,
    harmful_prompts=None, safe_prompts=None, safe_pairs=None,  # None: the prompt stage's files
    # ours: the paper keeps 8,265 harmful-safe pairs, not saying how many it drew: 10,000 before
    # the judge's filter. Its 2,495 safe-safe pairs are Pick-a-Pic's (--safe-pairs), not drawn
    n_harmful_safe=10000, n_safe_safe=0,
    keep="harm-free",  # ours, as the toy's (its reason)
    strength=0.75,  # the paper gives none: CompVis/stable-diffusion scripts/img2img.py's default
    sample_steps=30, guidance=7.5,  # ours: diffusers' SD default guidance; steps as stage 1's
    # ours, used only without --safe-pairs: around SD-1.5's 7.5, as the toy's around its 4
    safe_guidances=[3.0, 5.0, 7.5, 10.0], safe_source="samples",  # no world renders real prompts
    dtype="auto", chunk_size=64,  # ours: a kill redoes at most 64 pairs a process
    judge="openai", judge_model="gpt-4o",  # GPT-4o, the paper's judge of LibraAlign-Coarse
    judge_base_url=None, judge_timeout=60.0, judge_retries=5,  # as stage 1's (its reasons)
    quality="pickscore", pickscore_model=None, pickscore_processor=None,  # PickScore (Sec. 3.2)
    device=None)
# --tiny, the toy's for tests: 14 pairs in 3 chunks, the last one short, to resume or split over
# two processes; at 4 sampling steps, strength 0.9 re-runs 3 of them (0.6 would re-run 2). The
# tiny world's model draws almost no mark the judge calls harm: "safer" pairs are kept
U.TINY["hf"] = dict(n_harmful_safe=8, n_safe_safe=6, chunk_size=5, sample_steps=4, strength=0.9,
                    keep="safer")


def parse(argv=None):
    p = U.stage_parser("hf", __doc__.splitlines()[0])
    p.add_argument("--name", help="output folder under --run (hf: LibraAlign-HF; e.g. coprov2)")
    p.add_argument("--pairing", choices=["inpaint", "prompt-edit"], help="a harmful prompt's safe "
                   "side: img2img from its image (inpainting) or a sample of the safe prompt")
    p.add_argument("--coprov2", help="AlignGuard's CoProV2 CSV (image paths relative to it): "
                                     "its pairs instead of generated harmful-safe ones")
    p.add_argument("--reuse-images", metavar="NAME", help="copy the samples the stage-3 build "
                   "DIR/NAME holds (same prompt, seed, guidance, model, steps, dtype)")
    p.add_argument("--model", help="T2I model for the harmful images (default: stage 0's)")
    p.add_argument("--img2img-model", help="img2img pipeline for the safe counterparts, e.g. "
                                           "SDXL's (default: --model's components)")
    p.add_argument("--harmful-prompts", help="JSONL with prompt and safe_prompt columns")
    p.add_argument("--safe-prompts", nargs="+",
                   help="safe prompt sets, files or hf:IDs (default: DIR/prompts/safe.jsonl)")
    p.add_argument("--safe-pairs", help="Pick-a-Pic-style JSONL {prompt, image_a, image_b} "
                                        "of safe pairs, instead of generating them")
    p.add_argument("--n-harmful-safe", type=int, help="harmful prompts (pairs before the filter)")
    p.add_argument("--n-safe-safe", type=int, help="safe-safe pairs to generate")
    p.add_argument("--keep", choices=["harm-free", "safer"], help="harmful-safe pairs kept: "
                   "x_h judged harmful and x_s free of harm, or x_s merely the safer")
    p.add_argument("--strength", type=float, help="img2img: share of the diffusion re-run from x_h")
    p.add_argument("--sample-steps", type=int)
    p.add_argument("--guidance", type=float, help="guidance of x_h and its safe counterpart")
    p.add_argument("--safe-guidances", type=float, nargs="+", help="safe-safe pairs' guidances")
    p.add_argument("--safe-source", choices=["world", "samples"], help="a safe-safe pair's second "
                   "image, beside a sample: the toy world's own image of the prompt, or a sample")
    p.add_argument("--dtype", choices=M.SAMPLE_DTYPES, help="sampling precision; auto: half "
                   "precision where the hardware runs it natively (models.sample_dtype)")
    p.add_argument("--chunk-size", type=int, help="pairs per resumable chunk")
    p.add_argument("--judge", choices=["toy", "openai"])
    J.add_flags(p)
    p.add_argument("--quality", choices=["toy", "pickscore"], help="the quality reward r(x, c)")
    p.add_argument("--pickscore-model")
    p.add_argument("--pickscore-processor")
    p.add_argument("--device")
    return U.parse_args(p, argv)


# ---------------------------------------------------------------------------------------
# The plan: every pair to build, in a fixed order, so a resumed run builds the same pairs
# ---------------------------------------------------------------------------------------

def prompt_files(args) -> tuple[str | None, list[str]]:
    """(harmful prompt file or None with --coprov2, safe prompt files), each checked: the
    prompt stage's files by default, named with the stage to run when missing."""
    run = Path(args.run)
    harmful = args.harmful_prompts or str(run / "prompts" / "harmful.jsonl")
    harmful = None if args.coprov2 else harmful
    drawn = args.n_safe_safe and not (args.safe_prompts or args.safe_pairs)  # from the defaults
    default_safe = [str(run / "prompts" / "safe.jsonl")] if drawn else []
    mine = [f for f in [harmful, *default_safe] if f and f != args.harmful_prompts]
    U.require_inputs(mine, "prompts")
    for flag, f in (("--harmful-prompts", args.harmful_prompts), ("--coprov2", args.coprov2)):
        if f and not Path(f).exists():
            raise U.DataError(f"{flag} {f}: file not found")
    return harmful, args.safe_prompts or default_safe


def harmful_safe_pair(args, row: dict, seed: int, where: str) -> dict:
    """One harmful prompt's pair: side a its harmful image, side b the safe rewrite's image."""
    if not isinstance(row.get("prompt"), str) or not isinstance(row.get("safe_prompt"), str):
        raise U.DataError(f"{where}: a harmful prompt row needs 'prompt' and 'safe_prompt'")
    # one seed draws the harmful image and, for inpainting, the img2img noise of its safe side;
    # prompt editing draws the safe side from a seed of its own
    if args.pairing == "inpaint":
        source = {"source": "img2img", "seed": seed, "strength": args.strength}
    else:
        source = {"source": "t2i", "seed": seed + 250_000}
    category = ", ".join(D.harm_categories(row.get("category"), where)) or None
    # the pair is trained under the HARMFUL prompt: what the model should draw when asked for harm
    return {"kind": "harmful-safe", "prompt": row["prompt"], "category": category,
            "a": {"role": "harmful", "source": "t2i", "prompt": row["prompt"], "seed": seed,
                  "guidance": args.guidance},
            "b": {"role": "safe", "prompt": row["safe_prompt"], "guidance": args.guidance,
                  **source}}


def safe_safe_pairs(args, safe_files: list[str], rng: random.Random) -> list[dict]:
    """Two images of one safe prompt that differ in quality, not in safety: the composite reward
    keeps teaching quality where safety has nothing to say (Sec. 3.2's quality-preserving pairs).
    Side a: the model's sample at one guidance scale; side b: the world's own image of the
    prompt (--safe-source world, its layout drawn from the seed), or a sample at another."""
    safe = [r for f in safe_files for r in D.load_prompt_set(f)[0]]
    rng.shuffle(safe)  # the sets' prompts mixed, whatever the count
    out = []
    for i in range(args.n_safe_safe):
        prompt = safe[i % len(safe)]["prompt"]
        seed = args.seed * 1_000_000 + 500_000 + 2 * i
        g_a, g_b = rng.sample(args.safe_guidances, 2)
        side = {"role": "safe", "source": "t2i", "prompt": prompt}
        if args.safe_source == "world" and not W.is_prompt(prompt):
            raise U.DataError(f"--safe-source world: the toy world has no image of {prompt!r}")
        b = ({**side, "source": "world", "seed": seed + 1} if args.safe_source == "world"
             else {**side, "seed": seed + 1, "guidance": g_b})
        out.append({"kind": "safe-safe", "prompt": prompt, "category": None,
                    "a": {**side, "seed": seed, "guidance": g_a}, "b": b})
    return out


def plan_pairs(args) -> list[dict]:
    """Every pair, sides "a" and "b" as specs of how to get each image (a t2i sample, an img2img
    from side a, a file, the world's image), numbered hf-0000000, ... Seeds are functions of
    the position only, so a resumed or distributed run plans the same images."""
    harmful_file, safe_files = prompt_files(args)
    rng = random.Random(args.seed + 3)
    plan = D.read_coprov2(Path(args.coprov2)) if args.coprov2 else []
    if len(plan) > args.n_harmful_safe:
        U.log(f"{args.coprov2}: the first {args.n_harmful_safe} of its {len(plan)} pairs "
              f"(--n-harmful-safe)")
        plan = plan[: args.n_harmful_safe]
    rows = list(U.iter_jsonl(harmful_file))[: args.n_harmful_safe] if harmful_file else []
    for lineno, row in rows:
        seed = args.seed * 1_000_000 + len(plan)
        plan.append(harmful_safe_pair(args, row, seed, f"{harmful_file}:{lineno}"))
    if args.safe_pairs:
        plan += D.read_safe_pairs(Path(args.safe_pairs))
    else:
        plan += safe_safe_pairs(args, safe_files, rng)
    for n, item in enumerate(plan):
        item["id"] = f"hf-{n:07d}"
    return plan


# ---------------------------------------------------------------------------------------
# Generation: text-to-image, then img2img initialised from the harmful image
# ---------------------------------------------------------------------------------------

def text_to_image(pipe, specs: list[dict], steps: int) -> list[np.ndarray]:
    """Sample every t2i spec, one `generate` call per guidance scale, results in spec order."""
    out = [None] * len(specs)
    for g in sorted({s["guidance"] for s in specs}):
        idx = [i for i, s in enumerate(specs) if s["guidance"] == g]
        prompts, seeds = ([specs[i][k] for i in idx] for k in ("prompt", "seed"))
        for i, img in zip(idx, M.generate(pipe, prompts, seeds, steps, g)):
            out[i] = img
    return out


@torch.no_grad()
def safety_aware_inpainting(i2i, harmful: list[np.ndarray], specs: list[dict], steps: int,
                            batch_size: int = 64) -> list[np.ndarray]:
    """Sec. 3.2: img2img from each harmful image x_h, guided by the safe rewrite of its prompt.
    `strength` of the schedule is re-run from x_h noised to that level, so what survives of
    x_h is its coarse layout — composition and style — while the harm can go."""
    from PIL import Image
    out = []
    for i in range(0, len(specs), batch_size):
        part = specs[i:i + batch_size]
        gens = [torch.Generator("cpu").manual_seed(int(s["seed"])) for s in part]
        init = [Image.fromarray(x) for x in harmful[i:i + batch_size]]
        images = i2i(prompt=[s["prompt"] for s in part], image=init,
                     strength=part[0]["strength"], num_inference_steps=steps,
                     guidance_scale=part[0]["guidance"], generator=gens,
                     output_type="np").images
        out.extend(M.to_uint8(images))
    return out


def mark_shared_samples(args, plan: list[dict], dtype: torch.dtype) -> None:
    """--reuse-images NAME: every text-to-image side of `plan` that the stage-3 build DIR/NAME
    holds gets `copied_from`, its image path under DIR. A sample is a function of its prompt,
    seed and guidance once model, sampler steps and dtype agree, which is checked."""
    src = Path(args.run) / args.reuse_images
    U.require_inputs([src / "config.json", src / "hf_pairs.jsonl"], "hf")
    theirs = U.read_json(src / "config.json")
    mine = {"model": args.model, "sample_steps": args.sample_steps, "sample_dtype": str(dtype)}
    diff = [f"{k} {theirs.get(k)!r} there, {v!r} here" for k, v in mine.items()
            if theirs.get(k) != v]
    if diff:
        raise SystemExit(f"--reuse-images {args.reuse_images}: {src} was drawn with other "
                         f"settings ({'; '.join(diff)}): build with the same ones or leave "
                         f"out --reuse-images")
    key = lambda side: (side["prompt"], side["seed"], side["guidance"])
    shared = {}
    for _, pair in U.iter_jsonl(src / "hf_pairs.jsonl"):
        for side in (pair["a"], pair["b"]):
            if side["source"] == "t2i":
                shared[key(side)] = f"{args.reuse_images}/{side['path']}"
    for side in (side for p in plan for side in (p["a"], p["b"])):
        if side["source"] == "t2i" and key(side) in shared:
            side["copied_from"] = shared[key(side)]


def draw_images(args, chunk: list[dict], pipe, i2i, out: Path) -> dict:
    """Every image of a chunk by (pair id, side): the t2i samples (or --reuse-images' copies),
    the safe sides inpainted from their harmful images (Sec. 3.2), the images given as files."""
    images = {(p["id"], s): U.load_png(out.parent / p[s]["copied_from"])
              for p in chunk for s in ("a", "b") if "copied_from" in p[s]}
    t2i = [(p, s) for p in chunk for s in ("a", "b")
           if p[s]["source"] == "t2i" and (p["id"], s) not in images]
    drawn = text_to_image(pipe, [p[s] for p, s in t2i], args.sample_steps)
    images.update({(p["id"], s): img for (p, s), img in zip(t2i, drawn)})
    inpaint = [p for p in chunk if p["b"]["source"] == "img2img"]
    if inpaint:
        harmful = [images[p["id"], "a"] for p in inpaint]
        safe = safety_aware_inpainting(i2i, harmful, [p["b"] for p in inpaint],
                                       args.sample_steps)
        images.update({(p["id"], "b"): img for p, img in zip(inpaint, safe)})
    for p in chunk:
        for s in ("a", "b"):
            if p[s]["source"] == "file":
                images[p["id"], s] = U.load_png(p[s]["file"])
            elif p[s]["source"] == "world":  # the toy world's own image, no model's
                images[p["id"], s] = W.reference_render(p[s]["prompt"], p[s]["seed"])
    return images


def judge_filter(args, chunk: list[dict], images: dict, judge) -> tuple[list[dict], Counter]:
    """(kept pairs, dropped ones by reason): a harmful-safe pair is kept when the judge finds x_s
    the safer and, with --keep harm-free, x_h harmful (severity >= 1) and x_s not (0): a rewrite
    can leave harm, a harmful prompt draw none. CoProV2's pairs are taken as they are."""
    kept, dropped = [], Counter()
    for p in chunk:
        if p["kind"] == "harmful-safe" and p.get("judge", True):
            verdict = judge.compare(images[p["id"], "a"], images[p["id"], "b"])
            harmful, safe = verdict["severity"] if verdict else (None, None)
            reason = ("skipped_no_answer" if verdict is None  # unusable: counted, never guessed
                      else "dropped_not_safer" if verdict["winner"] != 0
                      else "dropped_harm_left" if args.keep == "harm-free" and safe > 0
                      else "dropped_no_harm" if args.keep == "harm-free" and harmful == 0 else None)
            if reason:
                dropped[reason] += 1
                continue
            p["a"]["severity"], p["b"]["severity"] = harmful, safe
        kept.append(p)
    return kept, dropped


def annotate(kept: list[dict], images: dict, quality, scm, out: Path) -> list[dict]:
    """Sec. 3.2's dual annotation of both sides of every kept pair: r(x, c) under the pair's
    prompt c and C(x) from the SCM, which stage 4 combines as R = r − λ·C (Eq. 6). Each image
    is saved beside its annotations."""
    flat = [(p, s) for p in kept for s in ("a", "b")]
    imgs = [images[p["id"], s] for p, s in flat]
    r = quality(imgs, [p["prompt"] for p, _ in flat])
    cost = scm.cost(imgs).tolist() if imgs else []
    for (p, s), img, q, c in zip(flat, imgs, r, cost):
        path = f"images/{p['id']}_{s}.png"
        U.save_png(out / path, img)
        p[s].update(path=path, quality=float(q), cost=float(c))
        p[s].pop("file", None)
    return kept


def build_chunk(args, chunk: list[dict], pipe, i2i, judge, quality, scm, out: Path) -> dict:
    """Images, the judge's filter and the dual annotation of one chunk of planned pairs: the
    chunk's shard (a file written whole) is what a resumed run finds done."""
    images = draw_images(args, chunk, pipe, i2i, out)
    kept, dropped = judge_filter(args, chunk, images, judge)
    return {"pairs": annotate(kept, images, quality, scm, out), **dropped}


def load_models(args, model: str, device, dtype, scm_dir: Path):
    """(T2I pipeline, img2img pipeline, judge, quality reward, SCM). The img2img pipeline is
    another model's with --img2img-model (the paper draws with SDXL), or the T2I pipeline's
    components, shared rather than loaded twice."""
    from diffusers import AutoPipelineForImage2Image
    pipe = M.from_pretrained_or_exit(lambda m: M.load_pipeline(m, device, dtype), model,
                                     "the T2I model", "--model")
    if args.img2img_model:
        i2i = M.from_pretrained_or_exit(
            lambda m: AutoPipelineForImage2Image.from_pretrained(m, dtype=dtype),
            args.img2img_model, "the img2img model", "--img2img-model").to(device)
    else:
        i2i = AutoPipelineForImage2Image.from_pipe(pipe)
    i2i.set_progress_bar_config(disable=True)
    judge = S.make_judge(args.judge, args.judge_model, args.judge_base_url, args.judge_timeout,
                         args.judge_retries)
    quality = S.make_quality_reward(args.quality, device, args.pickscore_model,
                                    args.pickscore_processor)
    return pipe, i2i, judge, quality, S.load_scm(scm_dir, device)


def hf_metrics(shards: list[dict], records: list[dict]) -> dict:
    """The build's counts, and how well inpainting did: harm gone entirely, at what quality."""
    hs = [p for p in records if p["kind"] == "harmful-safe"]
    ss = [p for p in records if p["kind"] == "safe-safe"]
    mean = lambda xs: float(np.mean(xs)) if xs else float("nan")
    return {
        "n_pairs": len(records), "n_harmful_safe": len(hs), "n_safe_safe": len(ss),
        "harmful_safe_by_category": dict(sorted(Counter(p["category"] for p in hs).items())),
        **{k: sum(s.get(k, 0) for s in shards) for k in (
            "dropped_not_safer", "dropped_harm_left", "dropped_no_harm", "skipped_no_answer")},
        "share_safe_side_severity_0": mean([p["b"]["severity"] == 0 for p in hs
                                            if "severity" in p["b"]]),
        "quality_harmful_side": mean([p["a"]["quality"] for p in hs]),
        "quality_safe_side": mean([p["b"]["quality"] for p in hs]),
        "cost_harmful_side": mean([p["a"]["cost"] for p in hs]),
        "cost_safe_side": mean([p["b"]["cost"] for p in hs]),
        "quality_gap_safe_safe": mean([abs(p["a"]["quality"] - p["b"]["quality"]) for p in ss]),
        "images_copied": sum("copied_from" in p[s] for p in records for s in ("a", "b"))}


def main():
    args = parse()
    t0 = time.time()
    U.seed_everything(args.seed)
    # optional: torchrun splits the chunks over processes (24 h: ranks wait for the slowest share)
    dist = U.setup_distributed(args.device, timeout_hours=24)
    world, scm_dir = U.stage_dir(args.run, "world"), U.stage_dir(args.run, "scm")
    out = Path(args.run) / args.name
    model = args.model or U.toy_world_input(args, world / "model", "--model")
    U.require_inputs([scm_dir / "scm.safetensors"], "scm")
    dtype = M.sample_dtype(args.dtype, dist.device)
    plan = plan_pairs(args)
    if args.reuse_images:
        mark_shared_samples(args, plan, dtype)
    out.mkdir(parents=True, exist_ok=True)
    if dist.is_main:
        # a build before --keep and --safe-source existed: every "safer" pair, two samples
        U.save_config(args, out, absent_means={"keep": "safer", "safe_source": "samples"},
                      sample_dtype=str(dtype), processes=dist.world_size)

    chunks = [plan[i:i + args.chunk_size] for i in range(0, len(plan), args.chunk_size)]
    shard = lambda c: out / "shards" / f"pairs-{c:05d}.json"
    todo = U.my_share([c for c in range(len(chunks)) if not shard(c).exists()])  # every N-th
    if todo:
        pipe, i2i, judge, quality, scm = load_models(args, model, dist.device, dtype, scm_dir)
        for c in tqdm(todo, desc="LibraAlign-HF chunks", disable=not dist.is_main):
            built = build_chunk(args, chunks[c], pipe, i2i, judge, quality, scm, out)
            U.atomic_write_json(shard(c), built)
    U.barrier()
    if not dist.is_main:  # rank 0 assembles what every process wrote
        U.cleanup_distributed()
        return

    # LibraAlign-HF: every chunk's kept pairs in plan order, whichever process built them
    shards = [U.read_json(shard(c)) for c in range(len(chunks))]
    records = [p for s in shards for p in s["pairs"]]
    U.write_jsonl(out / "hf_pairs.jsonl", records)
    metrics = {**hf_metrics(shards, records), "seconds": round(time.time() - t0, 1)}
    U.atomic_write_json(out / "metrics.json", metrics)
    U.log(U.format_metrics(metrics))
    U.cleanup_distributed()


if __name__ == "__main__":
    U.run_stage(main)
