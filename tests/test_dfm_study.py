"""The DFM study (systems/dfm_study.py): its runs on a pair subset with a smaller augmentation pool,
and the study read from finished runs: pairing by seed, the pool sweep, refusing runs that
differ in more than the seed and the pool."""
from pathlib import Path

import numpy as np
import pytest

import common as C
from lib import utils as U
from systems import dfm_study as DS


def fake_dfm_run(run: Path, name: str, seed: int, pool: int, losses: list[float], hard=0, pairs=8, tau=0.2):
    """A finished stage-4 run of `make dfm`, as 04_train_spo.py lays it out (config, log, metrics)."""
    d = run / "dfm" / name
    cfg = {"preset": "toy", "objective": "spo", "lam": 0.15, "pair_subset": pairs, "steps": len(losses), "batch": 4,
           "lr": 5e-5, "warmup": 2, "dfm_k": 5, "dfm_tau": tau, "dfm_patience": 2, "seed": seed, "dfm": "on" if pool else "off",
           "dfm_augmentations": list(C.AUGMENTATIONS[:pool])}
    U.atomic_write_json(d / "config.json", cfg)
    rows = [{"step": i + 1, "loss": x, "dfm_hard": hard if pool else 0,
             **({"dfm_hard_loss": x + 0.1, "dfm_copy_loss": x + 0.2} if pool and hard else {})}
            for i, x in enumerate(losses)]
    U.write_jsonl(d / "log.jsonl", rows)
    tail = losses[-max(1, len(losses) // 10):]
    wins = dict.fromkeys(C.AUGMENTATIONS, 0)
    if pool:
        wins[C.AUGMENTATIONS[0]] = hard * len(losses)
    U.atomic_write_json(d / "metrics.json", {
        "final_loss": float(np.mean(tail)), "n_pairs": pairs, "aug_wins": wins, "dfm_pairs_flagged": pairs // 2 if pool else 0,
        "dfm_flagged_by_kind": {"safe-safe": hard * len(losses)} if pool else {}})
    return d


def test_dfm_study_pairs_each_seed_and_sweeps_the_pool(tmp_path):
    """On − off per seed: final-loss differences −0.1, −0.2, −0.3 (mean −0.2, sd 0.1): the
    interval [−0.448, +0.048] reaches 0, so "not separable"; mean losses −0.1 apart on every
    seed: "holds". The pool sweep averages over seed 0 only, the seed every size has."""
    ten = lambda a, b: list(np.linspace(a, b, 10))
    for s, shift in enumerate((0.1, 0.2, 0.3)):
        fake_dfm_run(tmp_path, f"off_seed{s}", s, 0, ten(0.7, 0.4))
        on = ten(0.6, 0.3)
        on[-1] = 0.4 - shift  # the last tenth of 10 steps is the last step
        fake_dfm_run(tmp_path, f"on_seed{s}", s, 4, on, hard=2)
    fake_dfm_run(tmp_path, "pool1_seed0", 0, 1, ten(0.65, 0.35), hard=1)
    for s, shift in enumerate((0.04, 0.05, 0.06)):  # τ = 0.5: mean loss 0.55 − shift − 0.55 off
        fake_dfm_run(tmp_path, f"tau0.5_seed{s}", s, 4, ten(0.7 - shift, 0.4 - shift), tau=0.5)
    st = DS.dfm_study(tmp_path)
    fl, ml = st["final_loss"], st["mean_loss"]
    assert st["seeds"] == [0, 1, 2] and fl["off"]["mean"] == pytest.approx(0.4)
    assert fl["on-off"]["diff"] == pytest.approx(-0.2) and fl["on-off"]["verdict"] == "not separable"
    assert fl["on-off"]["lo"] == pytest.approx(-0.2 - 4.303 * 0.1 / np.sqrt(3))
    assert ml["on-off"]["verdict"] == "holds" and ml["on-off"]["hi"] < 0
    assert set(st["pool"]) == {"0", "1", "4"} and all(v["seeds"] == [0] for v in st["pool"].values())
    assert st["pool"]["1"]["mean_loss"] == pytest.approx(0.5)
    # the τ sweep: τ = 0.5 lowers the mean loss by 0.04, 0.05, 0.06 on seeds 0-2 (t interval
    # −0.05 ± 4.303·0.01/√3); the reference τ = 0.2 (the preset's) is the on/off comparison's
    tau = st["tau"]
    assert set(tau) == {"0.2", "0.5", "off"} and st["settings"]["dfm_tau"] == 0.2
    assert tau["0.5"]["mean_loss"]["mean"] == pytest.approx(0.5) and tau["off"]["mean_loss"]["mean"] == pytest.approx(0.55)
    c = tau["0.5"]["mean_loss"]["on-off"]
    assert c["diff"] == pytest.approx(-0.05) and c["hi"] == pytest.approx(-0.05 + 4.303 * 0.01 / np.sqrt(3))
    assert c["verdict"] == "holds" and tau["0.2"]["mean_loss"]["on-off"]["verdict"] == "holds"
    assert "| 0.5 | 0, 1, 2 | 0.5000 ± 0.0100 | -0.0500 [" in DS.tau_table(tau)
    w = st["why"]  # 2 of every batch of 4 flagged, losses +0.1 and +0.2 above the batch's
    assert w["flagged_share_per_step"] == 0.5 and w["pairs_ever_flagged"] == 0.5
    assert w["flagged_loss"] - w["batch_loss"] == pytest.approx(0.1) and w["copy_loss"] - w["batch_loss"] == pytest.approx(0.2)
    assert w["aug_wins"]["sharpen"] == 60 and w["flagged_by_kind"] == {"safe-safe": 60}
    text = "\n".join(DS.dfm_sentences(st))
    assert "lowers the final training loss: **not separable**" in text and "converges faster" in text
    assert "flagged 50% of each batch" in text
    DS.plot_dfm_study(st, tmp_path / "fig.png")
    assert (tmp_path / "fig.png").stat().st_size > 1000


def test_dfm_study_refuses_runs_with_other_settings(tmp_path):
    fake_dfm_run(tmp_path, "off_seed0", 0, 0, [0.7, 0.6])
    fake_dfm_run(tmp_path, "on_seed0", 0, 4, [0.7, 0.5, 0.4])  # 3 steps, not 2
    with pytest.raises(U.DataError, match=r"differ in \['steps'\]"):
        DS.dfm_study(tmp_path)
    assert DS.dfm_study(tmp_path / "elsewhere") is None  # no DIR/dfm: no study
