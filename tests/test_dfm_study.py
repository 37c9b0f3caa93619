"""The DFM study (systems/dfm_study.py): its runs on a pair subset with a smaller augmentation pool,
and the study read from finished runs: pairing by seed, the pool sweep, the readings of Eq. 10
with their held-out accuracy, refusing runs that differ in more than the seed, pool, τ and
reading; and the signal-to-noise figures of the signal command, by hand."""
from pathlib import Path

import numpy as np
import pytest

import torch

import common as C
from lib import utils as U
from systems import dfm_study as DS


def fake_dfm_run(run: Path, name: str, seed: int, pool: int, losses: list[float], hard=0, pairs=8, tau=0.2,
                 reading="loss", heldout=None):
    """A finished stage-4 run of `make dfm`, as 04_train_spo.py lays it out (config, log, metrics,
    and the study's heldout.json when `heldout` gives its accuracy)."""
    d = run / "dfm" / name
    cfg = {"preset": "toy", "objective": "spo", "lam": 0.15, "pair_subset": pairs, "steps": len(losses), "batch": 4,
           "lr": 5e-5, "warmup": 2, "dfm_k": 5, "dfm_tau": tau, "dfm_patience": 2, "seed": seed, "dfm": "on" if pool else "off",
           "dfm_augmentations": list(C.AUGMENTATIONS[:pool]), "dfm_reading": reading}
    U.atomic_write_json(d / "config.json", cfg)
    if heldout is not None:
        U.atomic_write_json(d / "heldout.json", {"heldout_implicit_accuracy": heldout, "heldout_loss": 0.6})
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


def test_dfm_study_judges_each_reading_against_off_and_the_papers_reading(tmp_path):
    """Seeds 1-3, mean loss 0.55 off; the paper's reading 0.56 (+0.01 on every seed: an interval
    of no width, which judges nothing, "no spread"); the probe
    0.54 − 0.01·s (−0.02, −0.03, −0.04: interval −0.03 ± 4.303·0.01/√3, "holds"). Held-out
    accuracy: off 0.5, loss 0.5, probe 0.52, 0.53, 0.54 (on − off +0.03 ± 4.303·0.01/√3:
    higher is better, "holds"). The probe runs stay out of the on/off claim and the τ sweep."""
    ten = lambda a, b: list(np.linspace(a, b, 10))
    for s in (1, 2, 3):
        fake_dfm_run(tmp_path, f"off_seed{s}", s, 0, ten(0.7, 0.4), heldout=0.5)
        fake_dfm_run(tmp_path, f"on_seed{s}", s, 4, ten(0.71, 0.41), heldout=0.5)
        fake_dfm_run(tmp_path, f"probe_seed{s}", s, 4, ten(0.69 - 0.01 * s, 0.39 - 0.01 * s), reading="probe",
                     heldout=0.51 + 0.01 * s)
    st = DS.dfm_study(tmp_path)
    assert st["mean_loss"]["on-off"]["diff"] == pytest.approx(0.01) and st["mean_loss"]["on-off"]["verdict"] == "no spread"
    assert set(st["tau"]) == {"0.2", "off"} and st["tau"]["0.2"]["mean_loss"]["mean"] == pytest.approx(0.56)
    assert st["heldout_accuracy"]["on-off"]["diff"] == pytest.approx(0.0)
    probe, loss = st["reading"]["probe"], st["reading"]["loss"]
    assert list(st["reading"]) == ["loss", "probe"] and probe["seeds"] == [1, 2, 3] and loss["mean_loss"]["vs loss"] is None
    c = probe["mean_loss"]["on-off"]
    assert c["diff"] == pytest.approx(-0.03) and c["hi"] == pytest.approx(-0.03 + 4.303 * 0.01 / np.sqrt(3))
    assert c["verdict"] == "holds" and probe["mean_loss"]["vs loss"]["diff"] == pytest.approx(-0.04)
    h = probe["heldout_accuracy"]["on-off"]
    assert h["diff"] == pytest.approx(0.03) and h["lo"] == pytest.approx(0.03 - 4.303 * 0.01 / np.sqrt(3))
    assert h["verdict"] == "holds" and probe["heldout_accuracy"]["mean"] == pytest.approx(0.53)
    table = DS.reading_table(st["reading"])
    assert "| probe | 1, 2, 3 | mean loss | 0.5200 ± 0.0100 | -0.0300 [-0.0548, -0.0052] holds | -0.0400 [" in table
    DS.plot_dfm_study(st, tmp_path / "fig.png")
    assert (tmp_path / "fig.png").stat().st_size > 1000


def test_fixed_weight_snr_by_hand():
    """Two pairs, two draws each, at a queue's first and last visit. Pair 0: 1.0, 0.6 then
    0.8, 0.4: δ = 0.2; two independent draws: noise √(0.08 + 0.08) = 0.4 (var of (1.0, 0.6) is
    0.08), SNR 0.5; the probe keeps one draw: changes 0.2, 0.2, sd 0, SNR huge. Pair 1: 0.5, 0.5
    then 0.6, 0.4: δ = 0, noise √(0 + 0.02). v̄ of a batch of 2: signal 0.1, noise
    √((0.16 + 0.02)/2/2) = 0.2121, SNR 0.4714, P(v̄ ≤ 0) = Φ(−0.4714) = 0.3187. Reliability:
    var(δ) = 0.02 over 0.02 + mean noise² 0.09."""
    before, after = torch.tensor([[1.0, 0.6], [0.5, 0.5]]), torch.tensor([[0.8, 0.4], [0.6, 0.4]])
    f = DS.fixed_weight_snr(before, after, same_draw=False, batch=2)
    assert f["delta"] == pytest.approx([0.2, 0.0]) and f["noise_sd"] == pytest.approx([0.4, np.sqrt(0.02)])
    assert f["pair_snr"] == pytest.approx([0.5, 0.0], abs=1e-6) and f["v_bar_snr"] == pytest.approx(0.1 / np.sqrt(0.045))
    assert f["v_bar_nonpositive_model"] == pytest.approx(0.3187, abs=1e-4)
    assert f["reliability"] == pytest.approx(0.02 / 0.11) and f["visit_sd"] == pytest.approx(np.sqrt(0.08) / 2)
    p = DS.fixed_weight_snr(before, after, same_draw=True, batch=2)
    assert p["noise_sd"][0] == pytest.approx(0.0, abs=1e-7) and p["pair_snr"][0] > 1e3 and p["visit_sd"] == 0.0


def test_reading_tables_normalise_by_the_mean_loss_at_t():
    """Bins of 50 timesteps: bin 0 holds 0.2, 0.4 (mean 0.3), bin 1 holds 0.8 (mean 0.8); Ē =
    0.55, so 0.2 → 0.2·0.55/0.3, 0.8 → 0.55. The probe's and the loss's tables are the losses."""
    loss, t = torch.tensor([[0.2, 0.8], [0.4, 0.8]]), torch.tensor([[10, 60], [49, 99]])
    tab = DS.reading_tables(loss, t, 100, bins=2)
    assert tab["normalised"].flatten().tolist() == pytest.approx([0.2 * 0.55 / 0.3, 0.55, 0.4 * 0.55 / 0.3, 0.55])
    assert torch.equal(tab["probe"], loss) and torch.equal(tab["loss"], loss)


def test_flag_figures_by_hand():
    """Five visits with a full queue, three slow and two of them flagged. Pair 0 is slow at
    steps 1 and 2, not at 3; pair 1 slow at step 1, not at 2: of the three slow visits with a
    next one, one was slow again (1/3); neither flagged visit was flagged again. v̄ ≤ 0 at one
    step of the three with a v̄."""
    row = lambda step, pair, v, v_bar, slow, hard: {"step": step, "pair": pair, "r": {
        "value": 0.0, "v": v, "v_bar": v_bar, "slow": slow, "hard": hard}}
    visits = [row(0, 0, None, None, False, False), row(0, 1, None, None, False, False),
              row(1, 0, 0.1, 0.2, True, False), row(1, 1, 0.0, 0.2, True, True),
              row(2, 0, -0.1, -0.05, True, True), row(2, 1, 0.2, -0.05, False, False),
              row(3, 0, 0.3, 0.1, False, False)]
    f = DS.flag_figures(visits, "r")
    assert f["steps_v_bar_nonpositive"] == pytest.approx(1 / 3)
    assert f["slow"]["rate"] == pytest.approx(3 / 5) and f["slow"]["again"] == pytest.approx(1 / 3) and f["slow"]["n"] == 3
    assert f["hard"]["rate"] == pytest.approx(2 / 5) and f["hard"]["again"] == pytest.approx(0.0) and f["hard"]["n"] == 2
