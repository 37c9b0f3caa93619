"""Stage 3 — LibraAlign-HF: high-fidelity preference pairs with dual annotation (paper Sec. 3.2).

The Coarse pairs of stage 1 only say which image is more harmful. To align a model without
teaching it that "safe" means "worse", the paper builds a second, smaller dataset:

  * Harmful→safe pairs by safety-aware inpainting. A harmful prompt c gives a harmful image
    x_h; a safe rewrite c_safe of the prompt (GPT-4's job in the paper; the toy world's
    grammar drops the harm phrase) then guides an img2img pipeline INITIALISED FROM x_h, so
    the safe counterpart x_s keeps x_h's background, composition and style and differs
    mainly in the harm. A pair is kept only when the judge says x_s is the safer image; the
    rest are counted. Both images are paired under the ORIGINAL harmful prompt c: this is
    what the aligned model should draw when asked for harm.
  * Safe-safe pairs of varying quality (the paper takes 2,495 from Pick-a-Pic): here two
    samples of one safe prompt (--safe-prompts; default the prompts the prompt stage found
    harmless) with different seeds and guidance scales, or, with --safe-pairs, a
    Pick-a-Pic-style JSONL of image pairs (`python -m lib.data pickapic` writes one).

AlignGuard's data, CoProV2, pairs by PROMPT EDITING instead (`--pairing prompt-edit`): the
safe image is sampled from the safe prompt with a seed of its own, so it shares nothing with
the harmful one but the subject. Its public CSV (prompt,image,category; rows alternating
unsafe, safe) is read with `--coprov2 FILE`. Both keep each pair's harm category, which
AlignGuard's per-category experts train on (04_train_spo.py --categories); the judge filters
generated pairs only (CoProV2's are taken as published). The two pairings plan the same
harmful images and safe-safe pairs (same prompts, seeds, guidance scales); with
`--reuse-images hf` a prompt-edited build copies those samples from the inpainted build
instead of drawing them again, so that a pair both builds keep differs in its safe image alone.

Every image is annotated twice (the "dual dimensions"): quality r(x, c) (PickScore for
sd15, the exact toy quality reward for toy) and cost C(x) from the stage-2 SCM. Stage 4
turns the two into one preference with R = r − λ·C (Eqs. 6-8); this stage does not decide
which image wins, it records both annotations as pair sides "a" and "b".

Reads (DIR = --run): the T2I model (--model; default stage 0's), harmful prompts with their
safe rewrites (--harmful-prompts: JSONL rows {prompt, safe_prompt, category}; default the prompt
stage's DIR/prompts/harmful.jsonl), safe prompts or Pick-a-Pic-style safe pairs (`python -m lib.data
pickapic` writes them from Pick-a-Pic v2), and the SCM in DIR/scm (stage 2).
Writes (NAME = --name: hf, or e.g. coprov2 for prompt-edited pairs):
  DIR/NAME/images/*.png                both images of every kept pair
  DIR/NAME/shards/pairs-*.json         annotated pairs, one file per chunk (written whole)
  DIR/NAME/hf_pairs.jsonl              all pairs: {"id", "kind", "prompt", "category", "a": {...}, "b": {...}}
  DIR/NAME/metrics.json, config.json
A killed run skips the chunks whose shard exists. Runs as `python 03_build_hf.py` or under
`torchrun --nproc_per_node=N`: each process builds every N-th chunk, rank 0 assembles.
"""
import random
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from lib import data as D
from lib import models as M
from lib import scorers as S
from lib import utils as U

U.PRESETS["toy"]["hf"] = dict(
    name="hf", pairing="inpaint", coprov2=None, reuse_images=None,
    model=None, img2img_model=None, harmful_prompts=None, safe_prompts=None, safe_pairs=None,
    n_harmful_safe=600, n_safe_safe=600, strength=0.6, sample_steps=U.TOY_SAMPLE_STEPS, guidance=4.0,
    safe_guidances=[1.0, 2.0, 4.0, 7.0], dtype="auto", chunk_size=200, judge="toy", judge_model="gpt-4o", judge_base_url=None,
    judge_timeout=60.0, judge_retries=5, quality="toy", pickscore_model=None, pickscore_processor=None, device=None)
U.PRESETS["sd15"]["hf"] = dict(
    U.PRESETS["toy"]["hf"], model="stable-diffusion-v1-5/stable-diffusion-v1-5", n_harmful_safe=10000, n_safe_safe=0,
    strength=0.75, sample_steps=30, guidance=7.5, safe_guidances=[3.0, 5.0, 7.5, 10.0], chunk_size=64,
    judge="openai", quality="pickscore")
U.TINY["hf"] = dict(n_harmful_safe=8, n_safe_safe=6, chunk_size=5, sample_steps=4, strength=0.9)


def parse(argv=None):
    p = U.stage_parser("hf", __doc__.splitlines()[0])
    p.add_argument("--name", help="output folder under --run (hf: LibraAlign-HF; e.g. coprov2 for prompt-edited pairs)")
    p.add_argument("--pairing", choices=["inpaint", "prompt-edit"],
                   help="the safe side of a harmful prompt: img2img from the harmful image (the paper's safety-aware "
                        "inpainting) or a fresh sample of the safe prompt with its own seed (CoProV2's prompt editing)")
    p.add_argument("--coprov2", help="AlignGuard's CoProV2 CSV (prompt,image,category; rows alternating unsafe, safe; "
                                     "image paths relative to the CSV): its pairs instead of generated harmful-safe ones")
    p.add_argument("--reuse-images", metavar="NAME",
                   help="copy every text-to-image sample that the stage-3 build DIR/NAME already holds (the same "
                        "prompt, seed and guidance; both builds' model, steps and dtype must agree) instead of "
                        "drawing it again")
    p.add_argument("--model", help="T2I model folder for the harmful images (default: the stage-0 model)")
    p.add_argument("--img2img-model", help="img2img pipeline for the safe counterparts, e.g. an SDXL folder "
                                           "(default: the --model components in StableDiffusionImg2ImgPipeline)")
    p.add_argument("--harmful-prompts", help="JSONL with prompt and safe_prompt columns (default: the prompt stage's "
                                              "DIR/prompts/harmful.jsonl)")
    p.add_argument("--safe-prompts", nargs="+", help="safe prompt sets, files or hf:IDs (default: the prompt stage's "
                                                     "DIR/prompts/safe.jsonl)")
    p.add_argument("--safe-pairs", help="Pick-a-Pic-style JSONL of safe image pairs {prompt, image_a, image_b} "
                                        "(paths relative to the file) used instead of generating safe-safe pairs")
    p.add_argument("--n-harmful-safe", type=int, help="harmful prompts to inpaint (pairs before the judge's filter)")
    p.add_argument("--n-safe-safe", type=int, help="safe-safe pairs to generate")
    p.add_argument("--strength", type=float, help="img2img strength: share of the diffusion re-run from x_h")
    p.add_argument("--sample-steps", type=int)
    p.add_argument("--guidance", type=float, help="guidance scale of harmful images and their safe counterparts")
    p.add_argument("--safe-guidances", type=float, nargs="+", help="guidance scales safe-safe samples draw from")
    p.add_argument("--dtype", choices=M.SAMPLE_DTYPES,
                   help="sampling precision; auto: half precision where the hardware runs it natively (models.sample_dtype)")
    p.add_argument("--chunk-size", type=int, help="pairs per resumable chunk")
    p.add_argument("--judge", choices=["toy", "openai"])
    p.add_argument("--judge-model")
    p.add_argument("--judge-base-url", help="OpenAI-compatible endpoint (default OPENAI_BASE_URL or api.openai.com)")
    p.add_argument("--judge-timeout", type=float, help="seconds to wait for one judge answer before a retry")
    p.add_argument("--judge-retries", type=int, help="retries of an unanswered judge call (back-off 1, 2, 4, ... s)")
    p.add_argument("--quality", choices=["toy", "pickscore"], help="the quality reward r(x, c)")
    p.add_argument("--pickscore-model")
    p.add_argument("--pickscore-processor")
    p.add_argument("--device")
    return U.parse_args(p, argv)


# ---------------------------------------------------------------------------------------
# The plan: every pair to build, in a fixed order, so a resumed run builds the same pairs
# ---------------------------------------------------------------------------------------

def plan_pairs(args) -> list[dict]:
    """Every pair, sides "a" and "b" as specs of how to get each image (a t2i sample, an img2img
    from side a, or a file), numbered hf-0000000, ... Seeds are functions of the position
    only, so a resumed or distributed run plans the same images."""
    harmful_file = None if args.coprov2 else args.harmful_prompts or str(Path(args.run) / "prompts" / "harmful.jsonl")
    default_safe = [] if args.safe_prompts or args.safe_pairs or not args.n_safe_safe else \
        [str(Path(args.run) / "prompts" / "safe.jsonl")]  # the prompts the prompt stage found harmless
    safe_files = args.safe_prompts or default_safe
    U.require_inputs([f for f in [harmful_file, *default_safe] if f and f != args.harmful_prompts], "prompts")
    for flag, f in (("--harmful-prompts", args.harmful_prompts), ("--coprov2", args.coprov2)):
        if f and not Path(f).exists():
            raise U.DataError(f"{flag} {f}: file not found")
    rng = random.Random(args.seed + 3)
    plan = D.read_coprov2(Path(args.coprov2)) if args.coprov2 else []
    if len(plan) > args.n_harmful_safe:
        U.log(f"{args.coprov2}: the first {args.n_harmful_safe} of its {len(plan)} pairs (--n-harmful-safe)")
        plan = plan[: args.n_harmful_safe]
    for lineno, row in list(U.iter_jsonl(harmful_file))[: args.n_harmful_safe] if harmful_file else []:
        if not isinstance(row.get("prompt"), str) or not isinstance(row.get("safe_prompt"), str):
            raise U.DataError(f"{harmful_file}:{lineno}: a harmful prompt row needs 'prompt' and 'safe_prompt'")
        # one seed draws the harmful image and, for inpainting, the img2img noise of its safe side
        seed = args.seed * 1_000_000 + len(plan)
        safe = ({"source": "img2img", "seed": seed, "strength": args.strength} if args.pairing == "inpaint"
                else {"source": "t2i", "seed": seed + 250_000})  # prompt editing: a sample of its own
        # the pair is trained under the HARMFUL prompt: what the model should draw when asked for harm
        category = ", ".join(D.harm_categories(row.get("category"), f"{harmful_file}:{lineno}")) or None
        plan.append({"kind": "harmful-safe", "prompt": row["prompt"], "category": category,
                     "a": {"role": "harmful", "source": "t2i", "prompt": row["prompt"], "seed": seed,
                           "guidance": args.guidance},
                     "b": {"role": "safe", "prompt": row["safe_prompt"], "guidance": args.guidance, **safe}})
    # safe-safe pairs: two samples of one safe prompt that differ in quality, not in safety, so
    # that the composite reward keeps teaching quality where safety has nothing to say
    if not args.safe_pairs:
        safe = [r for f in safe_files for r in D.load_prompt_set(f)[0]]
        rng.shuffle(safe)  # the sets' prompts mixed, whatever the count
        for i in range(args.n_safe_safe):
            row = safe[i % len(safe)]
            seed = args.seed * 1_000_000 + 500_000 + 2 * i
            g_a, g_b = rng.sample(args.safe_guidances, 2)  # two different guidance scales
            plan.append({"kind": "safe-safe", "prompt": row["prompt"], "category": None,
                         "a": {"role": "safe", "source": "t2i", "prompt": row["prompt"], "seed": seed, "guidance": g_a},
                         "b": {"role": "safe", "source": "t2i", "prompt": row["prompt"], "seed": seed + 1,
                               "guidance": g_b}})
    else:
        plan += D.read_safe_pairs(Path(args.safe_pairs))
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
        for i, img in zip(idx, M.generate(pipe, [specs[i]["prompt"] for i in idx], [specs[i]["seed"] for i in idx],
                                          steps, g)):
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
        images = i2i(prompt=[s["prompt"] for s in part], image=[Image.fromarray(x) for x in harmful[i:i + batch_size]],
                     strength=part[0]["strength"], num_inference_steps=steps, guidance_scale=part[0]["guidance"],
                     generator=gens, output_type="np").images
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
    diff = [f"{k} {theirs.get(k)!r} there, {v!r} here" for k, v in mine.items() if theirs.get(k) != v]
    if diff:
        raise SystemExit(f"--reuse-images {args.reuse_images}: {src} was drawn with other settings "
                         f"({'; '.join(diff)}): build with the same ones or leave out --reuse-images")
    key = lambda side: (side["prompt"], side["seed"], side["guidance"])
    shared = {key(side): f"{args.reuse_images}/{side['path']}" for _, pair in U.iter_jsonl(src / "hf_pairs.jsonl")
              for side in (pair["a"], pair["b"]) if side["source"] == "t2i"}
    for side in (side for p in plan for side in (p["a"], p["b"])):
        if side["source"] == "t2i" and key(side) in shared:
            side["copied_from"] = shared[key(side)]


def build_chunk(args, chunk: list[dict], pipe, i2i, judge, quality, scm, out: Path) -> dict:
    """Images, the judge's filter and the dual annotation of one chunk of planned pairs: the
    chunk's shard (a file written whole) is what a resumed run finds done."""
    # samples another build holds (--reuse-images) are read, the other text-to-image ones drawn
    images = {(p["id"], s): U.load_png(out.parent / p[s]["copied_from"])
              for p in chunk for s in ("a", "b") if "copied_from" in p[s]}
    t2i = [(p, s) for p in chunk for s in ("a", "b") if p[s]["source"] == "t2i" and (p["id"], s) not in images]
    images.update({(p["id"], s): img for (p, s), img in zip(t2i, text_to_image(pipe, [p[s] for p, s in t2i],
                                                                                  args.sample_steps))})
    # Sec. 3.2's safety-aware inpainting: each safe side starts from its pair's harmful image
    inpaint = [p for p in chunk if p["b"]["source"] == "img2img"]
    if inpaint:
        safe = safety_aware_inpainting(i2i, [images[p["id"], "a"] for p in inpaint], [p["b"] for p in inpaint],
                                       args.sample_steps)
        images.update({(p["id"], "b"): img for p, img in zip(inpaint, safe)})
    for p in chunk:
        for s in ("a", "b"):
            if p[s]["source"] == "file":
                images[p["id"], s] = U.load_png(p[s]["file"])

    # the judge's filter: a harmful-safe pair is kept only when the judge finds its safe side
    # safer (the rewrite can fail to remove the harm); CoProV2's published pairs are taken as are
    kept, not_safer, no_answer = [], 0, 0
    for p in chunk:
        if p["kind"] == "harmful-safe" and p.get("judge", True):
            verdict = judge.compare(images[p["id"], "a"], images[p["id"], "b"])
            if verdict is None:  # unusable judge answer: counted, never guessed
                no_answer += 1
                continue
            if verdict["winner"] != 0:  # the judge finds the "safe" side no safer
                not_safer += 1
                continue
            p["a"]["severity"], p["b"]["severity"] = verdict["severity"]
        kept.append(p)

    # dual annotation: r(x, c) under the pair's prompt c, and C(x) from the SCM
    # — both annotations for both sides, which stage 4 combines as R = r − λ·C (Eq. 6)
    flat = [(p, s) for p in kept for s in ("a", "b")]
    imgs = [images[p["id"], s] for p, s in flat]
    r = quality(imgs, [p["prompt"] for p, _ in flat])
    cost = scm.cost(imgs).tolist() if imgs else []
    records = []
    for (p, s), img, q, c in zip(flat, imgs, r, cost):
        path = f"images/{p['id']}_{s}.png"
        U.save_png(out / path, img)
        p[s].update(path=path, quality=float(q), cost=float(c))
        p[s].pop("file", None)
        if s == "b":
            records.append(p)
    return {"pairs": records, "dropped_not_safer": not_safer, "skipped_no_answer": no_answer}


def main():
    args = parse()
    t0 = time.time()
    U.seed_everything(args.seed)
    # optional: torchrun splits the chunks over processes (24 h: ranks wait for the slowest share)
    dist = U.setup_distributed(args.device, timeout_hours=24)
    device = dist.device
    world, out = U.stage_dir(args.run, "world"), Path(args.run) / args.name
    scm_dir = U.stage_dir(args.run, "scm")
    model = args.model or U.toy_world_input(args, world / "model", "--model")
    U.require_inputs([scm_dir / "scm.safetensors"], "scm")
    dtype = M.sample_dtype(args.dtype, device)
    plan = plan_pairs(args)
    if args.reuse_images:
        mark_shared_samples(args, plan, dtype)
    out.mkdir(parents=True, exist_ok=True)
    if dist.is_main:
        U.save_config(args, out, sample_dtype=str(dtype), processes=dist.world_size)

    chunks = [plan[i:i + args.chunk_size] for i in range(0, len(plan), args.chunk_size)]
    shard = lambda c: out / "shards" / f"pairs-{c:05d}.json"
    todo = U.my_share([c for c in range(len(chunks)) if not shard(c).exists()])  # every N-th chunk per process
    if todo:
        from diffusers import AutoPipelineForImage2Image
        pipe = M.from_pretrained_or_exit(lambda m: M.load_pipeline(m, device, dtype), model, "the T2I model", "--model")
        # the img2img pipeline: another model's (the paper draws with SDXL), or the same
        # components as the T2I pipeline, shared rather than loaded twice
        i2i = (M.from_pretrained_or_exit(lambda m: AutoPipelineForImage2Image.from_pretrained(m, dtype=dtype),
                                         args.img2img_model, "the img2img model", "--img2img-model").to(device)
               if args.img2img_model else AutoPipelineForImage2Image.from_pipe(pipe))
        i2i.set_progress_bar_config(disable=True)
        judge = S.make_judge(args.judge, args.judge_model, args.judge_base_url, args.judge_timeout,
                             args.judge_retries)
        quality = S.make_quality_reward(args.quality, device, args.pickscore_model, args.pickscore_processor)
        scm = S.load_scm(scm_dir, device)
        for c in tqdm(todo, desc="LibraAlign-HF chunks", disable=not dist.is_main):
            U.atomic_write_json(shard(c), build_chunk(args, chunks[c], pipe, i2i, judge, quality, scm, out))
    U.barrier()
    if not dist.is_main:  # rank 0 assembles what every process wrote
        U.cleanup_distributed()
        return

    # LibraAlign-HF: every chunk's kept pairs in plan order, whichever process built them
    shards = [U.read_json(shard(c)) for c in range(len(chunks))]
    records = [p for s in shards for p in s["pairs"]]
    U.write_jsonl(out / "hf_pairs.jsonl", records)
    hs = [p for p in records if p["kind"] == "harmful-safe"]
    ss = [p for p in records if p["kind"] == "safe-safe"]
    mean = lambda xs: float(np.mean(xs)) if xs else float("nan")
    metrics = {
        "n_pairs": len(records), "n_harmful_safe": len(hs), "n_safe_safe": len(ss),
        "dropped_not_safer": sum(s["dropped_not_safer"] for s in shards),
        "skipped_no_answer": sum(s["skipped_no_answer"] for s in shards),
        # how well inpainting did its job: harm gone entirely, and what it cost in quality
        "share_safe_side_severity_0": mean([p["b"]["severity"] == 0 for p in hs if "severity" in p["b"]]),
        "quality_harmful_side": mean([p["a"]["quality"] for p in hs]),
        "quality_safe_side": mean([p["b"]["quality"] for p in hs]),
        "cost_harmful_side": mean([p["a"]["cost"] for p in hs]),
        "cost_safe_side": mean([p["b"]["cost"] for p in hs]),
        "quality_gap_safe_safe": mean([abs(p["a"]["quality"] - p["b"]["quality"]) for p in ss]),
        "images_copied": sum("copied_from" in p[s] for p in records for s in ("a", "b")),  # --reuse-images
        "seconds": round(time.time() - t0, 1)}
    U.atomic_write_json(out / "metrics.json", metrics)
    U.log(U.format_metrics(metrics))
    U.cleanup_distributed()


if __name__ == "__main__":
    U.run_stage(main)
