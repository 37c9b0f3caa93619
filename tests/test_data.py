"""lib/data.py's readers on cuts of the published files (tests/fixtures/README.md names each
source): every I2P layout with its per-row seed, guidance and size, CoProV2's pairs and prompts,
PSA's user tables and Sage's prompt sets, COCO-30K, DrawBench; each row's request honoured or
refused by name, never replaced by a default; and bad rows named by file and line."""
import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import module

from lib import data as D
from lib import utils as U

FIXTURES = Path(__file__).resolve().parent / "fixtures"
I2P_COLUMNS = ["prompt", "categories", "hard", "inappropriate_percentage", "nudity_percentage", "sd_seed",
               "sd_guidance_scale", "sd_image_width", "sd_image_height"]


def write_csv(path, rows, columns=I2P_COLUMNS):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)
    return path


def i2p_rows():
    return [
        {"prompt": "a large red circle, sky background, extreme blood", "categories": "violence", "hard": 1,
         "inappropriate_percentage": 80, "nudity_percentage": 0, "sd_seed": 1234, "sd_guidance_scale": 7,
         "sd_image_width": 32, "sd_image_height": 32},
        {"prompt": "a small blue square, white background", "categories": "", "hard": 0,
         "inappropriate_percentage": 0, "nudity_percentage": 0, "sd_seed": "", "sd_guidance_scale": "",
         "sd_image_width": "", "sd_image_height": ""},
    ]


# --------------------------------------------------------------------------------------
# I2P in each of its published layouts
# --------------------------------------------------------------------------------------

def test_i2p_in_the_hugging_face_columns(tmp_path):
    rows, skipped = D.load_prompt_set(FIXTURES / "i2p" / "i2p_benchmark_cut.csv")
    assert len(rows) == 7 and skipped == []
    first = rows[0]
    assert first["prompt"].startswith("weird and disturbing portrait of todd solondz")
    assert (first["category"], first["seed"], first["guidance"], first["size"]) == (
        "violence, self-harm", 4261553411, 13.0, (512, 512))
    assert [r["size"] for r in rows[5:]] == [(384, 512), (448, 512)]  # (width, height): as asked


def test_i2p_in_the_erasure_repositories_columns_keeps_each_rows_seed_and_guidance():
    """ESD's and RECE's copy names them evaluation_seed and evaluation_guidance (an index column
    first, case_number last): they are the rows' own, never the command line's defaults."""
    path = FIXTURES / "i2p" / "unsafe-prompts4703_cut.csv"
    with pytest.raises(U.DataError, match=r"unsafe-prompts4703_cut.csv:7: no prompt; fix the row, or pass "
                                          r"--skip-bad-rows"):
        D.load_prompt_set(path)
    rows, skipped = D.load_prompt_set(path, skip_bad=True)
    assert len(rows) == 7 and skipped == [f"{path}:7: no prompt"]
    assert (rows[0]["seed"], rows[0]["guidance"], rows[0]["size"]) == (4261553411, 13.0, (512, 512))
    assert (rows[1]["seed"], rows[1]["guidance"], rows[1]["category"]) == (4080709695, 7.0, "self-harm")
    assert [r["size"] for r in rows[5:]] == [(384, 512), (448, 512)]


def test_i2p_in_psas_copy_reads_its_caption_column():
    rows, _ = D.load_prompt_set(FIXTURES / "i2p" / "i2p_4073_cut.csv")
    assert len(rows) == 5 and rows[1]["prompt"].startswith("digging my own grave")
    assert (rows[1]["seed"], rows[1]["guidance"], rows[1]["category"]) == (4080709695, 7.0, "self-harm")


# --------------------------------------------------------------------------------------
# CoProV2, PSA and Sage, COCO-30K, DrawBench
# --------------------------------------------------------------------------------------

def test_coprov2_pairs_group_a_pair_listed_under_several_categories():
    """The published CSV lists a pair of two categories twice (its unsafe row, then its safe
    row, once per category); the reader keeps one pair with both categories."""
    pairs = D.read_coprov2(FIXTURES / "coprov2" / "CoProv2_train_cut.csv", need_images=False)
    assert [p["category"] for p in pairs] == ["hate"] * 3
    assert pairs[0]["a"]["file"].endswith("u_idx_0000000_0.jpg") and pairs[0]["b"]["file"].endswith(
        "s_idx_0000000_0.jpg") and pairs[0]["prompt"] == pairs[0]["a"]["prompt"]
    every = D.read_coprov2(FIXTURES / "coprov2" / "CoProv2_train_categories_cut.csv", need_images=False)
    assert [p["category"] for p in every] == ["hate", "harassment", "violence", "self-harm", "sexual", "shocking",
                                              "illegal activity", "hate, sexual"]  # the last one listed twice
    assert every[-1]["a"]["file"].endswith("u_idx_0000110_0.jpg") and every[-1]["b"]["file"].endswith(
        "s_idx_0000110_0.jpg")
    with pytest.raises(U.DataError, match=r"CoProv2_train_cut.csv:2: missing image .*u_idx_0000000_0.jpg"):
        D.read_coprov2(FIXTURES / "coprov2" / "CoProv2_train_cut.csv")


def test_coprov2_multi_category_and_broken_rows(tmp_path):
    rows = [("a queer couple kisses", "u_idx_1_0.jpg", "Hate"), ("a queer couple kisses", "u_idx_1_0.jpg", "sexual"),
            ("a loving couple kisses", "s_idx_1_0.jpg", "Hate"), ("a loving couple kisses", "s_idx_1_0.jpg", "sexual")]
    path = write_csv(tmp_path / "c.csv", [dict(zip(("prompt", "image", "category"), r)) for r in rows],
                     columns=["prompt", "image", "category"])
    (pair,) = D.read_coprov2(path, need_images=False)
    assert pair["category"] == "hate, sexual"
    path = write_csv(tmp_path / "c.csv", [dict(zip(("prompt", "image", "category"), r)) for r in rows[:2]],
                     columns=["prompt", "image", "category"])
    with pytest.raises(U.DataError, match=r"c.csv:3: idx_1_0.jpg has no safe row \(s_idx_1_0.jpg\)"):
        D.read_coprov2(path, need_images=False)
    path = write_csv(tmp_path / "c.csv", [{"prompt": "x", "image": "u_1.jpg", "category": "Gore"}],
                     columns=["prompt", "image", "category"])
    with pytest.raises(U.DataError, match=r"c.csv:2: unknown harm category 'Gore'"):
        D.read_coprov2(path, need_images=False)


@pytest.mark.parametrize("name", ["CoProv2_test_cut.csv", "psalign_CoProv2_test_cut.csv"])
def test_coprov2_test_prompts_take_the_seven_categories_as_spelled(name):
    rows, _ = D.load_prompt_set(FIXTURES / "coprov2" / name)
    assert {r["category"] for r in rows} <= set(D.HARM_CATEGORIES) and all(r["seed"] is None for r in rows)
    if name == "CoProv2_test_cut.csv":
        assert sorted(r["category"] for r in rows) == sorted(D.HARM_CATEGORIES)  # "Harrasment", "Illegal Activity"


def test_psa_user_tables_as_published():
    info = D.read_user_table(FIXTURES / "psa" / "user_info_cut.csv")
    table = D.read_user_table(FIXTURES / "psa" / "users_cut.csv")  # no id column: the k-th row is user k
    assert list(info) == list(table) == ["0000001", "0000002", "0000003", "0000004", "0000005"]
    assert info["0000001"]["banned"] == table["0000001"]["banned"] == ["sexual", "illegal activity"]  # PSA's Propaganda
    assert info["0000002"]["banned"] == ["sexual", "self-harm", "shocking", "illegal activity"]  # our order
    assert info["0000003"]["Age"] == table["0000003"]["Age"] == "18"  # the two tables agree row by row
    assert "Banned categories: sexual, illegal activity." in info["0000001"]["text"]


def test_sage_prompt_sets_take_the_category_from_the_file_name():
    rows, _ = D.load_prompt_set(FIXTURES / "psa" / "sage_seen_cut.csv")
    # user_<id>_<category>_<concept>_<n>_u.jpg; PSA's propaganda takes the seventh place
    assert len(rows) == 7 and sorted(r["category"] for r in rows) == sorted(D.HARM_CATEGORIES)
    assert (rows[0]["category"], rows[1]["category"]) == ("illegal activity", "sexual")  # propaganda, sexuality


@pytest.mark.parametrize("name", ["rece_coco_30k_cut.csv", "esd_coco_30k_cut.csv"])
def test_coco_30k_prompts_keep_their_evaluation_seed(name):
    rows, _ = D.load_prompt_set(FIXTURES / "coco" / name)
    assert rows[0]["prompt"] == "A bicycle replica with a clock as the front wheel."
    assert rows[0]["seed"] == 41337 and rows[0]["category"] is None and rows[0]["guidance"] is None


def test_drawbench_prompts_are_benign_and_its_category_is_a_topic():
    rows, _ = D.load_prompt_set(FIXTURES / "drawbench" / "drawbench_cut.csv")
    assert len(rows) == 5 and rows[3]["prompt"].startswith("A stack of 3 plates. A blue plate is on the top, ")
    assert all(r["category"] is None for r in rows)


def test_nsfw_56k_prompts_are_sexual_by_their_image_label_and_keep_their_seed(tmp_path):
    """NSFW-56K labels each prompt by the NSFW classifier's class of its image ("porn");
    another class of that classifier that is not a harm ("neutral") is refused, not dropped."""
    path = FIXTURES / "nsfw56k" / "NSFW-56K_cut.csv"
    rows, skipped = D.load_prompt_set(path)
    assert [r["seed"] for r in rows] == [584589562, 67260509, 777827639] and not skipped
    assert all(r["category"] == "sexual" and r["guidance"] is None and r["size"] is None for r in rows)
    text = path.read_text(encoding="utf-8").replace(",porn,0,47,", ",neutral,0,47,")
    (tmp_path / "n.csv").write_text(text, encoding="utf-8")
    with pytest.raises(U.DataError, match=r"n.csv:4: unknown harm category 'neutral'"):
        D.load_prompt_set(tmp_path / "n.csv")


def test_a_row_with_bytes_that_are_not_utf8_is_refused_alone(tmp_path):
    """A published copy of I2P-Sexual has rows whose multi-byte characters lost a byte (a curly
    quote's third byte written as "?"): that row is named, the others read; a byte-order mark
    does not become part of the first column's name."""
    path = tmp_path / "damaged.csv"
    path.write_bytes(b"\xef\xbb\xbfprompt,evaluation_seed\r\na red circle,1\r\n\"\xe2\x80?a blue square\",2\r\n"
                     b"a green \xe2\x80\x9ctriangle\xe2\x80\x9d,3\r\n")
    with pytest.raises(U.DataError, match=r"damaged.csv:3: the prompt holds bytes that are not UTF-8 "
                                          r"\(b'\\xe2\\x80'\): the file is damaged there; .*--skip-bad-rows"):
        D.load_prompt_set(path)
    rows, skipped = D.load_prompt_set(path, skip_bad=True)
    assert [(r["prompt"], r["seed"]) for r in rows] == [("a red circle", 1), ("a green “triangle”", 3)]
    assert len(skipped) == 1 and "damaged.csv:3:" in skipped[0]
    rows, skipped = D.load_prompt_set(FIXTURES / "i2p" / "I2P_sexual_931_cut.csv", skip_bad=True)
    assert [r["seed"] for r in rows] == [1867756129] and len(skipped) == 1
    assert skipped[0].endswith("I2P_sexual_931_cut.csv:3: the prompt holds bytes that are not UTF-8 "
                               "(b'\\xe2\\x80\\xe2\\x80\\xe2\\x80'): the file is damaged there")


def test_a_json_list_is_a_prompt_set_and_anything_else_is_named(tmp_path):
    (tmp_path / "anime.json").write_text('["a cat, anime style", "a dog, anime style"]')
    rows, _ = D.load_prompt_set(tmp_path / "anime.json")
    assert [r["prompt"] for r in rows] == ["a cat, anime style", "a dog, anime style"]
    (tmp_path / "bad.json").write_text('{"a": 1}')
    with pytest.raises(U.DataError, match=r"bad.json: a JSON prompt set is a list of prompts"):
        D.load_prompt_set(tmp_path / "bad.json")


# --------------------------------------------------------------------------------------
# What a row asks for, honoured or refused
# --------------------------------------------------------------------------------------

def test_rows_carry_seed_guidance_and_size_into_the_plan(tmp_path):
    rows, _ = D.load_prompt_set(write_csv(tmp_path / "i2p.csv", i2p_rows()))
    assert rows[0]["seed"] == 1234 and rows[0]["guidance"] == 7.0 and rows[0]["size"] == (32, 32)
    assert rows[0]["category"] == "violence" and rows[1]["category"] is None
    assert rows[1]["seed"] is None and rows[1]["guidance"] is None and rows[1]["size"] is None
    rows[1]["size"] = (32, 16)
    args = type("A", (), {"seeds_per_prompt": 2, "seed": 5, "guidance": 4.0, "size": None, "skip_bad_rows": False})()
    plan, skipped = module("05_evaluate.py").plan_images(args, {"i2p": rows}, Base())
    assert [(p["seed"], p["guidance"], p["size"]) for p in plan] == [
        (1234, 7.0, 32), (1235, 7.0, 32), (5_000_002, 4.0, [32, 16]), (5_000_003, 4.0, [32, 16])]
    rows[1]["size"] = (32, 15)  # not a multiple of the VAE's factor: the model cannot draw it
    with pytest.raises(U.DataError, match=r"i2p.csv:3: a 32x15 image, which .* cannot draw \(sides multiples of "
                                          r"2\); pass --skip-bad-rows"):
        module("05_evaluate.py").plan_images(args, {"i2p": rows}, Base())
    args.skip_bad_rows = True
    plan, skipped = module("05_evaluate.py").plan_images(args, {"i2p": rows}, Base())
    assert len(plan) == 2 and len(skipped) == 1 and "32x15" in skipped[0]


class Base:
    """A base model whose VAE downsamples twice as much as it is wide: factor 2."""
    path = Path(__file__).parent  # read by drawable_multiple through the monkeypatch below


@pytest.fixture(autouse=True)
def vae_factor_two(monkeypatch):
    from lib import models as M
    monkeypatch.setattr(M, "drawable_multiple", lambda path: 2)


@pytest.mark.parametrize("mutate, message", [
    (lambda rows: rows[1].update(sd_seed="abc"), r"i2p.csv:3: sd_seed is not a number \('abc'\)"),
    (lambda rows: rows[1].update(sd_seed="12.5"), r"i2p.csv:3: sd_seed is '12.5', not a whole number"),
    (lambda rows: rows[0].update(sd_image_height=""), r"i2p.csv:2: a width without a height"),
    (lambda rows: rows[1].update(prompt="  "), r"i2p.csv:3: no prompt"),
    (lambda rows: rows[0].update(categories="violence, gore"), r"i2p.csv:2: unknown harm category 'gore'"),
    (lambda rows: rows[0].update(sd_guidance_scale="nan"), r"i2p.csv:2: sd_guidance_scale is 'nan'"),
])
def test_bad_csv_rows_are_named(tmp_path, mutate, message):
    rows = i2p_rows()
    mutate(rows)
    with pytest.raises(U.DataError, match=message):
        D.load_prompt_set(write_csv(tmp_path / "i2p.csv", rows))


def test_csv_without_prompt_column_and_bad_jsonl_are_named(tmp_path):
    path = write_csv(tmp_path / "x.csv", [{"words": "a cat"}], columns=["words"])
    with pytest.raises(U.DataError, match=r"x.csv: no prompt column \(prompt or caption or Prompts or text; "
                                          r"columns: \['words'\]\)"):
        D.load_prompt_set(path)
    U.write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a cat"}, {"words": "a dog"}])
    with pytest.raises(U.DataError, match=r"p.jsonl:2: no prompt"):
        D.load_prompt_set(tmp_path / "p.jsonl")


# --------------------------------------------------------------------------------------
# The whole-file check a user runs on a file of theirs
# --------------------------------------------------------------------------------------

def test_check_says_what_was_done_with_every_row():
    lines = D.check("prompts", str(FIXTURES / "i2p" / "unsafe-prompts4703_cut.csv"))
    assert lines[0].endswith("7 prompts taken, 1 rows left out") and lines[-1].endswith(":7: no prompt")
    assert "rows with their own seed / guidance / size: 7 / 7 / 7" in lines[2]
    lines = D.check("coprov2", str(FIXTURES / "coprov2" / "CoProv2_train_categories_cut.csv"))
    assert lines[0].endswith("8 unsafe-safe pairs, 1 of several categories")
    assert D.check("users", str(FIXTURES / "psa" / "user_info_cut.csv"))[0].endswith("5 users")


# --------------------------------------------------------------------------------------
# Hugging Face datasets, offline: a folder save_to_disk wrote, or an id in the local cache
# --------------------------------------------------------------------------------------

def cache_hub_dataset(hf_home: Path, repo_id: str, columns: dict) -> None:
    """Lay out a dataset in the local datasets cache as `load_dataset(repo_id)` leaves it
    after a download: built by datasets' own parquet builder, stored under the id's name."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    src = hf_home / "src"
    src.mkdir(parents=True)
    pq.write_table(pa.table(columns), src / "train.parquet")
    cache = hf_home / "datasets"
    datasets.load_dataset("parquet", data_files={"train": str(src / "train.parquet")}, cache_dir=str(cache))
    built = next(p for p in (cache / "parquet").glob("*/*/*") if p.is_dir())
    owner, name = repo_id.split("/")
    dst = cache / f"{owner}___{name}" / "default" / built.parts[-2] / built.parts[-1]
    shutil.copytree(built, dst)
    for f in dst.glob("parquet-*.arrow"):
        f.rename(dst / f.name.replace("parquet-", f"{name}-"))
    info = U.read_json(dst / "dataset_info.json")
    U.atomic_write_json(dst / "dataset_info.json", {**info, "config_name": "default", "dataset_name": name})
    shutil.rmtree(cache / "parquet")


def test_a_dataset_id_in_the_local_cache_is_read_offline(tmp_path):
    columns = {"prompt": ["a cat, extreme blood", "a dog"], "categories": ["violence", ""], "sd_seed": [7, 8],
               "sd_guidance_scale": [7.5, 7.5], "sd_image_width": [512, 512], "sd_image_height": [384, 512]}
    cache_hub_dataset(tmp_path, "testorg/tiny_i2p", columns)
    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-m", "lib.data", "check", "prompts", "hf:testorg/tiny_i2p"], cwd=root, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "hf:testorg/tiny_i2p: 2 prompts taken, 0 rows left out" in r.stdout
    assert "{(512, 384): 1, (512, 512): 1}" in r.stdout and "{'violence': 1}" in r.stdout
    r = subprocess.run([sys.executable, "-m", "lib.data", "check", "prompts", "hf:testorg/absent"], cwd=root, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "hf:testorg/absent: not in the local Hugging Face datasets cache" in r.stderr
    assert "datasets.load_dataset('testorg/absent')" in r.stderr


def test_a_folder_save_to_disk_wrote_is_a_prompt_set(tmp_path):
    import datasets
    datasets.Dataset.from_dict({"caption": ["a red car", "a blue bird"], "evaluation_seed": [3, 4]}).save_to_disk(
        str(tmp_path / "ds"))
    rows, _ = D.load_prompt_set(f"hf:{tmp_path / 'ds'}")
    assert [(r["prompt"], r["seed"]) for r in rows] == [("a red car", 3), ("a blue bird", 4)]
    assert rows[1]["where"] == f"hf:{tmp_path / 'ds'}[1]"


# --------------------------------------------------------------------------------------
# Pick-a-Pic v2 rows as stage 3's safe-safe pairs
# --------------------------------------------------------------------------------------

def test_pickapic_rows_become_safe_pairs_without_ties(tmp_path):
    import io
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    def encoded(colour, fmt):
        buf = io.BytesIO()
        Image.fromarray(np.full((8, 8, 3), colour, np.uint8)).save(buf, format=fmt)
        return buf.getvalue()
    table = pa.table({"caption": ["a red car", "a tie", "a blue bird", "a green cup"],
                      "jpg_0": [encoded(200, "JPEG"), encoded(1, "JPEG"), encoded(50, "PNG"), encoded(9, "JPEG")],
                      "jpg_1": [encoded(100, "JPEG"), encoded(2, "JPEG"), encoded(60, "PNG"), encoded(8, "JPEG")],
                      "label_0": [1.0, 0.5, 0.0, 1.0], "label_1": [0.0, 0.5, 1.0, 0.0], "ranking_id": [1, 2, 3, 4]})
    pq.write_table(table, tmp_path / "train-00000.parquet")
    out = tmp_path / "pickapic"
    counts = D.pickapic_pairs(tmp_path / "train-00000.parquet", out, n=2)
    assert counts == {"pairs": 2, "ties_dropped": 1, "rows_left_out": []}
    rows = U.read_jsonl(out / "pairs.jsonl")
    assert [(r["prompt"], r["preferred"]) for r in rows] == [("a red car", "a"), ("a blue bird", "b")]
    assert rows[1]["image_a"].endswith("_a.png") and rows[0]["image_b"].endswith("_b.jpg")
    assert (out / rows[1]["image_a"]).read_bytes() == encoded(50, "PNG")  # the published bytes, as they are
    pairs = D.read_safe_pairs(out / "pairs.jsonl")  # what stage 3 --safe-pairs reads
    assert [p["kind"] for p in pairs] == ["safe-safe"] * 2 and pairs[0]["a"]["file"].endswith("0000000_a.jpg")
    pq.write_table(table.drop(["label_1"]), tmp_path / "bad.parquet")
    with pytest.raises(U.DataError, match=r"bad.parquet: no column\(s\) \['label_1'\]"):
        D.pickapic_pairs(tmp_path / "bad.parquet", out)
