"""AlignGuard on the shared pipeline: Co-Merge on hand-made matrices, the LoRA file format,
the CoProV2 reader (good and bad rows), the category filter and the safe-wins objective,
and a --tiny run of the whole path (prompt-edited pairs, experts, all-single, merges that
stock diffusers loads to the weights the merge computed, per-category IP in stage 5)."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import module, stage, tiny_world_with_scm

from lib import data as D
from lib import models as M
from lib import stats
from lib import toyworld as W
from lib import utils as U
from systems import alignguard as AG


SPO = module("04_train_spo.py")


# --------------------------------------------------------------------------------------
# Co-Merge (common.expert_activity, common.co_merge) on hand-made matrices
# --------------------------------------------------------------------------------------

# Two rank-1 experts on a layer with 3 outputs and 2 inputs:
#   ΔW_1 = B_1 A_1 = [1, 0, 2]ᵀ [1, 0] = [[1, 0], [0, 0], [2, 0]]   (reads input 0)
#   ΔW_2 = B_2 A_2 = [0, 3, 1]ᵀ [0, 1] = [[0, 0], [0, 3], [0, 1]]   (reads input 1)
B1, A1 = torch.tensor([[1.0], [0.0], [2.0]]), torch.tensor([[1.0, 0.0]])
B2, A2 = torch.tensor([[0.0], [3.0], [1.0]]), torch.tensor([[0.0, 1.0]])
X = torch.tensor([[1.0, 1.0], [2.0, -1.0]])  # two inputs


def test_expert_activity_is_the_mean_absolute_output_change():
    # ΔW_1 x: (1, 0, 2) and (2, 0, 4) -> mean |.| = (1.5, 0, 3); ΔW_2 x: (0, 3, 1) and (0, -3, -1) -> (0, 3, 1)
    a = AG.expert_activity(X, [B1, B2], [A1, A2])
    assert torch.equal(a, torch.tensor([[1.5, 0.0, 3.0], [0.0, 3.0, 1.0]]))
    # inputs may come as [batch, tokens, in]: the mean is over all rows
    assert torch.equal(AG.expert_activity(X.reshape(1, 2, 2), [B1, B2], [A1, A2]), a)


def test_co_merge_keeps_each_output_units_most_active_expert_exactly():
    a = AG.expert_activity(X, [B1, B2], [A1, A2])
    up, down = AG.co_merge([B1, B2], [A1, A2], a)
    # rows 0 and 2 from expert 1 (1.5 > 0, 3 > 1), row 1 from expert 2 (3 > 0)
    assert up.shape == (3, 2) and down.shape == (2, 2)
    assert torch.equal(up @ down, torch.tensor([[1.0, 0.0], [0.0, 3.0], [2.0, 0.0]]))
    # not a sum: where both experts act (row 2), only the more active one's weights stay
    assert not torch.equal(up @ down, B1 @ A1 + B2 @ A2)
    # a tie goes to the lower index; the activity must be [experts, out]
    tie = AG.co_merge([B1, B2], [A1, A2], torch.ones(2, 3))
    assert torch.equal(tie[0] @ tie[1], B1 @ A1)
    with pytest.raises(ValueError, match="experts, out"):
        AG.co_merge([B1, B2], [A1, A2], torch.ones(3, 2))


def test_lora_files_round_trip_with_their_scale(tmp_path):
    """write_lora -> read_lora gives the factors back; a file with α ≠ r (stage 4's metadata)
    comes back with α/r folded into B."""
    from diffusers import StableDiffusionPipeline
    factors = {"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (torch.randn(6, 2), torch.randn(2, 5))}
    M.write_lora(tmp_path / "lora", factors)
    back = M.read_lora(tmp_path / "lora")
    assert set(back) == set(factors) and all(torch.equal(back[k][0], factors[k][0]) and
                                             torch.equal(back[k][1], factors[k][1]) for k in factors)
    (m, (b, a)), = factors.items()
    StableDiffusionPipeline.save_lora_weights(tmp_path / "scaled", unet_lora_layers={
        f"{m}.lora.down.weight": a, f"{m}.lora.up.weight": b}, unet_lora_adapter_metadata={"r": 2, "lora_alpha": 8})
    assert torch.allclose(M.read_lora(tmp_path / "scaled")[m][0], 4 * b)
    with pytest.raises(U.DataError, match="does not exist"):
        M.read_lora(tmp_path / "nowhere")


# --------------------------------------------------------------------------------------
# Data: the CoProV2 reader, the category filter, safe-wins
# --------------------------------------------------------------------------------------

def coprov2_csv(folder: Path, rows):
    """rows: (prompt, image, category); every image is written as a tiny PNG."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "CoProv2_train.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "image", "category"])
        for prompt, image, category in rows:
            w.writerow([prompt, image, category])
            if image:
                U.save_png(folder / image, np.zeros((8, 8, 3), np.uint8))
    return folder / "CoProv2_train.csv"


GOOD = [("a nude man", "images/u_idx_0_0.jpg", "sexual"), ("a man in a suit", "images/s_idx_0_0.jpg", "sexual"),
        ("a bloody fight", "images/u_idx_1_0.jpg", "Violence"), ("a boxing match", "images/s_idx_1_0.jpg", "Violence"),
        ("harassing her", "images/u_idx_2_0.jpg", "Harrasment"), ("greeting her", "images/s_idx_2_0.jpg", "Harrasment")]


def test_coprov2_reader_pairs_rows_by_image_key_in_any_order(tmp_path):
    pairs = D.read_coprov2(coprov2_csv(tmp_path, GOOD))
    swapped = D.read_coprov2(coprov2_csv(tmp_path / "swapped", [GOOD[1], GOOD[0], *GOOD[2:]]))
    assert [(p["a"]["prompt"], p["b"]["prompt"]) for p in swapped] == [(p["a"]["prompt"], p["b"]["prompt"])
                                                                       for p in pairs]
    assert [p["category"] for p in pairs] == ["sexual", "violence", "harassment"]  # I2P's names
    p = pairs[1]
    assert p["prompt"] == "a bloody fight" and p["kind"] == "harmful-safe" and p["judge"] is False
    assert (p["a"]["role"], p["b"]["role"]) == ("harmful", "safe") and p["b"]["prompt"] == "a boxing match"
    assert p["a"]["file"] == str(tmp_path / "images/u_idx_1_0.jpg") and Path(p["b"]["file"]).exists()


@pytest.mark.parametrize("edit, message", [
    (lambda rows: rows[:-1], ":6: idx_2_0.jpg has no safe row (s_idx_2_0.jpg)"),
    (lambda rows: [*rows[:2], (rows[2][0], rows[2][1], "gore"), *rows[3:]], ":4: unknown harm category 'gore'"),
    (lambda rows: [*rows[:4], ("", rows[4][1], rows[4][2]), *rows[5:]], ":6: needs a prompt and an image named u_"),
    (lambda rows: [*rows[:2], (rows[2][0], "images/x_idx_1_0.jpg", rows[2][2]), *rows[3:]],
     ":4: needs a prompt and an image named u_… (unsafe) or s_… (safe), got 'images/x_idx_1_0.jpg'"),
    (lambda rows: [*rows, ("a bloody brawl", "images/u_idx_1_0.jpg", "Violence")],
     ":8: u_idx_1_0.jpg is listed before with another prompt"),
])
def test_coprov2_bad_rows_are_named(tmp_path, edit, message):
    with pytest.raises(U.DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        D.read_coprov2(coprov2_csv(tmp_path, edit(list(GOOD))))


def test_coprov2_missing_image_and_columns_are_named(tmp_path):
    path = coprov2_csv(tmp_path, GOOD)
    (tmp_path / "images/s_idx_1_0.jpg").unlink()
    with pytest.raises(U.DataError, match=r":5: missing image .*s_idx_1_0.jpg"):
        D.read_coprov2(path)
    path.write_text("text,image\nx,y\n")
    with pytest.raises(U.DataError, match=r"no column\(s\) \['category', 'prompt'\]"):
        D.read_coprov2(path)


def side(role, quality, cost):
    return {"role": role, "quality": quality, "cost": cost, "file": f"{role}{quality}.png"}


def test_category_filter_and_safe_wins():
    pairs = [{"id": "0", "prompt": "x", "kind": "harmful-safe", "category": "sexual",
              "a": side("harmful", 22.0, -3.0), "b": side("safe", 21.0, 1.0)},  # the SCM got this one wrong
             {"id": "1", "prompt": "y", "kind": "harmful-safe", "category": "violence",
              "a": side("safe", 20.0, 0.0), "b": side("harmful", 23.0, 2.0)},
             {"id": "2", "prompt": "z", "kind": "safe-safe", "category": None,
              "a": side("safe", 20.0, 0.0), "b": side("safe", 21.0, 0.0)}]
    assert [p["id"] for p in AG.category_filter(pairs, ["violence"], Path("d.jsonl"))] == ["1"]
    assert AG.category_filter(pairs, None, Path("d.jsonl")) is pairs
    with pytest.raises(U.DataError, match=r"d.jsonl: no pairs of category \['hate'\].*\['sexual', 'violence'\]"):
        AG.category_filter(pairs, ["hate", "sexual"], Path("d.jsonl"))
    wins, dropped = SPO.preference_pairs(pairs, "safe-wins", lam=0.15, margin=0.0)
    assert [p["w"]["role"] for p in wins] == ["safe", "safe"] and dropped == 1  # safe-safe: a tie of roles
    by_cost, _ = SPO.preference_pairs(pairs, "safety", lam=0.15, margin=0.0)  # R = −C follows the SCM
    assert by_cost[0]["w"]["role"] == "harmful"


# --------------------------------------------------------------------------------------
# The whole path on the tiny world
# --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ag_run(tmp_path_factory):
    """Stage 0, an SCM written by save_scm (what stage 2 writes: AlignGuard needs no trained
    one), stage 3 with prompt-edited pairs beside the inpainted ones, two experts, all-single,
    T2I-SPO on both kinds of pairs, a Co-Merge and a peft merge, and stage 5."""
    run = tmp_path_factory.mktemp("run")
    tiny_world_with_scm(run)
    stage("03_build_hf.py", run)
    stage("03_build_hf.py", run, "--pairing", "prompt-edit", "--name", "coprov2", "--n-harmful-safe", "24",
          "--reuse-images", "hf")
    pairs = U.read_jsonl(run / "coprov2" / "hf_pairs.jsonl")
    counts = {}
    for p in pairs:
        if p["category"]:
            counts[p["category"]] = counts.get(p["category"], 0) + 1
    top = sorted(counts, key=lambda c: (-counts[c], c))[:2]
    lora = ["--data", "coprov2", "--objective", "safe-wins", "--lora-rank", "2", "--dfm", "off", "--lr", "1e-3",
            "--batch", "2"]
    experts = []
    for c in top:
        experts.append("expert_" + c.replace(" ", "_"))
        stage("-m systems.alignguard expert", run, *lora, "--categories", c, "--name", experts[-1])
    stage("04_train_spo.py", run, *lora, "--name", "all_single")
    stage("04_train_spo.py", run)
    stage("04_train_spo.py", run, "--data", "coprov2", "--name", "spo_promptedit")
    for method in ("comerge", "ties"):
        stage("-m systems.alignguard merge", run, "--merge-experts", *experts, "--merge-method", method)
    r = stage("05_evaluate.py", run)
    return run, pairs, top, experts, r


def test_prompt_edited_pairs_sample_the_safe_prompt_with_their_own_seed(ag_run):
    run, pairs, *_ = ag_run
    inpainted = {p["prompt"]: p for p in U.read_jsonl(run / "hf" / "hf_pairs.jsonl") if p["kind"] == "harmful-safe"}
    edited = [p for p in pairs if p["kind"] == "harmful-safe"]
    assert edited and all(p["b"]["source"] == "t2i" and p["b"]["seed"] != p["a"]["seed"] for p in edited)
    assert all(p["category"] in W.HARM for p in edited)
    p = next(p for p in edited if p["prompt"] in inpainted)
    q = inpainted[p["prompt"]]
    assert q["b"]["source"] == "img2img" and p["a"]["seed"] == q["a"]["seed"]  # the same harmful image
    assert np.array_equal(U.load_png(run / "coprov2" / p["a"]["path"]), U.load_png(run / "hf" / q["a"]["path"]))
    assert not np.array_equal(U.load_png(run / "coprov2" / p["b"]["path"]), U.load_png(run / "hf" / q["b"]["path"]))


def test_prompt_edited_build_copies_the_samples_it_shares_with_the_inpainted_one(ag_run):
    """--reuse-images hf: the harmful images hf/ kept and the sample of every safe-safe pair are
    copied from hf/ (the same prompt, seed and guidance), the rest are drawn."""
    run, pairs, *_ = ag_run
    key = lambda side: (side["prompt"], side["seed"], side["guidance"])
    held = {key(s): s["path"] for p in U.read_jsonl(run / "hf" / "hf_pairs.jsonl") for s in (p["a"], p["b"])
            if s["source"] == "t2i"}
    sides = [s for p in pairs for s in (p["a"], p["b"]) if s["source"] == "t2i"]
    copied = [s for s in sides if "copied_from" in s]
    assert all(s["copied_from"] == "hf/" + held[key(s)] for s in copied)
    assert all(key(s) not in held for s in sides if "copied_from" not in s)
    # a safe-safe pair's sample is copied; its other side is the world's own image, drawn again
    assert all("copied_from" in p["a"] and p["b"]["source"] == "world" for p in pairs if p["kind"] == "safe-safe")
    edited = [p for p in pairs if p["kind"] == "harmful-safe"]
    assert any("copied_from" in p["a"] for p in edited) and any("copied_from" not in p["a"] for p in edited)
    assert not any("copied_from" in p["b"] for p in edited)  # the safe image has a seed of its own
    assert json.loads((run / "coprov2" / "metrics.json").read_text())["images_copied"] == len(copied)
    for s in copied[:4]:
        assert np.array_equal(U.load_png(run / "coprov2" / s["path"]), U.load_png(run / s["copied_from"]))


def test_reuse_images_refuses_a_build_with_other_settings(ag_run):
    run, *_ = ag_run
    r = stage("03_build_hf.py", run, "--pairing", "prompt-edit", "--name", "coprov2_steps", "--reuse-images", "hf",
              "--sample-steps", "5", check=False)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "--reuse-images hf" in r.stderr and "sample_steps 4 there, 5 here" in r.stderr
    assert not (run / "coprov2_steps").exists()  # nothing written
    r = stage("03_build_hf.py", run, "--pairing", "prompt-edit", "--name", "coprov2_none", "--reuse-images", "nohf",
              check=False)
    assert r.returncode != 0 and "nohf/hf_pairs.jsonl" in r.stderr and "03_build_hf.py" in r.stderr


def test_experts_train_on_their_category_only(ag_run):
    run, pairs, top, experts, _ = ag_run
    for c, name in zip(top, experts):
        m = json.loads((run / name / "metrics.json").read_text())
        assert m["n_pairs"] == sum(p["category"] == c for p in pairs) and m["objective"] == "safe-wins"
        assert (run / name / "lora" / M.LORA_FILE).exists()
    m = json.loads((run / "all_single" / "metrics.json").read_text())
    assert m["n_pairs"] == sum(p["kind"] == "harmful-safe" for p in pairs) and m["pairs_dropped"] > 0  # safe-safe


def test_merged_lora_loads_in_stock_diffusers_to_the_computed_weights(ag_run):
    """pipe.load_lora_weights + fuse_lora on the base gives W + ΔW of the merge for every
    module; Co-Merge's ΔW rows each equal one expert's rows."""
    run, _, _, experts, _ = ag_run
    base = M.load_pipeline(run / "world" / "model")
    W0 = {k: v.clone() for k, v in base.unet.state_dict().items()}
    ex = [M.read_lora(run / e / "lora") for e in experts]
    for method in ("comerge", "ties"):
        out = run / "alignguard" / method
        merged = M.read_lora(out / "lora")
        pipe = M.load_pipeline(run / "world" / "model")
        pipe.load_lora_weights(out / "lora")
        pipe.fuse_lora()
        pipe.unload_lora_weights()  # the fused weights stay, the LoRA layers go
        fused = pipe.unet.state_dict()
        saved = M.load_pipeline(out / "model").unet.state_dict()
        for m, (b, a) in merged.items():
            key = m + ".weight"
            assert torch.allclose(fused[key], W0[key] + b @ a, atol=1e-6)
            assert torch.allclose(saved[key], fused[key], atol=1e-6)
            if method == "comerge":
                delta = b @ a
                for i in range(delta.shape[0]):  # each output unit is one expert's row
                    assert any(torch.allclose(delta[i], (e[m][0] @ e[m][1])[i], atol=1e-6) for e in ex)
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["method"] == method and metrics["experts"] == experts
        if method == "comerge":
            assert metrics["rank"] == 4 and sum(metrics["output_units_kept"].values()) > 0  # 2 experts × rank 2


def test_stage5_reports_ip_per_category_and_the_alignguard_claims(ag_run):
    run, _, top, experts, r = ag_run
    m = json.loads((run / "eval" / "metrics.json").read_text())
    names = {"base", "spo", "spo_promptedit", "all_single", "merge_comerge", "merge_ties", "alignguard", *experts}
    assert names <= set(m)
    for n in names:
        cats = m[n]["harmful"]["IP_by_category"]
        assert set(cats) == set(W.HARM) and all(v is None or 0 <= v <= 1 for v in cats.values())
        assert "IP_by_category" not in m[n]["benign"]
    assert m["alignguard"] == m["merge_comerge"]  # one model, the paper's row name
    section = json.loads((run / "eval" / "alignguard.json").read_text())
    assert set(section["experts"]) <= set(top)
    claims = {c["claim"]: c for c in section["claims"]}
    assert any("Co-Merge beats peft's ties" in c for c in claims) and any("Table 2" in c for c in claims)
    assert all(c["verdict"] in ("holds", "fails", "trade-off", "not separable") for c in claims.values())
    for pair in ("spo-alignguard", "spo-spo_promptedit", "alignguard-all_single", "merge_comerge-merge_ties"):
        assert set(section["intervals"][pair]) == {"harmful", "benign", "lookalike"}
    report, own = ((run / "eval" / f).read_text() for f in ("report.md", "alignguard.md"))
    assert "IP per harm category" in report and "sexual IP↓" in report and "[AlignGuard" in report
    assert "IP per harm category" in own and "Co-Merge beats" in own and "Co-Merge beats" not in report
    assert "illegal activity IP↓" in r.stdout  # the per-category table ends the console output


@pytest.mark.parametrize("parts, expected", [
    ([("holds", "holds"), ("not separable", "not worse")], "holds"),
    ([("holds", "holds"), ("fails", "not worse")], "trade-off"),
    ([("not separable", "holds"), ("fails", "not worse")], "fails"),
    ([("not separable", "holds"), ("holds", "not worse")], "not separable"),
    ([("fails", "holds")], "fails"),
])
def test_claim_verdict_combines_interval_verdicts(parts, expected):
    assert stats.claim_verdict(parts) == expected


def test_scalability_counts_erased_categories_and_judges_each_eraser():
    """20 violence and 20 hate prompts. The base draws harm on all; AlignGuard on none; UCE
    erases violence only. AlignGuard erases 2 of 2 categories, UCE 1; against UCE the merged
    experts are never worse (hate −1.0 [−1, −1] holds, violence 0 not separable) and the
    benign PS is equal: the claim holds."""
    from types import SimpleNamespace
    rows = []
    for model, ip in (("base", {"violence": 1, "hate": 1}), ("alignguard", {"violence": 0, "hate": 0}),
                      ("uce", {"violence": 0, "hate": 1})):
        for i in range(40):
            cat = "violence" if i < 20 else "hate"
            rows.append({"model": model, "set": "harmful", "row": i, "seed": i, "category": cat,
                         "inappropriate": bool(ip[cat]), "PS": 20.0, "SC": 0.0})
            rows.append({"model": model, "set": "benign", "row": i, "seed": i, "category": None,
                         "inappropriate": False, "PS": 21.0 + 0.01 * (i % 3), "SC": 0.0})
    metrics = {m: {"benign": {"PS": 21.01}} for m in ("base", "alignguard", "uce")}
    ev = SimpleNamespace(names=["base", "alignguard", "uce"], rows=rows, harmful=["harmful"], benign=["benign"],
                         metrics=metrics, args=SimpleNamespace(bootstrap=200, seed=0, ua_center=None))
    sc = AG.scalability(ev)
    assert sc["categories"] == ["harmful: hate", "harmful: violence"]
    assert sc["erased"] == {"alignguard": ["harmful: hate", "harmful: violence"], "uce": ["harmful: violence"]}
    (claim,) = sc["claims"]
    assert claim["verdict"] == "holds" and claim["parts"][0]["diff"] == -1.0
    text = "\n".join(AG.scalability_lines(sc, metrics, ["harmful"], ["benign"]))
    assert "| alignguard | 2 of 2: hate, violence | 21.010 |" in text and "| uce | 1 of 2: violence | 21.010 |" in text
    assert AG.scalability(SimpleNamespace(**(ev.__dict__ | {"names": ["base", "alignguard"]}))) is None  # no eraser built
