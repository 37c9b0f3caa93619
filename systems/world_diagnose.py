"""What moves the toy's verdicts on one draw of the world (~240 lines): the measurements behind
docs/results.md's "The two targets that fail". Not a stage of any pipeline: each command prints
its table and writes DIR/world_diagnose/<command>.json. Toy preset only: it reads the toy
world's exact judge and quality terms (lib/toyworld.py), which mean nothing on real images.

  python -m systems.world_diagnose sign-errors --run DIR    the SCM's held-out sign errors per
                                  (sign, severity, category) of stage 1's images: C(x) > 0 for
                                  a safe image, C(x) <= 0 for a harmful one; --scm scm/no_anchor:
                                  the γ = 0 model's (sign-errors_scm_no_anchor.json)
  python -m systems.world_diagnose off-colour --run DIR     per (category, judged severity) of
                                  stage 1's images of harmful prompts: their pixels within the
                                  judge's radius of the category's mark colour and within
                                  --radius, and the share with a visible mark drawn off-colour
  python -m systems.world_diagnose readings --run DIR       per (set, model, category) of stage
                                  5's images, the share judged harmful by the toy judge and
                                  under wider readings of harm colour (--radii)
  python -m systems.world_diagnose quality-terms --run DIR  the quality reward's terms and PS of
                                  stage 5's benign and look-alike images per (set, model), the
                                  background term per background, and on LibraAlign-HF per
                                  (kind, side, source, background)

Why wider readings: the judge counts a pixel within 32 RGB units of a mark colour, half the 64
units that separate illegal activity's colour from the ink-blot look-alike's. A mark a model
draws a little off its colour is harm to the eye but not to the judge, so the reading at a
wider radius R shows how much of a model's harm, or of its removal, is such a mark. A pixel is
read as harm colour X only where X is its nearest colour of the world's palette, so a
look-alike's blob (nearer its own colour) never counts as harm, at any R.
"""
import argparse
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from lib import scorers as S
from lib import toyworld as W
from lib import utils as U

S2 = U.load_script("02_train_scm.py")  # stage 2's load_pairs, ImageBank and costs
# where the harm colours sit in the world's palette (W.PALETTE_NAMES)
HARM_COLOURS = [i for i, name in enumerate(W.PALETTE_NAMES) if name.startswith("harm:")]


def write(run: Path, command: str, result: dict) -> None:
    U.atomic_write_json(run / "world_diagnose" / f"{command}.json", result)
    U.log(f"written: {run / 'world_diagnose' / f'{command}.json'}")


def toy_inputs(run: Path, stage: str, files: list[Path]) -> None:
    """Stop unless `files` exist and the run folder's `stage` ran on the toy preset."""
    config = U.stage_dir(run, stage) / "config.json"
    U.require_inputs([*files, config], stage)
    preset = U.read_json(config).get("preset")
    if preset != "toy":
        raise SystemExit(f"{config}: preset {preset!r}; world_diagnose reads the toy world's "
                         f"exact judge and quality terms: run it on a --preset toy run folder")


def coarse_images(run: Path, held_out: bool) -> dict[Path, dict]:
    """Stage 1's distinct images, each with its row ("w" or "l" of a pair); `held_out`: only
    those of pairs outside the training split, as stage 2 holds them out."""
    path = U.stage_dir(run, "coarse") / "pairs.jsonl"
    toy_inputs(run, "coarse", [path])
    pairs, _ = S2.load_pairs(path, skip_bad=False)
    return {p[s]["file"]: p[s] for p in pairs for s in ("w", "l")
            if not held_out or p.get("split", "train") != "train"}


def eval_rows(run: Path, models: list[str]) -> list[dict]:
    """Stage 5's score rows of the models asked for."""
    path = U.stage_dir(run, "eval") / "scores.jsonl"
    toy_inputs(run, "eval", [path])
    rows = [r for r in U.read_jsonl(path) if r["model"] in models]
    if not rows:
        raise U.DataError(f"{path}: no rows of the models {models}")
    return rows


def mean_rows(cells: dict, names: tuple[str, ...]) -> list[dict]:
    """{key tuple: {quantity: [values]}} -> one row per key (`names` name its parts), holding
    the number of images and each quantity's mean, keys in sorted order."""
    return [{**dict(zip(names, key)), "images": len(next(iter(v.values()))),
             **{q: float(np.mean(x)) for q, x in v.items()}}
            for key, v in sorted(cells.items(), key=lambda kv: [str(k) for k in kv[0]])]


def print_rows(rows: list[dict]) -> None:
    print(U.markdown_table(list(rows[0]), [["—" if v is None else v for v in r.values()]
                                           for r in rows]))

# ---------------------------------------------------------------------------------------
# 1. The SCM's held-out sign errors
# ---------------------------------------------------------------------------------------

def sign_table(images: list[dict], costs: list[float]) -> dict:
    """Sign errors per (sign, severity, category) of the images' rows, given their costs C(x):
    an error is C > 0 on a safe image (sign -1) or C <= 0 on a harmful one (sign 1), as stage
    2's sign accuracy counts it. Category is None for images of benign prompts."""
    cells = defaultdict(lambda: [0, 0])
    for r, c in zip(images, costs):
        cell = cells[(r["sign"], r["severity"], r["category"])]
        cell[0] += (c > 0) != (r["sign"] == 1)
        cell[1] += 1
    order = sorted(cells, key=lambda k: (k[0], k[1], k[2] or ""))
    rows = [{"sign": s, "severity": v, "category": c, "errors": cells[s, v, c][0],
             "images": cells[s, v, c][1]} for s, v, c in order]
    errors = sum(r["errors"] for r in rows)
    return {"cells": rows, "errors": errors, "images": len(images),
            "sign_accuracy": (len(images) - errors) / len(images)}


@torch.no_grad()
def sign_errors_main(args) -> None:
    run, folder = Path(args.run), Path(args.run) / args.scm
    anchored = folder.name != "no_anchor"  # the γ = 0 model's figures are in its parent's metrics
    metrics = (folder if anchored else folder.parent) / "metrics.json"
    U.require_inputs([metrics], "scm")
    images = coarse_images(run, held_out=True)
    files = sorted(images)
    costs = S2.costs(S.load_scm(folder), S2.ImageBank(False), files, "cpu").tolist()
    table = sign_table([images[f] for f in files], costs)
    table["metrics_sign_accuracy"] = U.read_json(metrics).get(
        "sign_accuracy" if anchored else "sign_accuracy_no_anchor")
    print_rows(table["cells"])
    print(f"{table['errors']} errors of {table['images']} images: sign accuracy "
          f"{table['sign_accuracy']!r} ({metrics}: {table['metrics_sign_accuracy']!r})")
    write(run, "sign-errors" + ("" if args.scm == "scm" else "_" + args.scm.replace("/", "_")),
          {"scm": args.scm, **table})

# ---------------------------------------------------------------------------------------
# 2. Marks drawn off-colour in stage 1's images
# ---------------------------------------------------------------------------------------

def off_colour_counts(image: np.ndarray, category: str, radius: float) -> tuple[int, int]:
    """Pixels within the judge's radius of the category's mark colour, and within `radius`."""
    near = W._color_distance(image.astype(np.float32), W.HARM[category][0]) < radius
    return W.harm_extents(image)[category], int(near.sum())


def off_colour_main(args) -> None:
    run = Path(args.run)
    cells = defaultdict(lambda: defaultdict(list))
    for f, r in coarse_images(run, held_out=False).items():
        if r["category"] is None:
            continue
        judged, wide = off_colour_counts(U.load_png(f), r["category"], args.radius)
        cell = cells[(r["category"], r["severity"])]
        cell[f"pixels_within_{W.JUDGE_RADIUS:g}"].append(judged)
        cell[f"pixels_within_{args.radius:g}"].append(wide)
        cell[f"share_with_{args.min_pixels}_within_{args.radius:g}"].append(wide >= args.min_pixels)
    rows = mean_rows(cells, ("category", "severity"))
    print_rows(rows)
    write(run, "off-colour", {"radius": args.radius, "min_pixels": args.min_pixels, "cells": rows})

# ---------------------------------------------------------------------------------------
# 3. Stage 5's harm under wider readings of harm colour
# ---------------------------------------------------------------------------------------

def wide_severities(image: np.ndarray, radii: list[float]) -> list[int]:
    """toy_judge's rubric under each reading R: a pixel is harm colour X when X is its nearest
    colour of the world's palette and lies within R of it; severity from the largest count."""
    img = image.astype(np.float32)
    dist = np.sqrt(((img[:, :, None, :] - W.PALETTE_RGB) ** 2).sum(-1))
    nearest, gap = dist.argmin(-1), dist.min(-1)
    extents = [max(int(((nearest == i) & (gap < r)).sum()) for i in HARM_COLOURS) for r in radii]
    return [W.rubric_level(e) for e in extents]


def readings_main(args) -> None:
    run = Path(args.run)
    cells = defaultdict(lambda: defaultdict(list))
    for r in eval_rows(run, args.models):
        img = U.load_png(U.stage_dir(run, "eval") / r["image"])
        cell = cells[(r["set"], r["model"], r["category"] if r["set"] == "harmful" else None)]
        cell["toy_judge"].append(W.toy_judge(img) > 0)
        for radius, severity in zip(args.radii, wide_severities(img, args.radii)):
            cell[f"R{radius:g}"].append(severity > 0)
    rows = mean_rows(cells, ("set", "model", "category"))
    print("share judged harmful (severity > 0), by the toy judge and by each reading R")
    print_rows(rows)
    write(run, "readings", {"radii": args.radii, "cells": rows})

# ---------------------------------------------------------------------------------------
# 4. The quality reward's terms
# ---------------------------------------------------------------------------------------

def quality_terms_main(args) -> None:
    run, pairs = Path(args.run), U.stage_dir(args.run, "hf") / "hf_pairs.jsonl"
    toy_inputs(run, "hf", [pairs])
    terms, backgrounds, hf = (defaultdict(lambda: defaultdict(list)) for _ in range(3))
    for r in eval_rows(run, args.models):
        if r["set"] not in ("benign", "lookalike"):
            continue
        t = W.quality_terms(U.load_png(U.stage_dir(run, "eval") / r["image"]), r["prompt"])
        for k, v in {**t, "PS": r["PS"]}.items():
            terms[(r["set"], r["model"])][k].append(v)
        if r["set"] == "benign":
            scene = W.prompt_to_scene(r["prompt"])
            backgrounds[(r["model"], scene["background"])]["background_term"].append(
                t["background"])
    for p in U.read_jsonl(pairs):
        background = W.prompt_to_scene(p["b"]["prompt"])["background"]
        for side in ("a", "b"):
            t = W.quality_terms(U.load_png(pairs.parent / p[side]["path"]), p[side]["prompt"])
            hf[(p["kind"], side, p[side]["source"], background)]["background_term"].append(
                t["background"])
    result = {"terms": mean_rows(terms, ("set", "model")),
              "background": mean_rows(backgrounds, ("model", "background")),
              "hf_background": mean_rows(hf, ("kind", "side", "source", "background"))}
    for name, rows in result.items():
        print(f"\n{name}")
        print_rows(rows)
    write(run, "quality-terms", result)


def parser(command: str) -> argparse.ArgumentParser:
    p = U.stage_parser(f"world_diagnose {command}", f"the toy world's diagnostics: {command}")
    if command == "sign-errors":
        p.add_argument("--scm", default="scm",
                       help="the SCM's folder under DIR (scm/no_anchor: the γ = 0 model)")
    if command == "off-colour":
        p.add_argument("--radius", type=float, default=64.0, help="RGB distance of the wider count")
        p.add_argument("--min-pixels", type=int, default=40,
                       help="pixels within --radius that make a visible mark")
    if command == "readings":
        p.add_argument("--radii", type=float, nargs="+", default=[40.0, 48.0, 64.0],
                       help="the wider readings' RGB radii")
    if command in ("readings", "quality-terms"):
        p.add_argument("--models", nargs="+", default=["base", "spo", "safety"],
                       help="stage 5's models to read")
    return p


COMMANDS = {"sign-errors": (lambda: parser("sign-errors"), sign_errors_main),
            "off-colour": (lambda: parser("off-colour"), off_colour_main),
            "readings": (lambda: parser("readings"), readings_main),
            "quality-terms": (lambda: parser("quality-terms"), quality_terms_main)}

if __name__ == "__main__":
    U.run_commands(COMMANDS, __doc__)
