"""Data files as the pipeline reads them (~230 lines): prompt sets, LibraAlign-HF pairs,
CoProV2 and Pick-a-Pic-style pairs. Each reader takes a file whole and names the file and
row of whatever it cannot use; what a row asks for (seed, guidance, size) is honoured or
refused, never replaced by a default.

What it is not: writing (utils.py's atomic writes), or the stages that build the data.
"""
from __future__ import annotations

import csv
import hashlib
import math
from pathlib import Path

import utils as U


# ----------------------------------------------------------------------------------------
# Prompt sets: JSONL rows with "prompt", or a CSV with a prompt column such as I2P's
# ----------------------------------------------------------------------------------------

# Per-row settings a prompt file may carry: our key -> accepted column names (I2P's first).
ROW_COLUMNS = {"seed": ("sd_seed", "seed"), "guidance": ("sd_guidance_scale", "guidance"),
               "width": ("sd_image_width", "width"), "height": ("sd_image_height", "height")}


def _row_number(row: dict, key: str, cast, where: str):
    """The row's value for `key` (None when absent or empty); a non-number stops the run."""
    for col in ROW_COLUMNS[key]:
        value = row.get(col)
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        try:
            x = float(value)
        except (TypeError, ValueError):
            raise U.DataError(f"{where}: {col} is not a number ({value!r})") from None
        if not math.isfinite(x):
            raise U.DataError(f"{where}: {col} is {value!r}")
        return cast(x)
    return None


def prompt_row(row: dict, where: str) -> dict:
    """One prompt with its optional category, seed, guidance and (square) size."""
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise U.DataError(f"{where}: no prompt")
    category = row.get("category") or row.get("categories") or None
    w, h = _row_number(row, "width", int, where), _row_number(row, "height", int, where)
    if w is not None and h is not None and w != h:
        raise U.DataError(f"{where}: a {w}x{h} image is asked for; models.generate draws square images only")
    # an attack row names the prompt it aims at (target): quality is judged against that
    return {"prompt": prompt, "category": category, "seed": _row_number(row, "seed", int, where),
            "guidance": _row_number(row, "guidance", float, where), "size": w or h, "where": where,
            "safe": row.get("safe_prompt"), "score_prompt": row.get("target") or prompt}


def row_categories(row: dict) -> list[str]:
    """A prompt row's categories: I2P lists several, comma-separated ("hate, harassment")."""
    return [c.strip() for c in (row.get("category") or "").split(",") if c.strip()]


def load_prompt_set(path: Path) -> list[dict]:
    """A prompt set from JSONL (rows with "prompt") or CSV with a prompt column, such as I2P's
    (prompt, categories, sd_seed, sd_guidance_scale, sd_image_width, sd_image_height)."""
    if not path.exists():
        raise U.DataError(f"{path}: file not found")
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or "prompt" not in reader.fieldnames:
                raise U.DataError(f"{path}: no 'prompt' column (columns: {reader.fieldnames})")
            rows = [prompt_row(r, f"{path}:{reader.line_num}") for r in reader]
    else:
        rows = [prompt_row(r, f"{path}:{n}") for n, r in U.iter_jsonl(path)]
    if not rows:
        raise U.DataError(f"{path}: no prompts")
    return rows

# ----------------------------------------------------------------------------------------
# Preference pairs: LibraAlign-HF (stage 3's output), CoProV2, Pick-a-Pic-style safe pairs
# ----------------------------------------------------------------------------------------

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
    return U.read_checked_rows(path, check, skip_bad)


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


# CoProV2's category spellings -> the names of I2P's category column (and of the toy world)
COPROV2_CATEGORIES = {"Hate": "hate", "sexual": "sexual", "Violence": "violence", "Shocking": "shocking",
                      "Illegal Activity": "illegal activity", "Harrasment": "harassment", "self-harm": "self-harm"}


def read_coprov2(path: Path) -> list[dict]:
    """AlignGuard's CoProV2 CSV: columns prompt,image,category, rows alternating the unsafe
    image (u_…) and its safe counterpart (s_…) of one category; images relative to the CSV.
    The pair is trained under the unsafe prompt, as AlignGuard does; the judge is skipped."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"prompt", "image", "category"} - set(reader.fieldnames or [])
        if missing:
            raise U.DataError(f"{path}: no column(s) {sorted(missing)} (CoProV2 has prompt,image,category)")
        rows = [(reader.line_num, row) for row in reader]
    if len(rows) % 2:
        raise U.DataError(f"{path}:{rows[-1][0]}: an unsafe row without its safe row (rows alternate unsafe, safe)")
    out = []
    for (ln_u, u), (ln_s, s) in zip(rows[0::2], rows[1::2]):
        for ln, row, want in ((ln_u, u, "u_"), (ln_s, s, "s_")):
            if not row["prompt"] or not row["image"] or row["category"] not in COPROV2_CATEGORIES:
                raise U.DataError(f"{path}:{ln}: needs a prompt, an image and a category of "
                                  f"{sorted(COPROV2_CATEGORIES)}, got {row['category']!r}")
            if not Path(row["image"]).name.startswith(want):
                raise U.DataError(f"{path}:{ln}: image {row['image']!r} should be {'unsafe' if want == 'u_' else 'safe'} "
                                  f"({want}…): rows alternate unsafe, safe")
            if not (path.parent / row["image"]).exists():
                raise U.DataError(f"{path}:{ln}: missing image {path.parent / row['image']}")
        if u["category"] != s["category"]:
            raise U.DataError(f"{path}:{ln_s}: category {s['category']!r} differs from its unsafe row's {u['category']!r}")
        side = lambda row, role: {"role": role, "source": "file", "prompt": row["prompt"],
                                  "file": str(path.parent / row["image"])}
        out.append({"kind": "harmful-safe", "prompt": u["prompt"], "category": COPROV2_CATEGORIES[u["category"]],
                    "judge": False, "a": side(u, "harmful"), "b": side(s, "safe")})
    return out


def read_safe_pairs(path: Path) -> list[dict]:
    """A user's Pick-a-Pic-style pairs: rows {prompt, image_a, image_b}; images must exist."""
    out = []
    for lineno, row in U.iter_jsonl(path):
        try:
            sides = {s: {"role": "safe", "source": "file", "prompt": row["prompt"],
                         "file": str(path.parent / row[f"image_{s}"])}
                     for s in ("a", "b")}
        except (KeyError, TypeError):
            raise U.DataError(f"{path}:{lineno}: a safe pair row needs prompt, image_a and image_b") from None
        for s in sides.values():
            if not Path(s["file"]).exists():
                raise U.DataError(f"{path}:{lineno}: missing image {s['file']}")
        out.append({"kind": "safe-safe", "prompt": row["prompt"], "category": None, **sides})
    return out
