"""lib/stats.py on hand-computed inputs: the paired bootstrap (prompts, then images within each),
the verdict an interval gives, claim intervals, the spread over seeds and the t interval over
per-seed differences, claims judged from several intervals, and the interval over users and images."""

import numpy as np
import pytest

import common as C
from lib import stats


def test_bootstrap_resamples_prompts_then_images_within_them():
    idx = stats.bootstrap_indices(n_prompts=5, per_prompt=3, n_boot=50, seed=1)
    assert idx.shape == (50, 15) and idx.min() >= 0 and idx.max() <= 14
    prompts = idx.reshape(50, 5, 3) // 3
    assert (prompts == prompts[..., :1]).all()  # the 3 images of a draw come from one prompt
    assert np.array_equal(idx, stats.bootstrap_indices(5, 3, 50, seed=1))  # seeded
    assert not np.array_equal(idx, stats.bootstrap_indices(5, 3, 50, seed=2))


@pytest.mark.parametrize("lo, hi, better, expected", [
    (0.1, 0.5, 1, "holds"), (-0.5, -0.1, 1, "fails"), (-0.1, 0.5, 1, "not separable"),
    (0.0, 0.5, 1, "not separable"), (-0.5, 0.0, 1, "not separable"), (0.0, 0.0, 1, "not separable"),
    (-0.3, -0.1, -1, "holds"), (0.1, 0.3, -1, "fails"), (1e-12, 1.0, 1, "holds"),
])
def test_verdict_at_its_edges(lo, hi, better, expected):
    assert stats.verdict(lo, hi, better) == expected


def values(ps, sc=None, ip=None):
    n = len(ps)
    return {"PS": np.array(ps, float), "SC": np.array(sc if sc is not None else [0.0] * n, float),
            "IP": np.array(ip if ip is not None else [0.0] * n, float)}


def test_claim_intervals_on_lists_with_known_answers():
    base = values([20.0, 21.0, 22.0, 23.0], sc=[1.0, 0.0, -1.0, 2.0], ip=[1, 0, 0, 1])
    idx = stats.bootstrap_indices(4, 1, 4000, seed=0)
    same = stats.claim_intervals({"base": base, "a": base}, "a", "base", idx, C.ua_score)
    assert all(v == {"diff": 0.0, "lo": 0.0, "hi": 0.0, "verdict": "not separable"} for v in same.values())
    # PS one point higher on every image, nothing else changed: every resample gives exactly +1
    up = {"base": base, "a": {**base, "PS": base["PS"] + 1}, "b": base}
    iv = stats.claim_intervals(up, "a", "b", idx, C.ua_score)
    assert iv["PS"] == {"diff": 1.0, "lo": 1.0, "hi": 1.0, "verdict": "holds"} and iv["IP"]["verdict"] == "not separable"
    assert iv["UAS"]["verdict"] == "holds" and iv["UAS"]["diff"] == pytest.approx(0.5 * (1 / (1 + np.exp(-1)) - 0.5))
    # IP: a flags nothing, b flags every image: −1 on every resample, an improvement
    iv = stats.claim_intervals({"base": base, "a": {**base, "IP": np.zeros(4)}, "b": {**base, "IP": np.ones(4)}},
                            "a", "b", idx, C.ua_score)
    assert iv["IP"] == {"diff": -1.0, "lo": -1.0, "hi": -1.0, "verdict": "holds"}
    # PS differences 0, 0, 0, 3: a resample's mean is 3X/4 with X ~ Binomial(4, 1/4), so
    # P(X = 0) = 0.316 > 2.5% gives lo = 0, and P(X <= 2) = 0.949 < 97.5% <= P(X <= 3) gives hi = 2.25
    iv = stats.claim_intervals({"base": base, "a": {**base, "PS": base["PS"] + [0, 0, 0, 3]}, "b": base}, "a", "b", idx, C.ua_score)
    assert iv["PS"] == {"diff": 0.75, "lo": 0.0, "hi": 2.25, "verdict": "not separable"}


def test_seed_spread_groups_a_model_with_its_seed_runs():
    rows = [("base", 0.8, 22.0, 0.5), ("spo", 0.2, 22.0, 0.7), ("spo_seed1", 0.4, 21.0, 0.6),
            ("spo_seed2", 0.3, 23.0, 0.8), ("spo_lam0.5", 0.1, 20.0, 0.6)]
    metrics = {n: {"harmful": {"IP": ip, "PS": ps, "UAS": uas}} for n, ip, ps, uas in rows}
    out = stats.seed_spread(metrics, [n for n, *_ in rows])
    assert set(out) == {"spo"} and out["spo"]["models"] == ["spo", "spo_seed1", "spo_seed2"]
    ip, ps = out["spo"]["harmful"]["IP"], out["spo"]["harmful"]["PS"]
    assert ip["mean"] == pytest.approx(0.3) and ip["std"] == pytest.approx(0.1)  # sample sd: √(0.02/2)
    assert (ip["min"], ip["max"], ip["n"]) == (0.2, 0.4, 3)
    assert ps["mean"] == pytest.approx(22.0) and ps["std"] == pytest.approx(1.0)


def test_claims_get_a_second_verdict_over_training_seeds():
    """Per-seed differences a − b, paired by seed suffix, and their t interval: PS diffs 1.0,
    1.1, 0.9 give 1.0 ± 4.303·0.1/√3 = [0.7516, 1.2484] (holds); 1, 2, 3 give [−0.4843, 4.4843]."""
    def metrics_for(ps_a):
        m = {}
        for k, (pa, pb) in enumerate(zip(ps_a, [20.0, 20.0, 20.0])):
            sfx = "" if k == 0 else f"_seed{k}"
            m["a" + sfx] = {"benign": {"PS": pa, "IP": 0.0, "UAS": 0.5}, "harmful": {"PS": 20.0, "IP": 0.1, "UAS": 0.5}}
            m["b" + sfx] = {"benign": {"PS": pb, "IP": 0.0, "UAS": 0.5}, "harmful": {"PS": 20.0, "IP": 0.2, "UAS": 0.5}}
        m["c"] = m["b"]
        iv = {"diff": 1.0, "lo": 0.5, "hi": 1.5, "verdict": "holds"}
        m["intervals"] = {f"{x}-{y}": {"benign": {"PS": iv}, "harmful": {"IP": {**iv, "verdict": "not separable"}}}
                          for x, y in (("a", "b"), ("a", "c"))}
        m["seeds"] = stats.seed_spread(m, [n for n in m if n not in ("intervals", "c")])
        return m

    keys = [("benign", "PS", "holds"), ("harmful", "IP", "not worse")]
    m = metrics_for([21.0, 21.1, 20.9])
    (c, no_seeds) = stats.judged_claims(m, m["intervals"], [("a keeps quality", "a", "b", keys),
                                                           ("against c", "a", "c", keys)])
    ps = c["parts"][0]["seeds"]
    assert ps["diffs"] == pytest.approx([1.0, 1.1, 0.9]) and ps["n"] == 3 and ps["verdict"] == "holds"
    assert (ps["lo"], ps["hi"]) == (pytest.approx(0.7516, abs=1e-4), pytest.approx(1.2484, abs=1e-4))
    assert c["parts"][1]["seeds"]["diffs"] == pytest.approx([-0.1] * 3) and c["verdict"] == "holds"
    assert c["seed_verdict"] == "holds"
    assert "seed_verdict" not in no_seeds and "seeds" not in no_seeds["parts"][0]  # c has one run only
    line = stats.claim_lines([c])[1]
    assert line.startswith("  Over 3 training seeds of each: holds") and "benign PS +1.000, +1.100, +0.900" in line
    m = metrics_for([21.0, 22.0, 23.0])
    c = stats.judged_claims(m, m["intervals"], [("a keeps quality", "a", "b", keys)])[0]
    assert c["verdict"] == "holds" and c["seed_verdict"] == "not separable"  # one run says holds, seeds do not
    assert c["parts"][0]["seeds"]["lo"] == pytest.approx(2.0 - 2.4843, abs=1e-4)


def test_t_interval_on_hand_computed_differences():
    assert stats.t975(2) == 4.303 and stats.t975(30) == pytest.approx(2.042, abs=1e-3)  # tables of Student's t
    # d = 1, 2, 3: mean 2, sd 1, half-width 4.303/√3 = 2.4843
    iv = stats.paired_t_interval([1.0, 2.0, 3.0], better=-1.0)
    assert iv["diff"] == 2.0 and iv["lo"] == pytest.approx(-0.4843, abs=1e-4) and iv["hi"] == pytest.approx(4.4843, abs=1e-4)
    assert iv["verdict"] == "not separable" and iv["n"] == 3
    iv = stats.paired_t_interval([-1.0, -1.1, -0.9], better=-1.0)  # sd 0.1: [−1.2484, −0.7516], lower is better
    assert iv["hi"] == pytest.approx(-0.7516, abs=1e-4) and iv["verdict"] == "holds"
    assert stats.paired_t_interval([0.5, 0.7], better=-1.0)["verdict"] == "not separable"  # t(1) = 12.7: wide
    assert stats.paired_t_interval([0.3], better=-1.0) == {"diff": 0.3, "lo": None, "hi": None, "verdict": None, "n": 1}
    # equal differences: sd 0, an interval of no width, no verdict of separation either way
    iv = stats.paired_t_interval([-1 / 86] * 3, better=-1.0)
    assert iv["lo"] == iv["hi"] == pytest.approx(-1 / 86) and iv["verdict"] == "no spread"
    assert stats.claim_verdict([(iv["verdict"], "holds")]) == "not separable"


def test_bootstrap_redraws_the_images_within_a_drawn_prompt():
    """One prompt, two images: prompt resampling alone leaves nothing to vary, so every spread of
    a − b comes from redrawing images within the prompt (each resample picks images 0/1 with
    replacement: both the same in half of them). a's images are IP 1 and 0, b's 0 and 0."""
    idx = stats.bootstrap_indices(n_prompts=1, per_prompt=2, n_boot=4000, seed=0)
    assert set(np.unique(idx)) == {0, 1}
    assert abs(float(np.mean(idx[:, 0] == idx[:, 1])) - 0.5) < 0.03
    values = {"a": {"IP": np.array([1.0, 0.0]), "PS": np.zeros(2), "SC": np.zeros(2)},
              "b": {"IP": np.zeros(2), "PS": np.zeros(2), "SC": np.zeros(2)}}
    values["base"] = values["b"]
    iv = stats.claim_intervals(values, "a", "b", idx, C.ua_score)["IP"]
    # a's mean over a resample is 0, ½ or 1 (probabilities ¼, ½, ¼): the 95% interval spans it all
    assert iv["diff"] == 0.5 and (iv["lo"], iv["hi"]) == (0.0, 1.0) and iv["verdict"] == "not separable"


def test_grid_interval_verdicts_and_margin():
    d = np.full((3, 10), -0.5)
    assert stats.grid_interval(d, 50, 0, -1.0) == {"diff": -0.5, "lo": -0.5, "hi": -0.5, "verdict": "holds"}
    assert stats.grid_interval(d + 1.0, 50, 0, -1.0)["verdict"] == "fails"
    mixed = np.array([[-1.0, 1.0] * 5])
    assert stats.grid_interval(mixed, 200, 0, -1.0)["verdict"] == "not separable"
    # allowed content: psa − base must stay above −0.1
    assert stats.grid_interval(np.full((1, 8), -0.05), 50, 0, 1.0, margin=-0.1)["verdict"] == "holds"
    assert stats.grid_interval(np.full((1, 8), -0.2), 50, 0, 1.0, margin=-0.1)["verdict"] == "fails"
