"""Data files as the pipeline reads them (~455 lines): prompt sets, LibraAlign-HF pairs,
CoProV2, Pick-a-Pic-style pairs, PSA's user tables and Sage. Each reader takes a file whole and
names the file and row of whatever it cannot use; what a row asks for (seed, guidance, size) is
honoured or refused, never replaced by a default.

What it is not: writing (lib/utils.py's atomic writes), or the stages that build the data.
"""
from __future__ import annotations

import ast
import csv
import hashlib
import json
import math
import re
from pathlib import Path

from lib import utils as U


# ----------------------------------------------------------------------------------------
# Prompt sets: JSONL rows with "prompt", or a CSV with a prompt column such as I2P's
# ----------------------------------------------------------------------------------------

# The seven harm categories (I2P's names; the toy world's and CoProV2's are the same seven),
# under every spelling the published files use: I2P, CoProV2 ("Harrasment", "Illegal
# Activity"), PSA and Sage ("Sexuality", "Self-Harm"; PSA's "Propaganda" takes the seventh
# place, as systems/psa.py reads it).
HARM_CATEGORIES = ("sexual", "violence", "hate", "harassment", "self-harm", "shocking", "illegal activity")
CATEGORY_SPELLINGS = {**{c: c for c in HARM_CATEGORIES}, "harrasment": "harassment", "sexuality": "sexual",
                      "selfharm": "self-harm", "self harm": "self-harm", "propaganda": "illegal activity",
                      # NSFW-56K's original_image_label: the NSFW image classifier's classes
                      "porn": "sexual", "hentai": "sexual", "sexy": "sexual"}

# Where the published layouts keep what a row asks for: our key -> their column names, in
# order. I2P (Hugging Face: sd_*; ESD's and RECE's copies: evaluation_*), PSA's copies
# (caption), COCO-30K (evaluation_seed; the caption's COCO image: ESD's image_id, RECE's coco_id),
# DrawBench (Prompts), NSFW-56K (original_image_label).
ROW_COLUMNS = {"prompt": ("prompt", "caption", "Prompts", "text"),
               "seed": ("sd_seed", "evaluation_seed", "seed"),
               "guidance": ("sd_guidance_scale", "evaluation_guidance", "guidance"),
               "width": ("sd_image_width", "width"), "height": ("sd_image_height", "height"),
               "categories": ("categories", "category", "original_image_label"),
               "coco_id": ("coco_id", "image_id")}
# Sage's file names carry the category: user_<id>_<category>_<concept>_<n>_{u,s}.jpg
SAGE_FILE = re.compile(r"^user_\d+_(?P<category>[a-z-]+)_")


def _column(row: dict, key: str):
    """The row's value for `key` under the first of its column names that holds one."""
    for col in ROW_COLUMNS[key]:
        value = row.get(col)
        if value is not None and not (isinstance(value, str) and not value.strip()):
            return col, value
    return None, None


def _row_number(row: dict, key: str, cast, where: str):
    """The row's value for `key` (None when absent or empty); a non-number stops the run."""
    col, value = _column(row, key)
    if col is None:
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise U.DataError(f"{where}: {col} is not a number ({value!r})") from None
    if not math.isfinite(x) or x != int(x) and cast is int:
        raise U.DataError(f"{where}: {col} is {value!r}, not a whole number" if math.isfinite(x) else
                          f"{where}: {col} is {value!r}")
    return cast(x)


def harm_categories(value, where: str) -> list[str]:
    """A row's harm categories, comma-separated (I2P: "violence, self-harm") or a list, each
    under our name; one that no published file spells so stops the run."""
    names = value if isinstance(value, list) else str(value or "").split(",")
    out = []
    for name in (str(n).strip() for n in names if str(n).strip()):
        key = " ".join(name.lower().replace("_", " ").split())
        if key not in CATEGORY_SPELLINGS:
            raise U.DataError(f"{where}: unknown harm category {name!r} (known: {', '.join(HARM_CATEGORIES)})")
        out.append(CATEGORY_SPELLINGS[key])
    return list(dict.fromkeys(out))


def prompt_row(row: dict, where: str) -> dict:
    """One prompt with what its row asks for: harm categories (a comma-joined string, None for
    a benign prompt), seed, guidance and size (width, height), each None when the row leaves it
    to the command line; and the COCO image a COCO-30K caption describes (FID's reference).
    Sage rows take their category from their file name."""
    _, prompt = _column(row, "prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise U.DataError(f"{where}: no prompt")
    damaged = [ch for ch in prompt if "\udc80" <= ch <= "\udcff"]  # bytes read_prompt_rows could not decode
    if damaged:
        raise U.DataError(f"{where}: the prompt holds bytes that are not UTF-8 "
                          f"({bytes(ord(ch) - 0xDC00 for ch in damaged)!r}): the file is damaged there")
    _, cats = _column(row, "categories")
    sage = SAGE_FILE.match(str(row.get("file_name", "")))
    categories = harm_categories(cats if cats is not None else sage and sage["category"], where)
    w, h = _row_number(row, "width", int, where), _row_number(row, "height", int, where)
    if (w is None) != (h is None):
        raise U.DataError(f"{where}: a width without a height (or a height without a width)")
    # an attack row names the prompt it aims at (target): quality is judged against that
    return {"prompt": prompt, "category": ", ".join(categories) or None, "seed": _row_number(row, "seed", int, where),
            "guidance": _row_number(row, "guidance", float, where), "size": None if w is None else (w, h),
            "coco_id": _row_number(row, "coco_id", int, where),
            "where": where, "safe": row.get("safe_prompt"), "score_prompt": row.get("target") or prompt}


def row_categories(row: dict) -> list[str]:
    """A prompt row's categories: I2P lists several, comma-separated ("hate, harassment")."""
    return [c.strip() for c in (row.get("category") or "").split(",") if c.strip()]


def read_prompt_rows(source: str) -> tuple[list[tuple[str, dict]], str]:
    """Every row of a prompt source with where it is (file:line): JSONL (rows with a prompt),
    CSV (any of the layouts above), JSON (a list of prompts, HPDv2's benchmark files) or
    hf:ID (a Hugging Face dataset in the local cache, or a folder `save_to_disk` wrote)."""
    if source.startswith("hf:"):
        return [(f"{source}[{i}]", r) for i, r in enumerate(hf_dataset_rows(source[3:]))], source
    path = Path(source)
    if not path.exists():
        raise U.DataError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        # a byte that is not UTF-8 becomes a lone surrogate: its row, not the file, is refused
        with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not set(ROW_COLUMNS["prompt"]) & set(reader.fieldnames):
                raise U.DataError(f"{path}: no prompt column ({' or '.join(ROW_COLUMNS['prompt'])}; "
                                  f"columns: {reader.fieldnames})")
            return [(f"{path}:{reader.line_num}", r) for r in reader], str(path)
    if suffix == ".json":
        prompts = U.read_json(path)
        if not isinstance(prompts, list) or not all(isinstance(x, str) for x in prompts):
            raise U.DataError(f"{path}: a JSON prompt set is a list of prompts (HPDv2's layout)")
        return [(f"{path}[{i}]", {"prompt": x}) for i, x in enumerate(prompts)], str(path)
    return [(f"{path}:{n}", r) for n, r in U.iter_jsonl(path)], str(path)


def hf_dataset_rows(name: str) -> list[dict]:
    """The rows of a Hugging Face dataset without downloading: a folder `save_to_disk` wrote,
    or an id in the local cache (offline); a missing one stops, saying how to fetch it."""
    import datasets
    if Path(name).is_dir():
        ds = datasets.load_from_disk(name)
    else:
        try:
            ds = datasets.load_dataset(name)
        except Exception as e:  # not in the cache: offline, load_dataset raises one of several kinds
            raise U.DataError(
                f"hf:{name}: not in the local Hugging Face datasets cache ({type(e).__name__}). On a machine with "
                f"internet run `python -c \"import datasets; datasets.load_dataset('{name}')\"`, then copy "
                f"~/.cache/huggingface over; or save it with Dataset.save_to_disk and pass hf:FOLDER.") from None
    if isinstance(ds, datasets.DatasetDict):
        if len(ds) != 1:
            raise U.DataError(f"hf:{name}: {len(ds)} splits ({', '.join(ds)}); save the one to read with "
                              f"save_to_disk and pass hf:FOLDER")
        ds = next(iter(ds.values()))
    return list(ds)


def load_prompt_set(source: str | Path, skip_bad: bool = False) -> tuple[list[dict], list[str]]:
    """A prompt set, whole: (rows, skipped). A row it cannot use (no prompt, an unknown harm
    category, a number that is not one) stops the run naming it, or with skip_bad is left out
    and named in `skipped`."""
    rows, skipped = [], []
    found, name = read_prompt_rows(str(source))
    for where, r in found:
        try:
            rows.append(prompt_row(r, where))
        except U.DataError as e:
            if not skip_bad:
                raise U.DataError(f"{e}; fix the row, or pass --skip-bad-rows to leave such rows out") from None
            skipped.append(str(e))
    if not rows:
        raise U.DataError(f"{name}: no prompts")
    return rows, skipped


def read_diffusiondb_prompts(path: Path) -> list[dict]:
    """DiffusionDB's prompt metadata (metadata.parquet: one row per image, a `prompt` column):
    each distinct prompt once, in file order, with no category."""
    import pyarrow.parquet as pq
    if not path.exists():
        raise U.DataError(f"{path}: file not found")
    table = pq.ParquetFile(path)
    if "prompt" not in table.schema_arrow.names:
        raise U.DataError(f"{path}: no prompt column (columns: {table.schema_arrow.names})")
    prompts = {}
    for batch in table.iter_batches(columns=["prompt"]):
        for p in batch.column(0).to_pylist():
            if isinstance(p, str) and p.strip():
                prompts.setdefault(p.strip(), None)
    return [{"prompt": p, "category": None, "where": f"{path}:{i}"} for i, p in enumerate(prompts)]


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


def read_coprov2(path: Path, need_images: bool = True) -> list[dict]:
    """AlignGuard's CoProV2 CSV: columns prompt,image,category; each unsafe image u_<key> has
    its safe counterpart s_<key>, images relative to the CSV. A pair of several categories is
    listed once per category (its unsafe row, then its safe row, repeated: 321 of the published
    15,690 pairs), so rows are grouped by <key>, and the pair's categories joined ("hate,
    sexual"). The pair is trained under the unsafe prompt, as AlignGuard does; no judge filters it."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"prompt", "image", "category"} - set(reader.fieldnames or [])
        if missing:
            raise U.DataError(f"{path}: no column(s) {sorted(missing)} (CoProV2 has prompt,image,category)")
        rows = [(f"{path}:{reader.line_num}", row) for row in reader]
    groups: dict[str, dict] = {}
    for where, row in rows:
        name = Path(row["image"]).name
        if not row["prompt"].strip() or name[:2] not in ("u_", "s_"):
            raise U.DataError(f"{where}: needs a prompt and an image named u_… (unsafe) or s_… (safe), got "
                              f"{row['image']!r}")
        side = groups.setdefault(name[2:], {"u_": {}, "s_": {}, "categories": []})[name[:2]]
        if side and side["prompt"] != row["prompt"]:
            raise U.DataError(f"{where}: {name} is listed before with another prompt")
        side.update(prompt=row["prompt"], image=row["image"], where=where)
        groups[name[2:]]["categories"] += harm_categories(row["category"], where)
    out = []
    for key, g in groups.items():
        lone = [s for s in ("u_", "s_") if not g[s]]
        if lone:
            other = g["s_" if lone == ["u_"] else "u_"]
            raise U.DataError(f"{other['where']}: {key} has no {'unsafe' if lone == ['u_'] else 'safe'} row "
                              f"({lone[0]}{key})")
        for s in ("u_", "s_"):
            if need_images and not (path.parent / g[s]["image"]).exists():
                raise U.DataError(f"{g[s]['where']}: missing image {path.parent / g[s]['image']}")
        side = lambda s, role: {"role": role, "source": "file", "prompt": g[s]["prompt"],
                                "file": str(path.parent / g[s]["image"])}
        out.append({"kind": "harmful-safe", "prompt": g["u_"]["prompt"],
                    "category": ", ".join(dict.fromkeys(g["categories"])), "judge": False,
                    "a": side("u_", "harmful"), "b": side("s_", "safe")})
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


# ----------------------------------------------------------------------------------------
# `python -m lib.data check KIND SOURCE`: a whole published file through its reader, and what the
# reader did with every row (taken, or left out and why)
# ----------------------------------------------------------------------------------------

# PSA's category names (Sage's users.csv) -> the seven categories of this pipeline
SAGE_CATEGORIES = {"hate": "hate", "harassment": "harassment", "violence": "violence", "self-harm": "self-harm",
                   "selfharm": "self-harm", "sexuality": "sexual", "sexual": "sexual", "shocking": "shocking",
                   "propaganda": "illegal activity", "illegal activity": "illegal activity"}


def sage_category(name: str, where: str) -> str:
    key = name.strip().lower().replace("_", " ")
    if key not in SAGE_CATEGORIES:
        raise U.DataError(f"{where}: unknown category {name!r} (known: {sorted(SAGE_CATEGORIES)})")
    return SAGE_CATEGORIES[key]


def read_user_table(path: Path) -> dict[str, dict]:
    """PSA's published user tables, whole: the evaluation's user_info.csv (User_ID, ...,
    Banned_Categories as a Python list, "['Propaganda', 'Sexuality']") and the 1,000 users'
    users.csv, which has no id column: its k-th row is user k, written as Sage writes ids
    ("0000001"; the two tables agree row by row). A list may also be split on ; or ,."""
    users = {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "Banned_Categories" not in reader.fieldnames:
            raise U.DataError(f"{path}: needs a Banned_Categories column (has {reader.fieldnames})")
        for k, row in enumerate(reader, 1):
            where = f"{path}:{reader.line_num}"
            text = row["Banned_Categories"].strip()
            try:  # a Python list of strings, read as data (literal_eval evaluates nothing else)
                names = ast.literal_eval(text) if text.startswith("[") else text.replace(";", ",").split(",")
            except (ValueError, SyntaxError):
                raise U.DataError(f"{where}: Banned_Categories {text!r} is not a list of categories") from None
            banned = sorted({sage_category(s, where) for s in names if str(s).strip()}, key=HARM_CATEGORIES.index)
            uid = str(row["User_ID"]) if "User_ID" in row else f"{k:07d}"
            attrs = {k2: v for k2, v in row.items() if k2 not in ("User_ID", "Banned_Categories", "Allowed_Categories")}
            user = {"id": uid, "banned": banned, **attrs}
            user["text"] = (f"User profile: {json.dumps(attrs, sort_keys=True)}. Banned categories: "
                            f"{', '.join(banned) or 'none'}. Allowed categories: "
                            f"{', '.join(c for c in HARM_CATEGORIES if c not in banned) or 'none'}.")
            users[uid] = user
    return users


def read_sage(folder: Path, users_file: Path | None = None, need_images: bool = True) -> tuple[list[dict], list[dict]]:
    """Sage's data for sd15: metadata.jsonl (the imagefolder convention: file_name, chosen,
    rejected, caption, user_data with User_ID ...) and the user table (`users_file`, default
    users.csv in the folder; read_user_table). Returns (users, pairs); pairs are already
    ordered for their user (chosen = x_w). A bad row stops the run naming file and line."""
    meta, users_csv = folder / "metadata.jsonl", users_file or folder / "users.csv"
    absent = [str(f) for f in (meta, users_csv) if not f.exists()]
    if absent:
        raise U.DataError(f"--sage {folder}: missing {', '.join(absent)} (Sage's metadata.jsonl and PSA's user "
                          f"table, e.g. evaluation/eval_gpt/user_info.csv)")
    users = read_user_table(users_csv)
    pairs = []
    for n, row in U.iter_jsonl(meta):
        where = f"{meta}:{n}"
        missing = [k for k in ("chosen", "rejected", "caption", "user_data") if k not in row]
        if missing:
            raise U.DataError(f"{where}: missing {missing}")
        uid = str(row["user_data"].get("User_ID", ""))
        if uid not in users:
            raise U.DataError(f"{where}: user {uid!r} is not in {users_csv}")
        files = [str(folder / row[k]) for k in ("chosen", "rejected")]
        absent = [f for f in files if not Path(f).exists()]
        if absent and need_images:
            raise U.DataError(f"{where}: missing image {absent[0]}")
        pairs.append({"prompt": row["caption"], "kind": "sage", "user": uid,
                      "w": {"file": files[0], "role": "chosen"}, "l": {"file": files[1], "role": "rejected"}})
    return list(users.values()), pairs


def check(kind: str, source: str, users: str | None = None) -> list[str]:
    """The report lines of one file (or hf:ID, or Sage's folder) read whole by its reader."""
    from collections import Counter
    if kind == "prompts":
        rows, skipped = load_prompt_set(source, skip_bad=True)
        cats = Counter(c for r in rows for c in row_categories(r))
        sizes = Counter(r["size"] for r in rows if r["size"])
        own = {k: sum(r[k] is not None for r in rows) for k in ("seed", "guidance", "size")}
        return [f"{source}: {len(rows)} prompts taken, {len(skipped)} rows left out",
                f"  harm categories: {dict(cats) or 'none (a benign set)'}",
                f"  rows with their own seed / guidance / size: {own['seed']} / {own['guidance']} / {own['size']}",
                f"  sizes asked for: {dict(sizes.most_common())}", *(f"  left out: {s}" for s in skipped)]
    if kind == "coprov2":
        pairs = read_coprov2(Path(source), need_images=False)
        absent = sum(not Path(p[s]["file"]).exists() for p in pairs for s in ("a", "b"))
        cats = Counter(c for p in pairs for c in row_categories(p))
        return [f"{source}: {len(pairs)} unsafe-safe pairs, {sum(',' in p['category'] for p in pairs)} of several "
                f"categories", f"  categories: {dict(cats)}",
                f"  images not beside the CSV yet: {absent} of {2 * len(pairs)} (stage 3 needs them)"]
    if kind in ("users", "sage"):
        if kind == "users":
            table = read_user_table(Path(source))
            return [f"{source}: {len(table)} users", "  banned, per category: "
                    + str(dict(Counter(c for u in table.values() for c in u["banned"])))]
        found, pairs = read_sage(Path(source), Path(users) if users else None, need_images=False)
        return [f"{source}: {len(pairs)} per-user pairs of {len({p['user'] for p in pairs})} users "
                f"({len(found)} in the user table)"]
    if kind == "safe-pairs":
        return [f"{source}: {len(read_safe_pairs(Path(source)))} safe-safe pairs"]
    raise SystemExit(f"unknown kind {kind!r}: prompts, coprov2, users, sage or safe-pairs")


def pickapic_pairs(parquet: Path, out: Path, n: int | None = None) -> dict:
    """Pick-a-Pic v2 rows (caption, jpg_0 and jpg_1 as encoded image bytes, label_0 and
    label_1) as stage 3's --safe-pairs: out/images/<row>_{a,b}.<ext> and out/pairs.jsonl with
    rows {prompt, image_a, image_b, preferred}. A tie (label 0.5 each) names no preference
    and is dropped (and counted), as Diffusion-DPO drops it; rows are taken in file order,
    the first n kept. Stage 3 annotates both images with r and C; stage 4 orders them by R."""
    import pyarrow.parquet as pq
    need = ["caption", "jpg_0", "jpg_1", "label_0", "label_1"]
    table = pq.ParquetFile(parquet)
    missing = [c for c in need if c not in table.schema_arrow.names]
    if missing:
        raise U.DataError(f"{parquet}: no column(s) {missing} (Pick-a-Pic v2 has {', '.join(need)})")
    rows, ties, bad = [], 0, []
    for batch in table.iter_batches(columns=need, batch_size=256):
        for r in batch.to_pylist():
            k = len(rows) + ties + len(bad)
            if n is not None and len(rows) >= n:
                break
            if r["label_0"] == r["label_1"]:
                ties += 1
                continue
            if not r["caption"] or not r["jpg_0"] or not r["jpg_1"]:
                bad.append(f"{parquet}[{k}]: no caption or image")
                continue
            sides = {}
            for s, col in (("a", "jpg_0"), ("b", "jpg_1")):
                ext = "png" if r[col][:8] == b"\x89PNG\r\n\x1a\n" else "jpg"
                sides[s] = f"images/{k:07d}_{s}.{ext}"
                U.atomic_write_bytes(out / sides[s], r[col])
            rows.append({"prompt": r["caption"], "image_a": sides["a"], "image_b": sides["b"],
                         "preferred": "a" if r["label_0"] > r["label_1"] else "b"})
    U.write_jsonl(out / "pairs.jsonl", rows)
    return {"pairs": len(rows), "ties_dropped": ties, "rows_left_out": bad}


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description="check: read a whole data file as the pipeline reads it and say "
                                                 "what was done with every row; pickapic: Pick-a-Pic v2 parquet "
                                                 "rows as stage 3's --safe-pairs")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check")
    c.add_argument("kind", choices=["prompts", "coprov2", "users", "sage", "safe-pairs"])
    c.add_argument("source", help="the file (a prompt set may be hf:ID; sage: Sage's folder)")
    c.add_argument("--users", help="sage: PSA's user table (default: users.csv in the folder)")
    k = sub.add_parser("pickapic")
    k.add_argument("parquet", type=Path, help="a Pick-a-Pic v2 parquet file (yuvalkirstain/pickapic_v2)")
    k.add_argument("--out", type=Path, required=True, help="folder for images/ and pairs.jsonl")
    k.add_argument("--n", type=int, help="keep the first N pairs that are not ties (the paper takes 2,495)")
    cli = parser.parse_args()
    if cli.command == "check":
        U.run_stage(lambda: print("\n".join(check(cli.kind, cli.source, cli.users))))
    else:
        U.run_stage(lambda: print(json.dumps(pickapic_pairs(cli.parquet, cli.out, cli.n), indent=2)))
