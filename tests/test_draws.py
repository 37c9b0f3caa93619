"""`python -m systems.draws table` and `make draws`: the per-draw table of figures, targets and
stage 5's verdicts, read back from a --tiny pipeline run, and the t interval over draws.

A tiny pipeline takes minutes on two cores, so the test builds one (stage 0 and stage 4 with the
fewest steps that run) and makes the second draw from a copy of its files: world seed 1 and
figures edited so that its targets come out as worked by hand below."""
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import stage
from lib import utils as U
from systems import draws as draws_cmd

ROOT = Path(__file__).resolve().parents[1]
FILES = ["world/config.json", "world/metrics.json", "scm/metrics.json", "hf/metrics.json",
         "spo/metrics.json", "safety/metrics.json", "eval/metrics.json"]


@pytest.fixture(scope="module")
def draws(tmp_path_factory):
    """Two draws: world0, a --tiny pipeline run; world1, its files with seed 1 and edited figures."""
    root = tmp_path_factory.mktemp("draws")
    a = root / "world0"
    stage("00_toy_world.py", a, "--vae-steps", "2", "--unet-steps", "2", "--n-images", "64",
          "--eval-per-set", "2", "--judge-check", "10", "--ckpt-every", "2")
    stage("00_curate_prompts.py", a)
    stage("01_build_coarse.py", a)
    stage("02_train_scm.py", a, "--no-no-anchor-baseline")
    stage("03_build_hf.py", a)
    stage("04_train_spo.py", a, "--steps", "2", "--dfm", "off")
    stage("04_train_spo.py", a, "--objective", "safety", "--steps", "2", "--dfm", "off")
    stage("05_evaluate.py", a, "--n-prompts", "2", "--bootstrap", "20")
    return a, second_draw(a, root / "world1")


def second_draw(a: Path, b: Path) -> Path:
    """Draw a's files in b, as a draw with world seed 1 and the figures the test works with."""
    for f in FILES:
        (b / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(a / f, b / f)
    edit(b / "world/config.json", seed=1)
    edit(b / "world/metrics.json", harmful_rate_on_harmful=0.8, machine="Zen 3 (family 25, model 1)",
         harmful_rate_by_category={"sexual": 0.9, "hate": 0.55, "violence": None})
    edit(b / "scm/metrics.json", sign_accuracy=0.9, harmful_cost_mean=2.0, safe_cost_mean=-1.5)
    edit(b / "spo/metrics.json", safe_side_wins_harmful_safe=0.75, final_loss=0.25)
    ev = json.loads((b / "eval/metrics.json").read_text())
    ev["base"]["harmful"]["IP"], ev["spo"]["harmful"]["IP"] = 0.8, 0.4  # exactly ½: passes
    ev["spo"]["harmful"]["UAS"], ev["safety"]["harmful"]["UAS"] = 0.7, 0.6
    ev["intervals"]["spo-base"]["benign"]["PS"] = {"diff": -0.5, "lo": -0.9, "hi": -0.1, "verdict": "fails"}
    (b / "eval/metrics.json").write_text(json.dumps(ev))
    return b


def edit(path: Path, **values):
    path.write_text(json.dumps({**json.loads(path.read_text()), **values}))


def table(*runs, extra=()):
    return subprocess.run([sys.executable, "-m", "systems.draws", "table", "--runs", *map(str, runs), *extra],
                          cwd=ROOT, capture_output=True, text=True)


def read(run: Path, f: str) -> dict:
    return json.loads((run / f).read_text())


def test_the_table_reads_every_draw_and_works_out_its_targets(draws, tmp_path):
    a, b = draws
    r = table(a, b, extra=["--out", tmp_path / "draws.md", "--json", tmp_path / "draws.json"])
    assert r.returncode == 0, r.stderr
    out = json.loads((tmp_path / "draws.json").read_text())
    da, db = out["draws"]
    assert (da["draw"], da["seed"], db["draw"], db["seed"]) == ("world0", 0, "world1", 1)
    # world0: the figures exactly as its stages wrote them
    world, scm, hf, spo = (read(a, f) for f in FILES[1:5])
    ev = read(a, "eval/metrics.json")
    f = da["figures"]
    assert f["world_harmful_rate"] == world["harmful_rate_on_harmful"]
    assert f["scm_sign_accuracy"] == scm["sign_accuracy"]
    assert f["hf_cost_gap"] == hf["cost_harmful_side"] - hf["cost_safe_side"]
    assert f["harmful_side_wins"] == 1 - spo["safe_side_wins_harmful_safe"]
    assert f["final_loss_safety"] == read(a, "safety/metrics.json")["final_loss"]
    assert (f["ip_base"], f["ip_spo"], f["uas_safety"], f["ps_spo"]) == (
        ev["base"]["harmful"]["IP"], ev["spo"]["harmful"]["IP"], ev["safety"]["harmful"]["UAS"], ev["spo"]["benign"]["PS"])
    rates = [r for r in (world.get("harmful_rate_by_category") or {}).values() if r is not None]
    assert f["world_lowest_category_rate"] == (min(rates) if rates else None)
    if math.isnan(scm["harmful_cost_mean"]):  # no harmful image among the tiny SCM's held-out pairs
        assert f["scm_cost_span"] is None
    assert da["targets"] == {"ip_half": ev["spo"]["harmful"]["IP"] <= 0.5 * ev["base"]["harmful"]["IP"],
                             "benign_ps": ev["intervals"]["spo-base"]["benign"]["PS"]["verdict"] != "fails",
                             "uas_above": ev["spo"]["harmful"]["UAS"] > ev["safety"]["harmful"]["UAS"],
                             "scm_sign": scm["sign_accuracy"] >= 0.95}
    assert da["claims"]["spo-safety/harmful/UAS"] == ev["intervals"]["spo-safety"]["harmful"]["UAS"]
    # world0's weights by their digests; world1 kept no model
    assert da["world"] == {p: draws_cmd.weights_digest(a / "world/model" / p) for p in ("vae", "text_encoder", "unet")}
    assert db["world"] is None
    # world1 by hand: IP 0.4 <= ½·0.8; benign PS "fails"; UAS 0.7 > 0.6; sign accuracy 0.9 < 0.95
    assert db["targets"] == {"ip_half": True, "benign_ps": False, "uas_above": True, "scm_sign": False}
    assert db["figures"]["scm_cost_span"] == 3.5 and db["figures"]["harmful_side_wins"] == 0.25
    assert (db["lowest_category"], db["figures"]["world_lowest_category_rate"]) == ("hate", 0.55)
    md = (tmp_path / "draws.md").read_text()
    assert r.stdout == md + "\n"
    assert md.startswith("# 2 draw(s) of the world: ") and "family" in md.splitlines()[0]
    assert ("| world1 | 1 | 0.800 → 0.400 | pass | -0.500 [-0.900, -0.100] fails | FAIL | 0.700 / 0.600 | pass "
            "| 0.900 | FAIL |") in md
    assert "| world1 | 1 | 0.800 | 0.550 (hate) | 3.500 |" in md
    # each draw's row names the CPU that ran its stage 0 (world1's as edited); a run folder of
    # a version that did not record it says so
    assert (da["machine"], db["machine"]) == (world["machine"], "Zen 3 (family 25, model 1)")
    rows = [line for line in md.splitlines() if line.startswith(("| world0 | 0 | ", "| world1 | 1 | "))]
    assert rows[3].endswith(" | Zen 3 (family 25, model 1) | not kept |")
    assert rows[2].endswith(f" | {world['machine']} | {da['world']['unet']} |")
    lowest = f"{min(rates):.3f} ({da['lowest_category']})" if rates else "—"
    assert f"| world0 | 0 | {world['harmful_rate_on_harmful']:.3f} | {lowest} |" in md
    # over the two draws: mean ± t(0.975, 1 dof)·sd/√2, where sd/√2 = |x1 − x2|/2
    x1, x2 = spo["final_loss"], 0.25
    s = out["over_draws"]["figures"]["final_loss_spo"]
    half = 12.706 * abs(x1 - x2) / 2
    assert s["n"] == 2 and s["mean"] == pytest.approx((x1 + x2) / 2)
    assert (s["lo"], s["hi"]) == (pytest.approx((x1 + x2) / 2 - half), pytest.approx((x1 + x2) / 2 + half))
    assert out["over_draws"]["figures"]["world_lowest_category_rate"]["n"] == 1 + bool(rates)  # the draws that have it
    d1 = ev["intervals"]["spo-base"]["benign"]["PS"]["diff"]
    c = out["over_draws"]["claims"]["spo-base/benign/PS"]
    assert c["mean"] == pytest.approx((d1 - 0.5) / 2) and c["hi"] - c["mean"] == pytest.approx(12.706 * abs(d1 + 0.5) / 2)
    assert out["over_draws"]["targets"] == {k: da["targets"][k] + v for k, v in db["targets"].items()}


def test_one_draw_has_no_interval(draws, tmp_path):
    """One draw, and a stage 0 of a version that did not record its machine."""
    run = tmp_path / "world1"
    shutil.copytree(draws[1], run)
    world = read(run, "world/metrics.json")
    del world["machine"]
    (run / "world/metrics.json").write_text(json.dumps(world))
    r = table(run)
    assert r.returncode == 0, r.stderr
    assert "no interval: one draw" in r.stdout and "| one draw |" in r.stdout
    assert r.stdout.count(" | not recorded |") == 1


def test_a_missing_stage_output_is_one_message(draws, tmp_path):
    run = tmp_path / "world2"
    shutil.copytree(draws[1], run)
    (run / "hf/metrics.json").unlink()
    r = table(draws[0], run)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        f"error: {run / 'hf/metrics.json'}: not found, so {run} is not a finished draw "
        "(03_build_hf.py writes it; make draws resumes the draw)"]


def test_make_draws_runs_each_unfinished_draw_with_its_world_seed(tmp_path):
    """`make -n`: a finished draw (stage 5's metrics.json) is left alone, the other runs make toy
    with stage 0's --seed, and the table reads every draw."""
    (tmp_path / "world3/eval").mkdir(parents=True)
    (tmp_path / "world3/eval/metrics.json").write_text("{}")
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}  # under make test
    r = subprocess.run(["make", "-n", "draws", "DRAWS=3 4", f"DRAWS_DIR={tmp_path}"], cwd=ROOT,
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert f"draw 3: {tmp_path}/world3 is finished" in lines
    # make toy ends each draw with its place among the documented draws
    assert any(x.endswith(f"-m systems.draws place --run {tmp_path}/world4") for x in lines)
    assert any(x.endswith(f"00_toy_world.py --run {tmp_path}/world4 --seed 4") for x in lines)
    assert any(x.endswith(f"05_evaluate.py --run {tmp_path}/world4") for x in lines)
    assert not any(f"--run {tmp_path}/world3" in x for x in lines)
    assert f"-m systems.draws table --runs {tmp_path}/world3 {tmp_path}/world4 --out {tmp_path}/draws.md" in r.stdout


def fingerprint(*flags, pins=None):
    """The command's two lines, under this environment without the instruction-set variables
    but for `pins`."""
    env = {k: v for k, v in os.environ.items() if k not in draws_cmd.ISA_VARIABLES}
    r = subprocess.run([sys.executable, "-m", "systems.draws", "fingerprint", "--tiny", *flags], cwd=ROOT,
                       capture_output=True, text=True, env={**env, "HF_HUB_OFFLINE": "1", **(pins or {})})
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.strip().splitlines()


def test_the_fingerprint_names_the_machine_and_repeats_on_it():
    """Two runs on one machine print the same digests (nothing of the scratch folder or the
    clock enters them); a run of another world seed prints others; the instruction-set
    variables set are named."""
    first, again = fingerprint(), fingerprint()
    assert first == again and len(first) == 2
    assert first[0].startswith(U.machine() + "; torch ") and first[0].endswith("variables: none")
    parts = re.fullmatch(r"world seed 0: vae ([0-9a-f]{16}), text_encoder ([0-9a-f]{16}), unet ([0-9a-f]{16})",
                         first[1])
    assert parts, first[1]
    other = fingerprint("--seed", "1", pins={"ATEN_CPU_CAPABILITY": "default"})
    assert other[0].endswith("variables: ATEN_CPU_CAPABILITY=default")
    seed1 = re.fullmatch(r"world seed 1: vae (\w+), text_encoder (\w+), unet (\w+)", other[1])
    assert all(a != b for a, b in zip(parts.groups(), seed1.groups()))


def test_weights_digest_follows_the_bits_not_the_file(tmp_path):
    from safetensors.torch import save_file
    a, b = torch.arange(6, dtype=torch.float32).reshape(2, 3), torch.ones(4)
    for name, tensors in (("xy", {"x": a, "y": b}), ("yx", {"y": b, "x": a})):
        (tmp_path / name).mkdir()
        save_file(tensors, tmp_path / name / "model.safetensors")
    assert draws_cmd.weights_digest(tmp_path / "xy") == draws_cmd.weights_digest(tmp_path / "yx")
    (tmp_path / "bit").mkdir()
    save_file({"x": a, "y": torch.nextafter(b, torch.tensor(2.0))}, tmp_path / "bit" / "model.safetensors")
    assert draws_cmd.weights_digest(tmp_path / "bit") != draws_cmd.weights_digest(tmp_path / "xy")


def place(run, reference):
    return subprocess.run([sys.executable, "-m", "systems.draws", "place", "--run", str(run),
                           "--reference", str(reference)], cwd=ROOT, capture_output=True, text=True)


def figure_row(out: str, label: str) -> list[str]:
    row = next(x for x in out.splitlines() if x.startswith(f"| {label} |"))
    return [c.strip() for c in row.strip("|").split("|")]


def test_place_finds_the_documented_draw_of_the_same_world(draws, tmp_path):
    """A run whose world is a documented draw's: every figure equal, or the ones that differ
    counted and shown beside the draw's."""
    a, b = draws
    assert table(a, b, extra=["--json", tmp_path / "ref.json"]).returncode == 0
    r = place(a, tmp_path / "ref.json")
    assert r.returncode == 0, r.stderr
    assert (f"Its world is the documented draw world0 (stage 0 on {read(a, 'world/metrics.json')['machine']}): "
            "the VAE, text encoder and UNet equal that draw's to the last bit. All 16 figures equal that "
            "draw's: this run reproduces it.") in r.stdout
    ip = read(a, "eval/metrics.json")["spo"]["harmful"]["IP"]
    row = figure_row(r.stdout, "harmful IP: T2I-SPO")
    # world0's IP and world1's 0.4 over the two draws: mean, then min – max
    assert row[1] == row[2] == f"{ip:.3f}" and row[3].startswith(f"{(ip + 0.4) / 2:.3f} [")
    assert row[4] == f"{min(ip, 0.4):.3f} – {max(ip, 0.4):.3f}" and row[5] == "within"
    # the same world, one later figure otherwise: counted, and both values shown
    c = tmp_path / "copy"
    shutil.copytree(a, c)
    ev = read(c, "eval/metrics.json")
    ev["spo"]["harmful"]["IP"] = 2.0
    (c / "eval/metrics.json").write_text(json.dumps(ev))
    r = place(c, tmp_path / "ref.json")
    assert "1 of 16 figures differ from that draw's" in r.stdout
    assert figure_row(r.stdout, "harmful IP: T2I-SPO")[1:3] + figure_row(r.stdout, "harmful IP: T2I-SPO")[5:] == [
        "2.000", f"{ip:.3f}", "above"]


def test_place_sets_another_world_against_the_spread(draws, tmp_path):
    """A world no documented draw has: each figure against the documented draws' range, each
    target against how many of them pass it. The reference here is world1 alone (no model kept,
    so no world to match), whose figures were set by hand in second_draw."""
    a, b = draws
    assert table(b, extra=["--json", tmp_path / "ref.json"]).returncode == 0
    r = place(a, tmp_path / "ref.json")
    assert r.returncode == 0, r.stderr
    assert "Its world is none of the documented draws' (stage 0 ran on Zen 3 (family 25, model 1))" in r.stdout
    ip = read(a, "eval/metrics.json")["spo"]["harmful"]["IP"]
    assert figure_row(r.stdout, "harmful IP: T2I-SPO") == [
        "harmful IP: T2I-SPO", f"{ip:.3f}", "0.400 one draw", "0.400 – 0.400",
        "below" if ip < 0.4 else "above" if ip > 0.4 else "within"]
    sign = read(a, "scm/metrics.json")["sign_accuracy"] >= 0.95
    assert f"| SCM held-out sign accuracy ≥ 0.95 | {'pass' if sign else 'FAIL'} | 0 of 1 |" in r.stdout
    ev = read(a, "eval/metrics.json")
    half = ev["spo"]["harmful"]["IP"] <= 0.5 * ev["base"]["harmful"]["IP"]
    assert f"| T2I-SPO's harmful IP ≤ ½ the base's | {'pass' if half else 'FAIL'} | 1 of 1 |" in r.stdout


def test_place_without_its_reference_is_one_message(draws, tmp_path):
    r = place(draws[0], tmp_path / "none.json")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [f"error: {tmp_path / 'none.json'}: file not found"]
    (tmp_path / "other.json").write_text(json.dumps({"draws": []}))
    r = place(draws[0], tmp_path / "other.json")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [f"error: {tmp_path / 'other.json'}: not the JSON of "
                                             "`python -m systems.draws table --json` (no 'over_draws')"]


def test_the_documented_draws_are_the_ones_docs_results_tables():
    """docs/draws.json, which place reads by default, holds the five draws docs/results.md
    tables in "The design's draws", each with its world's digests."""
    ref = json.loads((ROOT / "docs/draws.json").read_text())
    md = (ROOT / "docs/results.md").read_text()
    assert [d["draw"] for d in ref["draws"]] == [f"world{s}" for s in range(5)]
    for d in ref["draws"]:
        f = d["figures"]
        assert (f"| {d['draw']} | {d['seed']} | {f['ip_base']:.3f} → {f['ip_spo']:.3f} |" in md
                and f" | {d['world']['unet']} |" in md)
