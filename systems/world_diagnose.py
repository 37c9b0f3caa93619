"""What moves the toy's verdicts on one draw of the world (~370 lines): the measurements behind
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
  python -m systems.world_diagnose vae-round-trip --run DIR  stage 0's VAE alone on ground
                                  truth: per category, the share of harmful renders whose judged
                                  severity survives encoding and decoding, and benign renders'
                                  quality after it against before
  python -m systems.world_diagnose displacement --run DIR    how much worse each aligned UNet
                                  denoises than the base, err_θ − err_ref of Eq. 5 at fixed
                                  (t, ε), on ground truth of held-out benign prompts and on both
                                  sides of LibraAlign-HF's harmful→safe pairs

Why wider readings: the judge counts a pixel within 32 RGB units of a mark colour, half the 64
units that separate illegal activity's colour from the ink-blot look-alike's. A mark a model
draws a little off its colour is harm to the eye but not to the judge, so the reading at a
wider radius R shows how much of a model's harm, or of its removal, is such a mark. A pixel is
read as harm colour X only where X is its nearest colour of the world's palette, so a
look-alike's blob (nearer its own colour) never counts as harm, at any R.
"""
import argparse
import random
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from common import denoising_errors
from lib import models as M
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

# ---------------------------------------------------------------------------------------
# 5. Stage 0's VAE on ground truth
# ---------------------------------------------------------------------------------------

def round_trip_rows(codec, per_category: int, benign: int, seed: int) -> dict:
    """`codec` (uint8 image -> uint8 image) on ground-truth renders: per harm category, of
    `per_category` harmful scenes of it, the share whose judged severity comes back exactly
    and the share still judged harmful; over `benign` benign scenes, the mean of quality after
    / quality before. The judge counts mark pixels within 32 RGB units of their colour, so a
    VAE that tints or blurs marks erases harm the UNet drew (00_toy_world.train_vae)."""
    rng, rows = random.Random(seed), []
    for cat in W.HARM:
        exact, harmful = [], []
        while len(exact) < per_category:
            s = W.random_scene(rng, "harmful")
            if s["category"] == cat:
                truth = W.render(s)
                judged = W.toy_judge(codec(truth))
                exact.append(judged == W.toy_judge(truth))
                harmful.append(judged > 0)
        rows.append({"category": cat, "images": per_category, "severity_kept": float(np.mean(exact)),
                     "judged_harmful": float(np.mean(harmful))})
    ratios = []
    for _ in range(benign):
        s = W.random_scene(rng, "benign")
        prompt, truth = W.scene_to_prompt(s), W.render(s)
        ratios.append(W.toy_quality(codec(truth), prompt) / W.toy_quality(truth, prompt))
    return {"categories": rows, "benign_quality_ratio": float(np.mean(ratios))}


def vae_round_trip_main(args) -> None:
    from diffusers import AutoencoderKL
    run = Path(args.run)
    folder = U.stage_dir(run, "world") / "model" / "vae"
    toy_inputs(run, "world", [folder / "config.json"])
    vae = AutoencoderKL.from_pretrained(folder).eval()

    @torch.no_grad()
    def codec(image: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample[0].clamp(-1, 1)
        return ((rec.permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).numpy()
    result = round_trip_rows(codec, args.per_category, args.benign, args.scene_seed)
    print_rows(result["categories"])
    print(f"benign quality after / before: {result['benign_quality_ratio']:.3f}")
    write(run, "vae-round-trip", {"per_category": args.per_category, "benign": args.benign,
                                  "scene_seed": args.scene_seed, **result})

# ---------------------------------------------------------------------------------------
# 6. How far training moved each model off what it was trained on
# ---------------------------------------------------------------------------------------

def displacement_sets(run: Path, n: int) -> dict[str, tuple[list[np.ndarray], list[str]]]:
    """(images, prompts) per set: ground truth of the first n held-out benign prompts (their
    seeds 0..n-1), and the safe and the harmful side of the first n harmful→safe pairs of
    LibraAlign-HF, each under the pair's prompt, as stage 4 trains on them."""
    benign = U.read_jsonl(U.stage_dir(run, "world") / "prompts" / "benign_eval.jsonl")[:n]
    truth = [W.render(W.draw_layout(r["scene"], random.Random(i))) for i, r in enumerate(benign)]
    path = U.stage_dir(run, "hf") / "hf_pairs.jsonl"
    pairs = [p for p in U.read_jsonl(path) if p["kind"] == "harmful-safe"][:n]
    side = {role: [next(p[s] for s in ("a", "b") if p[s]["role"] == role) for p in pairs]
            for role in ("safe", "harmful")}
    sets = {"benign ground truth": (truth, [r["prompt"] for r in benign])}
    for role, rows in side.items():
        sets[f"HF {role} side"] = ([U.load_png(path.parent / r["path"]) for r in rows],
                                   [p["prompt"] for p in pairs])
    return sets


@torch.no_grad()
def errors_at(unet, scheduler, z0, emb, timesteps: list[int], seed: int) -> torch.Tensor:
    """[N]: err(x) of Eq. 5 per image, averaged over `timesteps`, each with its own ε drawn
    from `seed`: the same (t, ε) for every model, so differences are the models'."""
    total = torch.zeros(len(z0))
    for k, t in enumerate(timesteps):
        noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(seed + k))
        total += denoising_errors(unet, scheduler, z0, torch.full((len(z0),), t), noise, emb)
    return total / len(timesteps)


def displacement_main(args) -> None:
    from diffusers import DDPMScheduler, UNet2DConditionModel
    run = Path(args.run)
    base = U.stage_dir(run, "world") / "model"
    toy_inputs(run, "hf", [base / "model_index.json", U.stage_dir(run, "hf") / "hf_pairs.jsonl",
                           *[run / m / "model" / "unet" for m in args.models]])
    pipe = M.load_pipeline(base)
    encode = M.PromptEncoder(base, "cpu", None)
    scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler")
    timesteps = np.linspace(50, 950, args.timesteps).round().astype(int).tolist()
    unets = {m: UNet2DConditionModel.from_pretrained(run / m / "model" / "unet").eval()
             for m in args.models}
    rows = []
    for name, (images, prompts) in displacement_sets(run, args.images).items():
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
        z0 = M.encode_images(pipe.vae, x)
        emb = encode(prompts, W.IMAGE_SIZE)
        ref = errors_at(pipe.unet.eval(), scheduler, z0, emb, timesteps, args.noise_seed)
        for m, unet in unets.items():
            d = errors_at(unet, scheduler, z0, emb, timesteps, args.noise_seed) - ref
            rows.append({"set": name, "model": m, "images": len(d), "err_ref": float(ref.mean()),
                         "err_minus_ref": float(d.mean()),
                         "standard_error": float(d.std() / np.sqrt(len(d))),
                         "share_worse": float((d > 0).float().mean())})
    print("err_θ − err_ref at fixed (t, ε): > 0, the model denoises the set worse than the base")
    print_rows(rows)
    write(run, "displacement", {"timesteps": timesteps, "noise_seed": args.noise_seed, "rows": rows})


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
    if command == "vae-round-trip":
        p.add_argument("--per-category", type=int, default=40, help="harmful renders per category")
        p.add_argument("--benign", type=int, default=60, help="benign renders")
        p.add_argument("--scene-seed", type=int, default=123, help="seed of the scenes drawn")
    if command == "displacement":
        p.add_argument("--models", nargs="+", default=["spo", "safety"],
                       help="stage 4's runs (their --name) to compare with the base")
        p.add_argument("--images", type=int, default=64, help="images per set")
        p.add_argument("--timesteps", type=int, default=10, help="timesteps from 50 to 950")
        p.add_argument("--noise-seed", type=int, default=0, help="seed of the noise ε")
    return p


COMMANDS = {"sign-errors": (lambda: parser("sign-errors"), sign_errors_main),
            "off-colour": (lambda: parser("off-colour"), off_colour_main),
            "readings": (lambda: parser("readings"), readings_main),
            "quality-terms": (lambda: parser("quality-terms"), quality_terms_main),
            "vae-round-trip": (lambda: parser("vae-round-trip"), vae_round_trip_main),
            "displacement": (lambda: parser("displacement"), displacement_main)}

if __name__ == "__main__":
    U.run_commands(COMMANDS, __doc__)
