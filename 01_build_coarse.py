"""Stage 1 — LibraAlign-Coarse: image pairs labelled "which is more harmful?" (paper Sec. 3.1).

The paper generates harmful images from harmful prompts with several T2I models and seeds,
pairs them with each other and with safe images, and asks GPT-4o which image of each pair
is more harmful on a 4-level rubric (Appendix A), forcing a choice when both share a level.
Each image also gets a sign s = +1 (harmful) or -1 (safe). These pairs train the Safety
Cost Model (stage 2, Eqs. 1-3).

Reads (DIR = --run): the T2I model(s) (--models; default stage 0's DIR/world/model), harmful
prompts (--harmful-prompts: any JSONL with a "prompt" column; default
DIR/prompts/harmful.jsonl) and safe prompts (--safe-prompts: files in any layout lib/data.py
reads; default the prompts the prompt stage found harmless, DIR/prompts/safe.jsonl). The
judge is the toy world's exact one by default, or any OpenAI-compatible vision model
(`--judge openai --judge-model gpt-4o`, key from OPENAI_API_KEY). An image's sign is the
judge's verdict on it (severity >= 1), not the prompt's intent.

Writes:
  DIR/coarse/images/*.png + images/manifest-*.jsonl   generated images, one manifest per chunk
  DIR/coarse/shards/pairs-*.json                      judged pairs, one file per shard
  DIR/coarse/pairs.jsonl                              all pairs: {"id", "kind", "judge", "split",
                                                      "w": {...}, "l": {...}}
  DIR/coarse/metrics.json, config.json
Chunks and shards are written whole (atomically); a killed run skips the finished ones.
Runs as `python 01_build_coarse.py` or under `torchrun --nproc_per_node=N` (one process per
GPU): each process generates every N-th chunk and judges every N-th shard, rank 0 assembles.
"""
import random
import time
import zlib
from pathlib import Path

from tqdm import tqdm

from lib import data as D
from lib import judge_client as J
from lib import models as M
from lib import scorers as S
from lib import utils as U

# Whose each number is. Sec. 3.1 gives LibraAlign-Coarse's size (90K pairs), its judge
# (GPT-4o) and rubric (4 levels, Appendix A); it does not say how many prompts, seeds and
# safe images drew the set, nor in what share it pairs harmful with harmful or with safe.
U.PRESETS["toy"]["coarse"] = dict(
    models=None, harmful_prompts=None, safe_prompts=None,  # None: the earlier stages' files
    # the toy's: 3,000 images and 4,000 pairs; doubling the coarse set to this size lifted
    # the toy SCM's held-out sign accuracy from 93% to 95-96% (docs/results.md, Stages 1-2)
    n_harmful_prompts=1000, seeds_per_prompt=2, n_safe_images=1000, n_pairs=4000,
    harmful_safe_share=0.5,  # the toy's: Sec. 3.1 forms both kinds in no stated share
    eval_fraction=0.15,  # the toy's, as stage 0's: about 600 held-out pairs for stage 2
    chunk_size=250, shard_size=250,  # the toy's: a kill redoes at most 250 images or pairs
    sample_steps=U.TOY_SAMPLE_STEPS, guidance=4.0,  # the toy's sampling, as stage 0 measures it
    # the toy's: fp32 on every CPU. "auto" samples in bf16 where the CPU has bf16 instructions,
    # and bf16 data alone changed 2 of stage 5's verdicts on a draw (docs/results.md)
    dtype="float32",
    judge="toy", judge_model="gpt-4o",  # the toy's exact judge; Sec. 3.1's for --judge openai
    # ours: a minute for one answer; 5 retries back off 1+2+4+8+16 s, so a short outage or
    # rate limit slows the run rather than stopping it
    judge_base_url=None, judge_timeout=60.0, judge_retries=5, device=None)
U.PRESETS["sd15"]["coarse"] = dict(
    # --models must name the T2I models (the paper draws with SDXL and SD, Sec. 3.1); the
    # prompts are the prompt stage's files
    models=None, harmful_prompts=None, safe_prompts=None,
    # ours: 15,000 images per model (5,000 prompts x 2 seeds, 5,000 safe); with one model,
    # each image is in 12 of the 90K pairs on average
    n_harmful_prompts=5000, seeds_per_prompt=2, n_safe_images=5000,
    n_pairs=90000,  # the paper's: LibraAlign-Coarse's 90K pairs (Sec. 3.1)
    harmful_safe_share=0.5, eval_fraction=0.15,  # the toy's: the paper gives neither
    chunk_size=64, shard_size=500,  # ours: a kill redoes at most 64 images a process, 500 calls
    # the paper names no sampler: guidance 7.5, diffusers' default and stage 5's; 30 steps,
    # this reproduction's own for data (lib/utils.py), where stage 5 evaluates with 50
    sample_steps=30, guidance=7.5,
    dtype="auto",
    judge="openai", judge_model="gpt-4o",  # the paper's judge (Sec. 3.1)
    judge_base_url=None, judge_timeout=60.0, judge_retries=5, device=None)  # as the toy's
# --tiny, the smallest run with every pool filled (0.3: a few held-out images in each) and
# several chunks and shards (44 images in 5 chunks, 30 pairs in 3 shards) to resume or split
U.TINY["coarse"] = dict(n_harmful_prompts=12, n_safe_images=20, eval_fraction=0.3, n_pairs=30,
                        chunk_size=10, shard_size=10, sample_steps=3)


def parse(argv=None):
    p = U.stage_parser("coarse", __doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", help="T2I model folders or Hugging Face ids in the "
                                               "local cache (default: the stage-0 model)")
    p.add_argument("--harmful-prompts", help="JSONL with a prompt column (default: the prompt "
                                             "stage's DIR/prompts/harmful.jsonl)")
    p.add_argument("--safe-prompts", nargs="+", help="safe prompt sets, files or hf:IDs (default: "
                                                     "the prompt stage's DIR/prompts/safe.jsonl)")
    p.add_argument("--n-harmful-prompts", type=int)
    p.add_argument("--seeds-per-prompt", type=int, help="images per harmful prompt and model")
    p.add_argument("--n-safe-images", type=int)
    p.add_argument("--n-pairs", type=int)
    p.add_argument("--harmful-safe-share", type=float,
                   help="share of harmful-safe pairs; the rest are harmful-harmful")
    p.add_argument("--eval-fraction", type=float,
                   help="share of prompts (and pairs) held out for stage 2's figures")
    p.add_argument("--chunk-size", type=int, help="images generated per resumable chunk")
    p.add_argument("--shard-size", type=int, help="pairs judged per resumable shard")
    p.add_argument("--sample-steps", type=int)
    p.add_argument("--guidance", type=float)
    p.add_argument("--dtype", choices=M.SAMPLE_DTYPES,
                   help="sampling precision; auto: half precision where the hardware runs it "
                        "natively (models.sample_dtype)")
    p.add_argument("--judge", choices=["toy", "openai"])
    J.add_flags(p)
    p.add_argument("--device")
    return U.parse_args(p, argv)


# ---------------------------------------------------------------------------------------
# 1. The images: harmful prompts drawn by every model with several seeds, and safe images
# ---------------------------------------------------------------------------------------

def read_inputs(args, world: Path) -> tuple[list[str], list[dict], list[dict]]:
    """(models, harmful prompt rows, safe prompt rows), each input checked before anything is
    written; missing defaults name the earlier stage that writes them."""
    models = args.models or [U.toy_world_input(args, world / "model", "--models")]
    harmful_file = args.harmful_prompts or str(Path(args.run) / "prompts" / "harmful.jsonl")
    safe_files = args.safe_prompts or [str(Path(args.run) / "prompts" / "safe.jsonl")]
    U.require_inputs([] if args.models else models, "world")
    from_prompt_stage = [harmful_file] + ([] if args.safe_prompts else safe_files)
    U.require_inputs(from_prompt_stage, "prompts")
    harmful = U.read_jsonl(harmful_file)[: args.n_harmful_prompts]
    if not harmful or any("prompt" not in r for r in harmful):
        raise U.DataError(f"{harmful_file}: the harmful prompt list is empty or has rows "
                          f"without a 'prompt'")
    safe = [r for f in safe_files for r in D.load_prompt_set(f)[0]]
    return models, harmful, safe


def held_out(prompt: str, eval_fraction: float) -> bool:
    """The split is by prompt, so no image or prompt of an eval pair is seen in training."""
    return zlib.crc32(prompt.encode()) % 1000 < 1000 * eval_fraction


def plan_images(args, world: Path) -> list[dict]:
    """Every image to generate: (model, prompt, seed, harmful-prompt flag), in a fixed order.

    Sec. 3.1 draws harmful images "using multiple T2I models and random seeds to maximize
    diversity", so that the SCM sees each harm in many renderings, and pairs them with "randomly
    selected safe images". Every seed is a function of the plan position alone, so a resumed
    or distributed run draws the same images."""
    models, harmful, safe = read_inputs(args, world)
    plan = []
    for m, model in enumerate(models):
        # 100,000 seeds per model: 10 per harmful prompt, the safe images' from 50,000 on
        first_seed = args.seed * 1_000_000 + m * 100_000
        for i, row in enumerate(harmful):
            for k in range(args.seeds_per_prompt):
                plan.append({"model": model, "prompt": row["prompt"],
                             "category": row.get("category"), "from_harmful_prompt": True,
                             "seed": first_seed + i * 10 + k})
        rng = random.Random(args.seed + m)
        # every safe prompt once, then drawn at random: more safe images than prompts is fine
        for i in range(args.n_safe_images):
            row = safe[i] if i < len(safe) else rng.choice(safe)
            plan.append({"model": model, "prompt": row["prompt"], "category": None,
                         "from_harmful_prompt": False, "seed": first_seed + 50_000 + i})
    for n, item in enumerate(plan):
        item["path"] = f"images/{n:06d}.png"
        item["split"] = "eval" if held_out(item["prompt"], args.eval_fraction) else "train"
    return plan


def manifest_path(out: Path, c: int) -> Path:
    return out / "images" / f"manifest-{c:05d}.jsonl"


def load_t2i(model: str, device, dtype):
    return M.from_pretrained_or_exit(lambda m: M.load_pipeline(m, device, dtype), model,
                                     "the T2I model", "--models")


def generate_images(args, plan: list[dict], out: Path, device, dtype) -> None:
    """Generate in chunks; a chunk's manifest is written after its PNGs, so a manifest on
    disk means the whole chunk is there and a killed run redraws only unfinished chunks."""
    chunks = [plan[i:i + args.chunk_size] for i in range(0, len(plan), args.chunk_size)]
    todo = [(c, chunk) for c, chunk in enumerate(chunks) if not manifest_path(out, c).exists()]
    pipes = {}
    for c, chunk in tqdm(U.my_share(todo), desc="generate", disable=not U.is_main()):
        for model in sorted({it["model"] for it in chunk}):
            if model not in pipes:
                pipes = {model: load_t2i(model, device, dtype)}  # one model in memory at a time
            items = [it for it in chunk if it["model"] == model]
            images = M.generate(pipes[model], [it["prompt"] for it in items],
                                [it["seed"] for it in items], args.sample_steps, args.guidance)
            for it, img in zip(items, images):
                U.save_png(out / it["path"], img)
        U.write_jsonl(manifest_path(out, c), chunk)


# ---------------------------------------------------------------------------------------
# 2. The pairs and the judge's verdicts
# ---------------------------------------------------------------------------------------

def image_pools(plan: list[dict]) -> dict[tuple[str, bool], list[int]]:
    """Plan positions by (split, drawn from a harmful prompt?). A pair never crosses splits,
    so the held-out pairs of stage 2's figures share no image with the training pairs."""
    pools = {(split, h): [] for split in ("train", "eval") for h in (True, False)}
    for n, item in enumerate(plan):
        pools[item["split"], item["from_harmful_prompt"]].append(n)
    if any(len(v) < 2 for v in pools.values()):
        sizes = {k: len(v) for k, v in pools.items()}
        raise SystemExit(f"too few images to pair in each split: {sizes}")
    return pools


def plan_pairs(args, plan: list[dict]) -> list[tuple[str, int, int]]:
    """(kind, i, j), both images from one split; the judge decides the order. Sec. 3.1 pairs
    harmful images "with each other or with randomly selected safe images" (the kinds name
    the prompts; each image's sign is the judge's). Eq. 2's ranking term orders every pair,
    and its sign terms anchor every image, in either kind of pair, by its own sign:
    harmful-harmful pairs rank harm against harm, the "varying severity levels" a binary
    verdict cannot tell apart; harmful-safe pairs rank harm above safety and bring in the
    safe images whose costs the sign terms push below 0 and Eq. 3 anchors."""
    rng = random.Random(args.seed + 17)
    pools = image_pools(plan)
    pairs = []
    for _ in range(args.n_pairs):
        split = "eval" if rng.random() < args.eval_fraction else "train"
        if rng.random() < args.harmful_safe_share:
            harmful, safe = rng.choice(pools[split, True]), rng.choice(pools[split, False])
            pairs.append(("harmful-safe", harmful, safe))
        else:
            pairs.append(("harmful-harmful", *rng.sample(pools[split, True], 2)))
    return pairs


def shard_path(out: Path, s: int) -> Path:
    return out / "shards" / f"pairs-{s:05d}.json"


def image_record(item: dict, severity: int) -> dict:
    """One side of a pair with its binary sign s (Sec. 3.1), which Eq. 2's sign terms need of
    every image: +1 when the judge sees any harm (severity >= 1). The image decides, not its
    prompt, since an unaligned model does not always draw the harm it is asked for."""
    return {"path": item["path"], "prompt": item["prompt"], "category": item["category"],
            "model": item["model"], "seed": item["seed"], "severity": severity,
            "sign": 1 if severity >= 1 else -1}


def judge_pairs(args, plan, pairs, out: Path, judge) -> None:
    """The judge's verdict on every pair (Sec. 3.1): which image is more harmful on the
    4-level rubric (0 safe ... 3 severe), and each image's severity, from which its sign
    comes. When both share a level the judge must still choose: Sec. 3.1 forces these
    comparative judgments so that pairs of one level, too, carry a fine-grained preference.
    Shards are written whole: a killed run asks the judge only about unfinished shards (each
    question is a paid API call on sd15)."""
    shards = [pairs[i:i + args.shard_size] for i in range(0, len(pairs), args.shard_size)]
    for s, shard in tqdm(U.my_share(enumerate(shards)), desc="judge", disable=not U.is_main()):
        if shard_path(out, s).exists():
            continue
        records, skipped = [], 0
        for n, (kind, i, j) in enumerate(shard):
            a, b = plan[i], plan[j]
            verdict = judge.compare(U.load_png(out / a["path"]), U.load_png(out / b["path"]))
            if verdict is None:  # an unparseable or refused answer is counted, never guessed
                skipped += 1
                continue
            severity = dict(zip((i, j), verdict["severity"]))
            # x_w is the MORE harmful image: Eq. 2 ranks C(x_w) above C(x_l)
            w, l = (i, j) if verdict["winner"] == 0 else (j, i)
            records.append({"id": f"pair-{s * args.shard_size + n:07d}", "kind": kind,
                            "judge": judge.name, "split": a["split"],
                            "w": image_record(plan[w], severity[w]),
                            "l": image_record(plan[l], severity[l])})
        U.atomic_write_json(shard_path(out, s), {"pairs": records, "skipped": skipped})


def assemble(args, plan, n_pairs: int, out: Path, judge_name: str, t0: float) -> None:
    """LibraAlign-Coarse: every shard's pairs in plan order, whichever process judged them;
    its figures include how much harm the model drew (the share of images signed harmful)."""
    records, skipped = [], 0
    for s in range((n_pairs + args.shard_size - 1) // args.shard_size):
        shard = U.read_json(shard_path(out, s))
        records += shard["pairs"]
        skipped += shard["skipped"]
    U.write_jsonl(out / "pairs.jsonl", records)
    signs = [r[side]["sign"] for r in records for side in ("w", "l")]
    metrics = {"n_images": len(plan), "n_pairs": len(records), "skipped_no_answer": skipped,
               "n_harmful_harmful": sum(r["kind"] == "harmful-harmful" for r in records),
               "n_harmful_safe": sum(r["kind"] == "harmful-safe" for r in records),
               "share_images_judged_harmful": sum(s > 0 for s in signs) / max(1, len(signs)),
               "judge": judge_name, "seconds": round(time.time() - t0, 1)}
    U.atomic_write_json(out / "metrics.json", metrics)
    U.log(U.format_metrics(metrics))


def main():
    args = parse()
    t0 = time.time()
    U.seed_everything(args.seed)
    # optional: torchrun splits the chunks over processes (24 h: ranks wait for the slowest)
    dist = U.setup_distributed(args.device, timeout_hours=24)
    world, out = U.stage_dir(args.run, "world"), U.stage_dir(args.run, "coarse")
    plan = plan_images(args, world)  # its inputs are checked before anything is written
    out.mkdir(parents=True, exist_ok=True)
    dtype = M.sample_dtype(args.dtype, dist.device)
    if dist.is_main:
        U.save_config(args, out, sample_dtype=str(dtype), processes=dist.world_size)
    judge = S.make_judge(args.judge, args.judge_model, args.judge_base_url, args.judge_timeout,
                         args.judge_retries)
    generate_images(args, plan, out, dist.device, dtype)
    U.barrier()  # every image on disk before any pair is judged
    pairs = plan_pairs(args, plan)
    judge_pairs(args, plan, pairs, out, judge)
    U.barrier()
    if dist.is_main:  # rank 0 assembles what every process wrote
        assemble(args, plan, len(pairs), out, judge.name, t0)
    U.cleanup_distributed()


if __name__ == "__main__":
    U.run_stage(main)
