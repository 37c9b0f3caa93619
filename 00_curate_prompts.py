"""Stage 0, the prompts — harmful prompts filtered and rewritten safe (paper Secs. 3.1 and 3.2).

The paper starts from prompts people wrote (DiffusionDB, I2P) and asks GPT-4 two things of
each: does it ask for harm, of which of the seven categories and which of their 634 concepts
(Sec. 3.1); and, for a harmful one, a safe prompt that keeps the subject, style and
composition and drops the harm (Sec. 3.2), which stage 3 uses to repaint the harmful image.
This stage asks exactly those two questions of every prompt of its sources:

  filter   {"harmful": bool, "category": c, "concept": k}   against the concepts of the
           prompt's own categories where its row names some (I2P), else of all seven
  rewrite  {"safe_prompt": p}                               for each prompt kept

The questions are the files instructions/filter.md and instructions/rewrite.md; the curator is
any OpenAI-compatible model (`--judge openai --judge-model gpt-4o`, key from OPENAI_API_KEY,
never logged), or on the toy preset the toy world's exact programs (toyworld.ToyCurator).

Reads (DIR = --run): --sources (files: JSONL, CSV in any published layout lib/data.py reads, a
JSON list, DiffusionDB's metadata.parquet; or hf:ID), --concepts (JSON {category: [concept]};
toy: the toy world's 21 concepts; sd15: instructions/harm_concepts.json).
Writes DIR/prompts/:
  harmful.jsonl     {prompt, safe_prompt, category, concept, source}: what stages 1 and 3 read
  safe.jsonl        {prompt, source}: the prompts the filter found harmless, stage 1's safe
                    images (Sec. 3.1 pairs harmful images "with randomly selected safe images")
  shards/*.json     the answers of each --shard-size prompts, written whole: a killed run asks
                    again only about the shards it had not finished
  metrics.json, config.json
"""
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

from lib import data as D
from lib import judge_client as J
from lib import toyworld as W
from lib import utils as U

ROOT = Path(__file__).resolve().parent
# Whose each number is. The paper asks GPT-4 both questions (Secs. 3.1, 3.2) and gives no
# request settings; its 634 concepts in 7 categories, curated from I2P (Sec. 3.1), are not
# published.
U.PRESETS["toy"]["prompts"] = dict(
    sources=None,  # stage 0's train prompts: harmful, benign and look-alike
    concepts=None,  # the toy world's 21: 3 for each of the paper's 7 categories
    judge="toy", judge_model="gpt-4o",  # the toy's exact programs; gpt-4o for --judge openai
    # ours: a minute for one answer; 5 retries back off 1+2+4+8+16 s, so a short outage or
    # rate limit slows the run rather than stopping it
    judge_base_url=None, judge_timeout=60.0, judge_retries=5,
    concurrency=1,  # the toy's: its programs answer at once, there is no wait to overlap
    shard_size=500,  # the toy's: stage 0's 3,020 train prompts in 7 shards
    max_prompts=None, skip_bad_rows=False)
U.PRESETS["sd15"]["prompts"] = dict(
    sources=None,  # must be named: the paper's are DiffusionDB and I2P (Sec. 3.1)
    # a starting list per I2P category (SLD's safety concept words and I2P's category names)
    # in place of the paper's unpublished 634
    concepts=str(ROOT / "instructions" / "harm_concepts.json"),
    # the paper asks GPT-4 (Secs. 3.1, 3.2), naming no version; gpt-4o is its judge (Sec. 3.1)
    judge="openai", judge_model="gpt-4o",
    judge_base_url=None, judge_timeout=60.0, judge_retries=5,  # the toy's
    concurrency=8,  # ours: 8 requests wait on answers at once; a rate-limited one is retried
    shard_size=200,  # ours: a kill asks again about at most 200 prompts
    max_prompts=None, skip_bad_rows=False)
# --tiny: the tiny world's 765 train prompts in 16 shards, not 2: a smoke run writes several
U.TINY["prompts"] = dict(shard_size=50)


def parse(argv=None):
    p = U.stage_parser("prompts", __doc__.splitlines()[0])
    p.add_argument("--sources", nargs="+",
                   help="prompt sources, in order: files or hf:IDs (default: stage 0's harmful, "
                        "benign and look-alike train prompts)")
    p.add_argument("--concepts",
                   help="JSON {category: [concept, ...]} of the harm concepts the filter asks "
                        "about (default: toy, the toy world's; sd15, "
                        "instructions/harm_concepts.json)")
    p.add_argument("--judge", choices=["toy", "openai"],
                   help="the curator: the toy world's programs or a model")
    J.add_flags(p)
    p.add_argument("--concurrency", type=int, help="requests in flight at once")
    p.add_argument("--shard-size", type=int, help="prompts per resumable shard")
    p.add_argument("--max-prompts", type=int,
                   help="the first N prompts of the sources (default: all)")
    p.add_argument("--skip-bad-rows", action="store_true",
                   help="leave out (and count) source rows without a prompt or with an unknown "
                        "category, instead of stopping")
    return U.parse_args(p, argv)


# ---------------------------------------------------------------------------------------
# The curator: the two questions, and how an answer is checked
# ---------------------------------------------------------------------------------------

def parse_filter(content, concepts: dict[str, list[str]]) -> dict | None:
    """A filter answer, checked: harmful with a category of the list and a concept of that
    category (matched ignoring case), or not harmful; anything else is unusable (None)."""
    try:
        a = json.loads(content)
    except (TypeError, ValueError):
        return None
    if not isinstance(a, dict) or not isinstance(a.get("harmful"), bool):
        return None
    if not a["harmful"]:
        return {"harmful": False, "category": None, "concept": None}
    categories = {c.lower(): c for c in concepts}
    category = categories.get(str(a.get("category", "")).strip().lower())
    named = {k.lower(): k for k in concepts.get(category, ())}
    concept = named.get(str(a.get("concept", "")).strip().lower())
    if not (category and concept):
        return None
    return {"harmful": True, "category": category, "concept": concept}


def parse_rewrite(content) -> dict | None:
    try:
        a = json.loads(content)
    except (TypeError, ValueError):
        return None
    safe = a.get("safe_prompt") if isinstance(a, dict) else None
    return {"safe_prompt": safe.strip()} if isinstance(safe, str) and safe.strip() else None


class OpenAICurator:
    """The two questions put to an OpenAI-compatible model, with the instructions' files."""

    def __init__(self, args):
        self.client = J.OpenAIJudge(model=args.judge_model, base_url=args.judge_base_url,
                                    timeout=args.judge_timeout, max_retries=args.judge_retries)
        self.name, self.stats = self.client.name, self.client.stats
        self.filter_text = (ROOT / "instructions" / "filter.md").read_text(encoding="utf-8")
        self.rewrite_text = (ROOT / "instructions" / "rewrite.md").read_text(encoding="utf-8")

    def filter(self, prompt: str, concepts: dict[str, list[str]]) -> dict | None:
        listed = "\n".join(f"- {c}: {', '.join(ks)}" for c, ks in concepts.items())
        instructions = self.filter_text.format(concepts=listed)
        return self.client.complete_json(instructions, f"Prompt: {prompt}",
                                         lambda content: parse_filter(content, concepts))

    def rewrite(self, prompt: str, category: str, concept: str) -> dict | None:
        instructions = self.rewrite_text.format(category=category, concept=concept)
        return self.client.complete_json(instructions, f"Prompt: {prompt}", parse_rewrite)


# ---------------------------------------------------------------------------------------
# The sources and the concepts
# ---------------------------------------------------------------------------------------

def read_sources(args, world: Path) -> tuple[list[dict], list[str]]:
    """Every prompt of the sources in order, each with where it came from and the categories
    its row names (I2P's); the rows left out with --skip-bad-rows."""
    stage0 = [world / "prompts" / f"{k}_train.jsonl" for k in ("harmful", "benign", "lookalike")]
    sources = args.sources or [U.toy_world_input(args, f, "--sources") for f in stage0]
    U.require_inputs([s for s in sources if not s.startswith("hf:")], "world")
    rows, skipped = [], []
    for source in sources:
        if source.endswith(".parquet"):
            taken, left = D.read_diffusiondb_prompts(Path(source)), []
        else:
            taken, left = D.load_prompt_set(source, args.skip_bad_rows)
        rows += [{"prompt": r["prompt"], "categories": D.row_categories(r), "source": r["where"]}
                 for r in taken]
        skipped += left
    return rows[: args.max_prompts], skipped


def read_concepts(args) -> dict[str, list[str]]:
    """The concept list, by I2P's category names: the toy world's 21 concepts by default on the
    toy; a JSON file otherwise (a category no published file spells stops the run)."""
    if args.concepts is None:
        return {c: list(words) for c, (_, words) in W.HARM.items()}
    raw = U.read_json(args.concepts)
    if not isinstance(raw, dict) or not all(isinstance(v, list) and v for v in raw.values()):
        raise U.DataError(f"{args.concepts}: expected {{category: [concept, ...]}}")
    return {D.harm_categories(c, args.concepts)[0]: [str(k) for k in ks] for c, ks in raw.items()}


# ---------------------------------------------------------------------------------------
# The questions, shard by shard
# ---------------------------------------------------------------------------------------

def curate(curator, row: dict, concepts: dict[str, list[str]]) -> dict:
    """Sec. 3.1's filter, then Sec. 3.2's rewrite for a harmful prompt. The filter sees the
    concepts of the row's own categories where it names some (I2P's), else all seven. The
    rewrite keeps all but the harm because stage 3 repaints the harmful image from it: Sec.
    3.2 wants a safe counterpart that keeps background, composition and style, so that a pair
    differs in its harm alone, not in a semantic shift that ties safety to lost quality."""
    asked = {c: concepts[c] for c in row["categories"] if c in concepts} or concepts
    verdict = curator.filter(row["prompt"], asked)
    if verdict is None:
        return {"outcome": "no usable filter answer"}
    if not verdict["harmful"]:
        return {"outcome": "not harmful"}
    rewrite = curator.rewrite(row["prompt"], verdict["category"], verdict["concept"])
    if rewrite is None:
        return {"outcome": "no usable rewrite"}
    if rewrite["safe_prompt"] == row["prompt"]:
        return {"outcome": "rewrite unchanged"}  # the repainting would have nothing to change
    kept = {"prompt": row["prompt"], "safe_prompt": rewrite["safe_prompt"],
            "category": verdict["category"], "concept": verdict["concept"], "source": row["source"]}
    return {"outcome": "kept", "row": kept}


def shard_path(out: Path, s: int) -> Path:
    return out / "shards" / f"prompts-{s:05d}.json"


def ask_by_shard(args, curator, rows: list[dict], concepts, out: Path) -> list[dict]:
    """Every row's answer, in row order: the unfinished shards are asked (--concurrency
    requests in flight) and written whole, then every shard is read back."""
    shards = [rows[i:i + args.shard_size] for i in range(0, len(rows), args.shard_size)]
    todo = [s for s in range(len(shards)) if not shard_path(out, s).exists()]
    with ThreadPoolExecutor(args.concurrency) as pool:
        for s in tqdm(todo, desc="curate"):
            answers = list(pool.map(lambda row: curate(curator, row, concepts), shards[s]))
            U.atomic_write_json(shard_path(out, s), {"answers": answers})
    return [a for s in range(len(shards)) for a in U.read_json(shard_path(out, s))["answers"]]


def curation_metrics(rows, skipped, answers, kept, safe, concepts, curator, t0) -> dict:
    outcomes = dict.fromkeys(a["outcome"] for a in answers)
    counts = {o: sum(a["outcome"] == o for a in answers) for o in outcomes}
    return {"prompts": len(rows), "rows_left_out": len(skipped), "kept": len(kept),
            "safe": len(safe), "outcomes": counts,
            "kept_by_category": {c: sum(r["category"] == c for r in kept) for c in concepts},
            "curator": curator.name, "requests_this_run": curator.stats,
            "seconds": round(time.time() - t0, 1)}


def main():
    args = parse()
    t0 = time.time()
    world, out = U.stage_dir(args.run, "world"), U.stage_dir(args.run, "prompts")
    rows, skipped = read_sources(args, world)  # the inputs are checked before anything is written
    concepts = read_concepts(args)
    # the concepts decide the answers: a resume must ask about the same
    U.save_config(args, out, concepts=concepts)
    curator = W.ToyCurator() if args.judge == "toy" else OpenAICurator(args)
    answers = ask_by_shard(args, curator, rows, concepts, out)
    kept = [a["row"] for a in answers if a["outcome"] == "kept"]
    if not kept:
        raise U.DataError(f"no harmful prompt among the {len(rows)} of the sources "
                          f"({args.sources or 'stage 0'})")
    U.write_jsonl(out / "harmful.jsonl", kept)
    safe = [{"prompt": r["prompt"], "source": r["source"]}
            for r, a in zip(rows, answers) if a["outcome"] == "not harmful"]
    U.write_jsonl(out / "safe.jsonl", safe)
    metrics = curation_metrics(rows, skipped, answers, kept, safe, concepts, curator, t0)
    U.atomic_write_json(out / "metrics.json", metrics)
    U.log(U.format_metrics(metrics))


if __name__ == "__main__":
    U.run_stage(main)
