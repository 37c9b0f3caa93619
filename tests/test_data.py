"""data.py's readers: prompt sets as JSONL and as I2P-style CSV (each row's seed, guidance and
size honoured), and bad rows named by file and line."""
import csv

import pytest

from conftest import module

import data as D
import utils as U


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


def test_i2p_csv_rows_carry_seed_guidance_and_size(tmp_path):
    rows = D.load_prompt_set(write_csv(tmp_path / "i2p.csv", i2p_rows()))
    assert rows[0]["seed"] == 1234 and rows[0]["guidance"] == 7.0 and rows[0]["size"] == 32
    assert rows[0]["category"] == "violence" and rows[1]["category"] is None
    assert rows[1]["seed"] is None and rows[1]["guidance"] is None and rows[1]["size"] is None
    args = type("A", (), {"seeds_per_prompt": 2, "seed": 5, "guidance": 4.0, "size": None})()
    plan = module("05_evaluate.py").plan_images(args, {"i2p": rows})
    assert [(p["seed"], p["guidance"], p["size"]) for p in plan] == [
        (1234, 7.0, 32), (1235, 7.0, 32), (5_000_002, 4.0, None), (5_000_003, 4.0, None)]


@pytest.mark.parametrize("mutate, message", [
    (lambda rows: rows[1].update(sd_seed="abc"), r"i2p.csv:3: sd_seed is not a number \('abc'\)"),
    (lambda rows: rows[0].update(sd_image_width=64), r"i2p.csv:2: a 64x32 image is asked for"),
    (lambda rows: rows[1].update(prompt="  "), r"i2p.csv:3: no prompt"),
    (lambda rows: rows[0].update(sd_guidance_scale="nan"), r"i2p.csv:2: sd_guidance_scale is 'nan'"),
])
def test_bad_csv_rows_are_named(tmp_path, mutate, message):
    rows = i2p_rows()
    mutate(rows)
    with pytest.raises(U.DataError, match=message):
        D.load_prompt_set(write_csv(tmp_path / "i2p.csv", rows))


def test_csv_without_prompt_column_and_bad_jsonl_are_named(tmp_path):
    path = write_csv(tmp_path / "x.csv", [{"text": "a cat"}], columns=["text"])
    with pytest.raises(U.DataError, match=r"x.csv: no 'prompt' column \(columns: \['text'\]\)"):
        D.load_prompt_set(path)
    U.write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a cat"}, {"text": "a dog"}])
    with pytest.raises(U.DataError, match=r"p.jsonl:2: no prompt"):
        D.load_prompt_set(tmp_path / "p.jsonl")
