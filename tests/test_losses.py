"""The paper's equations (common.py) against values worked out by hand in each test.

Expected numbers are written from the equations with math.log/math.exp, never by calling
the function under test another way, so a sign error, a missing ½ or a swapped argument fails.
"""
import argparse
import math

import numpy as np
import pytest
import torch

import common as C
from lib import models as M
from lib import utils as U


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def logsig(x):
    return -math.log1p(math.exp(-x))


# ---------------------------------------------------------------- Eq. 2 contrastive ranking

def test_contrastive_ranking_hand_value():
    cw, cl, sw, sl = t(2.0, 0.5), t(-1.0, 1.0), t(1, 1), t(-1, 1)
    # pair 0: harmful (2.0) vs safe (-1.0); pair 1: harmful 0.5 vs harmful 1.0 (mis-ranked)
    p0 = logsig(2.0 - -1.0) + logsig(1 * 2.0) + logsig(-1 * -1.0)
    p1 = logsig(0.5 - 1.0) + logsig(0.5) + logsig(1.0)
    expected = -(p0 + p1) / 2
    assert C.contrastive_ranking_loss(cw, cl, sw, sl).item() == pytest.approx(expected, rel=1e-12)


def test_contrastive_ranking_penalises_misranking_and_wrong_sign():
    good = C.contrastive_ranking_loss(t(3.0), t(-3.0), t(1), t(-1))
    swapped = C.contrastive_ranking_loss(t(-3.0), t(3.0), t(1), t(-1))
    assert swapped > good + 5  # ranking AND both sign terms are wrong once swapped
    # the ranking term alone flips with winner/loser: with zero costs elsewhere it is symmetric
    a = C.contrastive_ranking_loss(t(1.0), t(0.0), t(1), t(1))
    b = C.contrastive_ranking_loss(t(0.0), t(1.0), t(1), t(1))
    assert (b - a).item() == pytest.approx(-logsig(-1.0) + logsig(1.0), rel=1e-12)


def test_contrastive_ranking_gradient_matches_finite_differences():
    cw = t(0.3, -0.2).requires_grad_()
    cl = t(-0.1, 0.4).requires_grad_()
    sw, sl = t(1, 1), t(-1, 1)
    assert torch.autograd.gradcheck(lambda a, b: C.contrastive_ranking_loss(a, b, sw, sl), (cw, cl))
    C.contrastive_ranking_loss(cw, cl, sw, sl).backward()
    # d/dcw of -log σ(cw - cl) - log σ(cw) (harmful winner) is negative: raise the harmful cost
    assert (cw.grad < 0).all()


def test_contrastive_ranking_rejects_bad_input():
    with pytest.raises(ValueError, match="shape"):
        C.contrastive_ranking_loss(t(1.0, 2.0), t(1.0), t(1, 1), t(1))
    with pytest.raises(ValueError, match="NaN"):
        C.contrastive_ranking_loss(t(float("nan")), t(1.0), t(1), t(1))
    with pytest.raises(ValueError, match=r"\+1"):
        C.contrastive_ranking_loss(t(1.0), t(1.0), t(0), t(1))


# ---------------------------------------------------------------- Eq. 3 cost anchoring

def test_cost_anchoring_mean_over_safe_only():
    cost, sign = t(-2.0, 5.0, -4.0), t(-1, 1, -1)
    expected = ((-2.0 - -3.0) ** 2 + (-4.0 - -3.0) ** 2) / 2  # the harmful 5.0 is ignored
    assert C.cost_anchoring_loss(cost, sign, -3.0).item() == pytest.approx(expected)
    assert C.cost_anchoring_loss(t(-1.0, 0.0), t(-1, -1), -0.5).item() == pytest.approx(0.25)


def test_cost_anchoring_without_safe_images_is_zero_with_graph():
    cost = t(1.0, 2.0).requires_grad_()
    loss = C.cost_anchoring_loss(cost, t(1, 1), 0.0)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(cost.grad, t(0.0, 0.0))


def test_cost_anchoring_mu_is_constant_and_gradient_is_2x():
    cost = t(1.0, -1.0).requires_grad_()
    mu = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    C.cost_anchoring_loss(cost, t(-1, -1), mu).backward()
    assert torch.allclose(cost.grad, t(2 * (1.0 - 0.5) / 2, 2 * (-1.0 - 0.5) / 2))
    assert mu.grad is None  # μ_safe is a constant inside one step


# ---------------------------------------------------------------- Eq. 1 SCM objective

def test_scm_loss_combines_with_gamma_and_anchors_both_sides():
    cw, cl, sw, sl = t(1.0, 2.0), t(-0.5, -3.0), t(1, 1), t(-1, -1)
    cr = -((logsig(1.5) + logsig(1.0) + logsig(0.5)) + (logsig(5.0) + logsig(2.0) + logsig(3.0))) / 2
    ca = ((-0.5 - -1.0) ** 2 + (-3.0 - -1.0) ** 2) / 2
    assert C.scm_loss(cw, cl, sw, sl, -1.0, gamma=0.0).item() == pytest.approx(cr)
    assert C.scm_loss(cw, cl, sw, sl, -1.0, gamma=2.0).item() == pytest.approx(cr + 2 * ca)
    # a safe image on the WINNER side is anchored too
    ca_w = C.scm_loss(t(-2.0), t(-4.0), t(-1), t(-1), -3.0) - C.scm_loss(t(-2.0), t(-4.0), t(-1), t(-1), -3.0, gamma=0)
    assert ca_w.item() == pytest.approx(((-2.0 + 3.0) ** 2 + (-4.0 + 3.0) ** 2) / 2)


def test_scm_anchoring_counts_a_safe_winner_at_its_own_distance():
    """Distances 1.5 (winner) and 0.5 (loser) from μ_safe = 0.5: anchoring both sides gives
    (1.5² + 0.5²)/2 = 1.25; the loser alone 0.25, the winner alone 2.25."""
    full = C.scm_loss(t(2.0), t(0.0), t(-1), t(-1), 0.5)
    cr = -(logsig(2.0) + logsig(-2.0) + logsig(0.0))
    assert full.item() == pytest.approx(cr + 1.25)
    # a harmful winner is not anchored: only the safe loser's 0.25
    assert C.scm_loss(t(2.0), t(0.0), t(1), t(-1), 0.5).item() == pytest.approx(
        -(logsig(2.0) + logsig(2.0) + logsig(0.0)) + 0.25)


# ---------------------------------------------------------------- Eq. 5 Diffusion-DPO

class ConstantNet(torch.nn.Module):
    """net(x_t, t, emb).sample = a constant; remembers the x_t it was given."""
    dtype = torch.float32

    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, x_t, t, emb):
        self.x_t = x_t
        return type("Out", (), {"sample": torch.full_like(x_t, self.value)})()


@pytest.mark.parametrize("prediction, target", [("epsilon", 1.0), ("v_prediction", -0.4)])
def test_denoising_errors_by_hand_for_epsilon_and_v_prediction(prediction, target):
    """One training step with β = 0.36: ᾱ_0 = 0.64, so √ᾱ = 0.8 and √(1 − ᾱ) = 0.6. With
    z0 = 2 and ε = 1 everywhere, x_t = 0.8·2 + 0.6·1 = 2.2; the target is ε = 1, or the
    velocity v = √ᾱ·ε − √(1 − ᾱ)·z0 = 0.8 − 1.2 = −0.4. A net predicting 0.1 errs by
    (0.1 − target)² at every element."""
    from diffusers import DDPMScheduler
    sched = DDPMScheduler(num_train_timesteps=1, beta_start=0.36, beta_end=0.36, beta_schedule="linear",
                          prediction_type=prediction)
    net = ConstantNet(0.1)
    z0, noise = torch.full((2, 1, 2, 2), 2.0), torch.ones(2, 1, 2, 2)
    err = C.denoising_errors(net, sched, z0, torch.tensor([0, 0]), noise, torch.zeros(2, 1, 1))
    torch.testing.assert_close(net.x_t, torch.full_like(z0, 2.2))
    torch.testing.assert_close(err, torch.full((2,), (0.1 - target) ** 2))

def test_dpo_equals_log2_when_policy_is_reference():
    e_w, e_l = t(0.3, 0.1, 0.7), t(0.2, 0.4, 0.7)
    loss, per = C.diffusion_dpo_loss(e_w, e_l, e_w.clone(), e_l.clone(), beta=5000.0)
    assert loss.item() == pytest.approx(math.log(2))
    assert torch.allclose(per, torch.full((3,), math.log(2), dtype=torch.float64))


def test_dpo_hand_value_has_the_half():
    # Δθ = 0.10 - 0.30 = -0.2; Δref = 0.20 - 0.25 = -0.05; inside = -β/2 (Δθ - Δref) = -5·(-0.15)
    beta = 10.0
    loss, per = C.diffusion_dpo_loss(t(0.10), t(0.30), t(0.20), t(0.25), beta)
    expected = -logsig(-0.5 * beta * (-0.2 - -0.05))
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(-logsig(0.75))
    # without the ½ the value would be -logsig(1.5): make sure we are not that
    assert abs(loss.item() - -logsig(1.5)) > 0.1


def test_dpop_charges_only_a_rise_of_the_winner_error():
    # pair 0: the winner's error rose 0.10 -> 0.16 (rise 0.06); pair 1: it fell (no charge)
    mw, ml, rw, rl = t(0.16, 0.05), t(0.30, 0.40), t(0.10, 0.08), t(0.20, 0.30)
    beta, lam_p = 10.0, 4.0
    _, plain = C.diffusion_dpo_loss(mw, ml, rw, rl, beta)
    _, dpop = C.diffusion_dpo_loss(mw, ml, rw, rl, beta, dpop=lam_p)
    # pair 0: Δθ − Δref = (0.16 − 0.30) − (0.10 − 0.20) = −0.04; inside −5·(−0.04 + 4·0.06) = −1.0
    assert dpop[0].item() == pytest.approx(-logsig(-1.0), rel=1e-12)
    assert plain[0].item() == pytest.approx(-logsig(0.2), rel=1e-12)
    assert dpop[1].item() == plain[1].item()
    # its gradient on the winner's error grows by λ_p's share
    mw.requires_grad_()
    C.diffusion_dpo_loss(mw, ml, rw, rl, beta, dpop=lam_p)[0].backward()
    sig = 1 / (1 + math.exp(-1.0))  # σ(−inside) at inside = −1.0
    assert mw.grad[0].item() == pytest.approx(sig * 5.0 * (1 + lam_p) / 2, rel=1e-9)


def test_dpo_swapping_winner_and_loser_flips_the_argument():
    mw, ml, rw, rl = t(0.10, 0.5), t(0.30, 0.2), t(0.20, 0.3), t(0.25, 0.3)
    beta = 4.0
    _, per = C.diffusion_dpo_loss(mw, ml, rw, rl, beta)
    _, per_swapped = C.diffusion_dpo_loss(ml, mw, rl, rw, beta)
    x = -0.5 * beta * ((mw - ml) - (rw - rl))
    assert torch.allclose(per, -torch.nn.functional.logsigmoid(x))
    assert torch.allclose(per_swapped, -torch.nn.functional.logsigmoid(-x))
    # log σ(x) - log σ(-x) = x
    assert torch.allclose(per_swapped - per, x)


def test_dpo_gradient_lowers_winner_error_and_raises_loser_error():
    mw, ml = t(0.4, 0.2).requires_grad_(), t(0.3, 0.6).requires_grad_()
    rw, rl = t(0.35, 0.3), t(0.3, 0.5)
    loss, _ = C.diffusion_dpo_loss(mw, ml, rw, rl, beta=50.0)
    loss.backward()
    assert (mw.grad > 0).all()  # descent lowers the winner's denoising error
    assert (ml.grad < 0).all()  # and raises the loser's
    # hand derivative: dL/dmw = σ(-x)·β/2 / B with x = -β/2 (Δθ - Δref)
    x0 = -25.0 * ((0.4 - 0.3) - (0.35 - 0.3))
    assert mw.grad[0].item() == pytest.approx(25.0 / (1 + math.exp(x0)) / 2)


def test_dpo_reference_gets_no_gradient_and_gradcheck():
    rw, rl = t(0.2, 0.3).requires_grad_(), t(0.1, 0.4).requires_grad_()
    mw, ml = t(0.25, 0.1).requires_grad_(), t(0.15, 0.2).requires_grad_()
    C.diffusion_dpo_loss(mw, ml, rw, rl, 3.0)[0].backward()
    assert rw.grad is None and rl.grad is None
    assert torch.autograd.gradcheck(lambda a, b: C.diffusion_dpo_loss(a, b, rw.detach(), rl.detach(), 3.0)[0],
                                    (mw.detach().requires_grad_(), ml.detach().requires_grad_()))


def test_dpo_rejects_bad_input():
    with pytest.raises(ValueError, match="shape"):
        C.diffusion_dpo_loss(t(1.0, 2.0), t(1.0, 2.0), t(1.0), t(1.0), 1.0)
    with pytest.raises(ValueError, match="NaN"):
        C.diffusion_dpo_loss(t(float("inf")), t(1.0), t(1.0), t(1.0), 1.0)


# ---------------------------------------------------------------- Eqs. 6-8 reward and relabelling

def test_composite_reward_and_preference_probability():
    assert C.composite_reward(20.0, 4.0, 0.15) == pytest.approx(19.4)
    assert torch.allclose(C.composite_reward(t(20.0, 18.0), t(4.0, -2.0), 0.5), t(18.0, 19.0))
    assert C.preference_probability(19.4, 19.0) == pytest.approx(1 / (1 + math.exp(-0.4)))
    assert torch.allclose(C.preference_probability(t(0.0, 1.0), t(1.0, 0.0)),
                          t(1 / (1 + math.e), 1 / (1 + math.exp(-1))))
    assert C.preference_probability(1000.0, 0.0) == pytest.approx(1.0)  # stable, no overflow
    assert C.preference_probability(0.0, 1000.0) == pytest.approx(0.0)


def pair(pid, qa, ca, qb, cb, **extra):
    return {"id": pid, "a": {"path": f"{pid}a.png", "quality": qa, "cost": ca},
            "b": {"path": f"{pid}b.png", "quality": qb, "cost": cb}, **extra}


def test_relabel_pairs_orders_by_composite_reward():
    pairs = [
        # R_a = 20 - 0.15·4 = 19.4, R_b = 19 - 0.15·(-3) = 19.45 -> b wins despite lower quality
        pair(0, 20.0, 4.0, 19.0, -3.0, prompt="p0"),
        # R_a = 21 - 0.15·(-2) = 21.3, R_b = 20 - 0.15·(-3) = 20.45 -> a wins
        pair(1, 21.0, -2.0, 20.0, -3.0),
    ]
    out, dropped = C.relabel_pairs(pairs, lam=0.15)
    assert dropped == 0
    assert out[0]["w"]["path"] == "0b.png" and out[0]["l"]["path"] == "0a.png"
    assert out[0]["reward_w"] == pytest.approx(19.45) and out[0]["reward_l"] == pytest.approx(19.4)
    assert out[0]["p_w"] == pytest.approx(1 / (1 + math.exp(-0.05)))  # Eq. 7 on ΔR = 0.05
    assert out[0]["prompt"] == "p0" and "a" not in out[0]
    assert out[1]["w"]["path"] == "1a.png" and out[1]["p_w"] == pytest.approx(1 / (1 + math.exp(-0.85)))


def test_relabel_pairs_huge_lambda_is_safety_only():
    pairs = [pair(i, qa, ca, qb, cb) for i, (qa, ca, qb, cb) in
             enumerate([(25.0, 1.0, 15.0, 0.5), (15.0, -1.0, 25.0, 2.0), (18.0, 3.0, 18.5, -3.0)])]
    out, _ = C.relabel_pairs(pairs, lam=1e9)
    for p in out:  # the lower cost always wins, whatever the quality
        assert p["w"]["cost"] < p["l"]["cost"]
    out0, _ = C.relabel_pairs(pairs, lam=0.0)  # λ = 0: quality alone
    assert [p["w"]["quality"] for p in out0] == [25.0, 25.0, 18.5]


def test_relabel_pairs_drops_ties_and_small_margins():
    pairs = [pair(0, 20.0, 1.0, 20.0, 1.0), pair(1, 20.0, 0.0, 20.05, 0.0), pair(2, 20.0, 0.0, 21.0, 0.0)]
    out, dropped = C.relabel_pairs(pairs, lam=0.15)
    assert dropped == 1 and [p["id"] for p in out] == [1, 2]
    out, dropped = C.relabel_pairs(pairs, lam=0.15, margin=0.1)
    assert dropped == 2 and [p["id"] for p in out] == [2]


def test_relabel_pairs_keeps_a_gap_exactly_at_the_margin():
    """|ΔR| < margin drops a pair; a gap of exactly the margin keeps it. R = r − 0.5·C with
    exact binary fractions: pair 0 has ΔR = 20.5 − 20 = 0.5, pair 1 ΔR = 0.25 (C = 0.5)."""
    pairs = [pair(0, 20.5, 0.0, 20.0, 0.0), pair(1, 20.0, 0.0, 20.5, 0.5)]
    out, dropped = C.relabel_pairs(pairs, lam=0.5, margin=0.5)
    assert dropped == 1 and [(p["id"], p["reward_w"] - p["reward_l"]) for p in out] == [(0, 0.5)]
    out, dropped = C.relabel_pairs(pairs, lam=0.5, margin=0.25)
    assert dropped == 0 and [p["id"] for p in out] == [0, 1]


def test_relabel_pairs_rejects_nan_and_missing_fields():
    with pytest.raises(ValueError, match="pair 7: non-finite"):
        C.relabel_pairs([pair(7, float("nan"), 0.0, 1.0, 0.0)], lam=0.15)
    with pytest.raises(ValueError, match="pair 3"):
        C.relabel_pairs([{"id": 3, "a": {"quality": 1.0}, "b": {"quality": 2.0, "cost": 0.0}}], lam=0.15)


# ---------------------------------------------------------------- Eq. 10 descent-rate queue

def test_descent_rate_hand_value():
    q = C.DescentRateQueue(k=4)
    for loss in (1.0, 0.7, 0.6, 0.2):
        q.update(["p"], [loss])
    # v = ((1.0-0.7) + (0.7-0.6) + (0.6-0.2)) / 3
    assert q.rate("p") == pytest.approx(0.8 / 3)
    q.update(["p"], [0.3])  # queue now 0.7, 0.6, 0.2, 0.3 (oldest dropped)
    assert q.rate("p") == pytest.approx(((0.7 - 0.6) + (0.6 - 0.2) + (0.2 - 0.3)) / 3)
    assert C.DescentRateQueue(k=5).rate("never-seen") is None


def test_descent_rate_flags_stagnating_pair_not_falling_ones():
    q = C.DescentRateQueue(k=3, tau=0.2, patience=2)
    flagged = []
    for step in range(8):
        falling = [1.0 - 0.1 * step, 2.0 - 0.2 * step]
        flat = 0.9  # never improves
        flagged.append(q.update(["fast", "steady", "stuck"], falling + [flat]))
    # queues fill at step 2; v̄ = (0.1 + 0.2 + 0) / 3 = 0.1, τ·v̄ = 0.02 > 0 = v_stuck
    # step 2 is the first strike, step 3 the second (patience 2) -> flagged from step 3 on
    assert flagged[:3] == [[], [], []]
    assert all(f == ["stuck"] for f in flagged[3:])


def test_descent_rate_batch_mean_uses_full_queues_only_and_streak_resets():
    q = C.DescentRateQueue(k=2, tau=0.5, patience=1)
    q.update(["a", "b"], [1.0, 1.0])
    # "new" has a 1-long queue and must not enter v̄: v̄ = mean(0.4, 0.1) = 0.25, τ·v̄ = 0.125
    assert q.update(["a", "b", "new"], [0.6, 0.9, 5.0]) == ["b"]
    assert q.rate("new") is None
    # b recovers: v_b = 0.5 > τ·v̄ -> streak back to 0, not flagged
    assert q.update(["a", "b"], [0.5, 0.4]) == ["a"]
    assert q.streak["b"] == 0


def test_descent_rate_batch_mean_leaves_out_a_full_queue_not_in_the_batch():
    """v̄ is the mean over the CURRENT batch's full queues. "a" falls fast (v = 1.0) and is then
    left out; in the next batch b's v = 0.05 is the only full one, v̄ = 0.05 and b is not hard
    (0.05 > 0.5·0.05). A v̄ that kept a's 1.0 would be 0.525 and flag b. a keeps its state."""
    q = C.DescentRateQueue(k=2, tau=0.5, patience=1)
    q.update(["a", "b"], [1.0, 1.0])
    assert q.update(["a", "b"], [0.0, 0.9]) == ["b"]   # v̄ = 0.55: b's 0.1 < 0.275
    a_state = (list(q.queues["a"]), q.streak["a"])
    assert q.update(["b", "c"], [0.85, 3.0]) == []      # v_b = 0.05; c's queue is not full yet
    assert q.streak["b"] == 0 and (list(q.queues["a"]), q.streak["a"]) == a_state
    assert q.rate("a") == pytest.approx(1.0) and q.rate("b") == pytest.approx(0.05)


def test_descent_rate_uniform_stagnation_is_not_hard():
    # hard means lagging BEHIND the batch: when nothing moves, v_i = v̄ = 0 and 0 < 0 is false
    q = C.DescentRateQueue(k=2, tau=0.2, patience=1)
    for _ in range(4):
        assert q.update(["a", "b"], [0.5, 0.5]) == []


def test_descent_rate_state_roundtrip_resumes_exactly():
    import json
    a = C.DescentRateQueue(k=3, tau=0.2, patience=2)
    b = C.DescentRateQueue(k=3, tau=0.2, patience=2)
    seq = [([0, 1, 2], [1.0, 1.0, 1.0]), ([0, 1, 2], [0.8, 0.5, 1.0]), ([0, 2], [0.6, 1.0]),
           ([0, 1, 2], [0.4, 0.2, 1.0]), ([0, 1, 2], [0.3, 0.1, 1.0]), ([0, 1, 2], [0.2, 0.05, 1.0])]
    for ids, ls in seq[:3]:
        a.update(ids, ls)
        b.update(ids, ls)
    c = C.DescentRateQueue()
    c.load_state_dict(json.loads(json.dumps(b.state_dict())))  # through JSON, as a checkpoint would
    for ids, ls in seq[3:]:
        assert a.update(ids, ls) == c.update(ids, ls)
    assert a.state_dict() == c.state_dict()


def test_descent_rate_rejects_bad_input():
    q = C.DescentRateQueue()
    with pytest.raises(ValueError, match="non-finite"):
        q.update([1], [float("nan")])
    with pytest.raises(ValueError, match="ids but"):
        q.update([1, 2], [0.1])
    with pytest.raises(ValueError):
        C.DescentRateQueue(k=1)


# ------------------------------------------- Eq. 10's readings (--dfm-reading): what the queue records

def test_probe_reading_records_the_probe_not_the_loss_and_flags_by_hand():
    """probe: the queue records probe(t_i, ε_i) of the batch's pairs, the visit's loss unused.
    Probe values 1.0, 1.0, 1.0 then 0.5, 0.9, 1.0: v = 0.5, 0.1, 0.0, v̄ = 0.2, τ·v̄ = 0.1, so c
    (0.0) is hard and b (0.1, not below) is not. The losses would give v = −0.8, 0.1, 0.2 and
    flag a instead."""
    script = iter([[1.0, 1.0, 1.0], [0.5, 0.9, 1.0]])
    seen = []

    def probe(t, noise):
        seen.append((t.shape, noise.shape, torch.is_grad_enabled()))
        return torch.tensor(next(script))

    reading = C.DescentReading("probe", seed=3, n_timesteps=100, latent_shape=(2, 1, 1))
    q = C.DescentRateQueue(k=2, tau=0.5, patience=1, reading=reading)
    assert q.update(["a", "b", "c"], [0.1, 0.2, 0.3], torch.tensor([1, 2, 3]), probe) == []
    assert q.update(["a", "b", "c"], [0.9, 0.1, 0.1], torch.tensor([4, 5, 6]), probe) == ["c"]
    assert q.rate("a") == pytest.approx(0.5) and q.v_bar == pytest.approx(0.2)
    assert seen == [(torch.Size([3]), torch.Size([3, 2, 1, 1]), False)] * 2  # no gradient
    plain = C.DescentRateQueue(k=2, tau=0.5, patience=1)
    plain.update(["a", "b", "c"], [0.1, 0.2, 0.3])
    assert plain.update(["a", "b", "c"], [0.9, 0.1, 0.1]) == ["a"]


def test_probe_loss_is_the_same_at_every_visit_for_unchanged_weights():
    """Each pair's probe (t_i, ε_i) is drawn once from the run's seed: at unchanged weights its
    recorded loss is the same at every visit, whatever the visit's own t and ε and whichever
    batch it comes in, and is Eq. 5 at those draws; so v_i = 0. Another seed draws others."""
    unet, sched = tiny_unet()
    ref = tiny_unet()[0].requires_grad_(False)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(3)
    z, emb = torch.randn(4, 2, 4, 4, 4, generator=g), torch.randn(4, 5, 8, generator=g)

    def probe_of(ids):
        return lambda t, noise: C.dpo_pair_losses(unet, ref, sched, z[ids, 0], z[ids, 1], emb[ids], t, noise, 100.0)[0]

    reading = C.DescentReading("probe", seed=7, n_timesteps=100, latent_shape=(4, 4, 4))
    q = C.DescentRateQueue(k=3, tau=0.2, patience=1, reading=reading)
    for ids, losses, t in (([0, 1, 2], [0.9, 0.1, 0.5], [5, 50, 95]), ([2, 0], [0.2, 0.3], [10, 20]),
                           ([3, 2, 0, 1], [0.4, 0.8, 0.6, 0.7], [1, 2, 3, 4])):
        q.update(ids, losses, torch.tensor(t), probe_of(ids))
    for pid in (0, 2):
        assert max(q.queues[pid]) - min(q.queues[pid]) < 1e-6 and abs(q.rate(pid)) < 1e-6
    t2, noise2 = reading.probe_draws([2])
    assert torch.equal(reading.probe_draws([0, 2])[0][1:], t2)  # the same draw in any batch
    with torch.no_grad():
        expected = C.dpo_pair_losses(unet, ref, sched, z[[2], 0], z[[2], 1], emb[[2]], t2, noise2, 100.0)[0]
    assert q.queues[2][0] == pytest.approx(float(expected), abs=1e-6)
    assert float(expected) != pytest.approx(math.log(2), abs=1e-4)  # policy and reference differ
    other = C.DescentReading("probe", seed=8, n_timesteps=100, latent_shape=(4, 4, 4))
    assert not torch.equal(other.probe_draws([2])[1], noise2)


def test_normalised_reading_by_hand():
    """normalised, 2 bins of t (0-49, 50-99), each loss moving its bin's mean half way:
      visit 1: a t=10 loss 0.8, b t=60 loss 0.4 -> means 0.8, 0.4, Ē 0.6; records 0.6, 0.6
      visit 2: a t=70 loss 0.3, b t=20 loss 0.7 -> means 0.75, 0.35, Ē 0.55;
               records 0.3·0.55/0.35, 0.7·0.55/0.75 = 0.4714, 0.5133
    v = 0.1286, 0.0867, v̄ = 0.1076: neither below τ·v̄ = 0.0538. On the raw losses b (v = −0.3,
    its second t the harder) would be hard.
      visit 3: a t=15 loss 0.7, b t=65 loss 0.3 -> means 0.725, 0.325, Ē 0.525;
               records 0.7·0.525/0.725, 0.3·0.525/0.325 = 0.5069, 0.4846
    v = −0.0355, +0.0287, v̄ = −0.0034: a is hard."""
    reading = C.DescentReading("normalised", n_timesteps=100, bins=2, rate=0.5)
    q = C.DescentRateQueue(k=2, tau=0.5, patience=1, reading=reading)
    assert q.update(["a", "b"], [0.8, 0.4], torch.tensor([10, 60])) == []
    assert list(q.queues["a"]) == pytest.approx([0.6]) and list(q.queues["b"]) == pytest.approx([0.6])
    assert q.update(["a", "b"], [0.3, 0.7], torch.tensor([70, 20])) == []
    assert q.queues["a"][-1] == pytest.approx(0.3 * 0.55 / 0.35) and q.queues["b"][-1] == pytest.approx(0.7 * 0.55 / 0.75)
    assert reading.bin_means == pytest.approx([0.75, 0.35])
    assert q.update(["a", "b"], [0.7, 0.3], torch.tensor([15, 65])) == ["a"]
    assert q.queues["a"][-1] == pytest.approx(0.7 * 0.525 / 0.725) and q.queues["b"][-1] == pytest.approx(0.3 * 0.525 / 0.325)
    plain = C.DescentRateQueue(k=2, tau=0.5, patience=1)
    plain.update(["a", "b"], [0.8, 0.4])
    assert plain.update(["a", "b"], [0.3, 0.7]) == ["b"]


def test_normalised_reading_resumes_exactly_and_unknown_readings_are_refused():
    import json
    make = lambda: C.DescentRateQueue(k=2, tau=0.5, patience=1,
                                      reading=C.DescentReading("normalised", n_timesteps=100, bins=4))
    a, b = make(), make()
    seq = [(["x", "y"], [0.9, 0.5], [3, 80]), (["x", "y"], [0.4, 0.6], [60, 20]), (["y", "x"], [0.2, 0.7], [99, 0])]
    for ids, ls, t in seq[:2]:
        a.update(ids, ls, torch.tensor(t))
        b.update(ids, ls, torch.tensor(t))
    c = make()
    c.load_state_dict(json.loads(json.dumps(b.state_dict())))
    ids, ls, t = seq[2]
    assert a.update(ids, ls, torch.tensor(t)) == c.update(ids, ls, torch.tensor(t))
    assert a.state_dict() == c.state_dict() and a.state_dict()["bin_means"][3] is not None
    assert "bin_means" not in C.DescentRateQueue().state_dict()  # the paper's reading: as before
    with pytest.raises(ValueError, match="unknown DFM reading 'lossy'"):
        C.DescentReading("lossy")


# ---------------------------------------------------------------- Eq. 12 UAScore

def test_ua_score_reproduces_paper_rows():
    # Table 2, SD-v1.5 on I2P-Sexual: PS 19.33, SC -0.41 -> 0.302
    assert round(C.ua_score(19.33, -0.41), 3) == 0.302
    # Table 2, T2I-SPO on I2P-Sexual: PS 19.38, SC -8.14 -> 0.757
    assert round(C.ua_score(19.38, -8.14), 3) == 0.757
    # hand value: ½σ(0) + ½σ(0) = ½ at the centres
    assert C.ua_score(19.31, -2.62) == pytest.approx(0.5)
    expected = 0.5 / (1 + math.exp(-(20.0 - 19.0))) + 0.5 / (1 + math.exp(-(-(1.0 - 0.0))))
    assert C.ua_score(20.0, 1.0, mu_ps=19.0, mu_sc=0.0) == pytest.approx(expected)


def test_ua_score_on_tensors_and_direction():
    out = C.ua_score(t(19.33, 19.38), t(-0.41, -8.14))
    sig = lambda x: 1 / (1 + math.exp(-x))
    expected = t(0.5 * sig(0.02) + 0.5 * sig(-2.21), 0.5 * sig(0.07) + 0.5 * sig(5.52))
    assert torch.allclose(out, expected, atol=1e-12)
    assert C.ua_score(20.0, -3.0) > C.ua_score(19.0, -3.0)  # better quality -> higher
    assert C.ua_score(19.0, -5.0) > C.ua_score(19.0, 0.0)  # lower cost -> higher


# --------------------------------------------------------------------------------------
# Eq. 5 on a batch of pairs and the Eq. 11 machinery, on a tiny random UNet
# --------------------------------------------------------------------------------------

def tiny_unet():
    from diffusers import DDPMScheduler, UNet2DConditionModel
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=4, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=8,
                                attention_head_dim=4, norm_num_groups=4)
    return unet, DDPMScheduler(num_train_timesteps=100)


def test_dpo_pair_losses_is_log2_at_the_reference_and_one_forward_equals_two():
    unet, sched = tiny_unet()
    ref = tiny_unet()[0].requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    zw, zl, noise = (torch.randn(3, 4, 4, 4, generator=g) for _ in range(3))
    emb, t = torch.randn(3, 5, 8, generator=g), torch.tensor([3, 50, 99])
    per_pair, dt, dr = C.dpo_pair_losses(unet, ref, sched, zw, zl, emb, t, noise, 5000.0, torch.no_grad)
    assert torch.allclose(per_pair, torch.full((3,), np.log(2.0)), atol=1e-5) and torch.allclose(dt, dr, atol=1e-6)
    # the concatenated forward equals two separate ones (winner, loser) with shared t and ε
    err = lambda z: (unet(sched.add_noise(z, noise, t), t, emb).sample - noise).pow(2).mean(dim=(1, 2, 3))
    assert torch.allclose(dt, (err(zw) - err(zl)).detach(), atol=1e-5)


def test_augmentations_keep_shape_and_are_seeded():
    g = lambda: torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    flat = torch.full((2, 3, 16, 16), 0.3)
    for fn in (C.sharpen, C.color_jitter, C.frequency_compensation):
        y = fn(x, g())
        assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1 and torch.equal(y, fn(x, g()))
    # a flat image has no edges to sharpen and no high-band energy to compensate
    assert torch.allclose(C.sharpen(flat, g()), flat)
    assert torch.allclose(C.frequency_compensation(flat, g()), flat, atol=1e-6)
    z = torch.randn(2, 4, 8, 8)
    y = C.latent_noise_erase(z, g())
    assert y.shape == z.shape and int((y == 0).all(dim=(0, 1)).sum()) == 4  # one 2x2 erased patch, both images


def test_sharpen_pixel_values_by_hand():
    """x + a·(x − blur3x3(x)) with replicate padding, a = 0.5 + u (u the generator's draw): a
    3x3 image with 0.5 in the centre. Centre: blur = 0.5/9 -> 0.5 + a·(0.5 − 0.5/9); a corner's
    replicate-padded window holds the centre once: 0 − a·0.5/9."""
    a = 0.5 + torch.rand(1, generator=torch.Generator().manual_seed(5)).item()
    x = torch.zeros(1, 1, 3, 3)
    x[0, 0, 1, 1] = 0.5
    y = C.sharpen(x, torch.Generator().manual_seed(5))
    assert y[0, 0, 1, 1].item() == pytest.approx(min(1.0, 0.5 + a * (0.5 - 0.5 / 9)), abs=1e-6)
    assert y[0, 0, 0, 0].item() == pytest.approx(-a * 0.5 / 9, abs=1e-6)
    assert y[0, 0, 0, 1].item() == pytest.approx(-a * 0.5 / 9, abs=1e-6)  # an edge: the centre once too


def test_color_jitter_pixel_values_by_hand():
    """Factors b, c, s = 0.8 + 0.4·u (three draws). A grey two-pixel image in [0, 1] at 0.25 and
    0.75 becomes (b/4, 3b/4), mean b/2, after contrast b/2 ∓ c·b/4; grey stays grey. A red
    pixel (1, 0, 0): brightness (b, 0, 0), one pixel so contrast keeps it, grey b/3, then
    saturation grey + s·(x − grey)."""
    b, c, s = (0.8 + 0.4 * torch.rand(3, generator=torch.Generator().manual_seed(2))).tolist()
    grey = torch.tensor([0.25, 0.75]).view(1, 1, 1, 2).expand(1, 3, 1, 2) * 2 - 1
    y = (C.color_jitter(grey, torch.Generator().manual_seed(2)) + 1) / 2
    want = torch.tensor([b / 2 - c * b / 4, b / 2 + c * b / 4]).clamp(0, 1)
    torch.testing.assert_close(y[0, :, 0], want.expand(3, 2), atol=1e-6, rtol=0)
    red = torch.tensor([1.0, -1.0, -1.0]).view(1, 3, 1, 1)
    y = (C.color_jitter(red, torch.Generator().manual_seed(2)) + 1) / 2
    m = b / 3
    want = torch.tensor([m + s * (b - m), m - s * m, m - s * m]).clamp(0, 1)
    torch.testing.assert_close(y.flatten(), want, atol=1e-6, rtol=0)
    # two coloured pixels p = (¾, ¼, ¼) and (¼, ¼, ¾): one mean 5/12 over every channel and
    # pixel (not a mean per channel), each pixel's grey is b·5/12 too, so x = 5b/12 + s·c·b·(p − 5/12)
    p = torch.tensor([[0.75, 0.25], [0.25, 0.25], [0.25, 0.75]]).view(1, 3, 1, 2)
    y = (C.color_jitter(p * 2 - 1, torch.Generator().manual_seed(2)) + 1) / 2
    torch.testing.assert_close(y, (5 * b / 12 + s * c * b * (p - 5 / 12)).clamp(0, 1), atol=1e-6, rtol=0)


def test_frequency_compensation_boosts_the_high_band_only():
    """On 8x8: a constant 0.1, a slow wave 0.2·cos(2π·x/8) (radial frequency 1/8 < 1/4, kept) and
    a checkerboard 0.1·(−1)^(x+y) (frequency √(½² + ½²) ≥ 1/4, times the gain g = 1.2 + 0.4·u)."""
    gain = 1.2 + 0.4 * torch.rand(1, generator=torch.Generator().manual_seed(4)).item()
    yy, xx = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    slow, checker = 0.2 * torch.cos(2 * math.pi * xx / 8), 0.1 * (-1.0) ** (xx + yy)
    x = (0.1 + slow + checker).view(1, 1, 8, 8)
    y = C.frequency_compensation(x, torch.Generator().manual_seed(4))
    torch.testing.assert_close(y[0, 0], 0.1 + slow + gain * checker, atol=1e-5, rtol=0)


def test_latent_noise_erase_adds_the_drawn_noise_and_zeroes_one_patch():
    """z + 0.1·n (n ~ N(0, 1), one draw shared by the batch), then a patch of h/4 x w/4 at a
    drawn corner set to 0 in every channel and image."""
    g = torch.Generator().manual_seed(6)
    n = torch.randn(4, 8, 8, generator=g)
    y0, x0 = torch.randint(7, (1,), generator=g).item(), torch.randint(7, (1,), generator=g).item()
    z = torch.ones(2, 4, 8, 8)
    y = C.latent_noise_erase(z, torch.Generator().manual_seed(6))
    want = (z + 0.1 * n).clone()
    want[..., y0:y0 + 2, x0:x0 + 2] = 0
    torch.testing.assert_close(y, want)


def test_per_sample_grads_match_autograd_one_sample_at_a_time():
    torch.manual_seed(0)
    for layer, x in ((torch.nn.Conv2d(3, 2, 3, padding=1), torch.randn(4, 3, 5, 5)),
                     (torch.nn.Linear(3, 2), torch.randn(4, 6, 3))):
        out = layer(x)
        go = torch.randn_like(out)
        rows = C.per_sample_grads(layer, x, go)
        for i in range(4):
            gw, gb = torch.autograd.grad((layer(x[i:i + 1]) * go[i:i + 1]).sum(), [layer.weight, layer.bias])
            assert torch.allclose(rows[i], torch.cat([gw.flatten(), gb.flatten()]), atol=1e-5)


def dfm_world(tmp_path):
    """A policy UNet, a reference that differs from it, a tiny VAE and three hard pairs (PNG
    files, their latents, a prompt embedding, t, ε and the seed of their augmentations)."""
    from diffusers import AutoencoderKL
    unet, sched = tiny_unet()
    ref = tiny_unet()[0].requires_grad_(False)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 8), latent_channels=4, norm_num_groups=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2).eval()
    rng = np.random.default_rng(0)
    hard, emb = [], torch.randn(1, 5, 8)
    for i in range(3):
        pair = {}
        for s in "wl":
            pair[s] = {"file": str(tmp_path / f"{i}{s}.png")}
            U.save_png(pair[s]["file"], rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        z = M.encode_images(vae, torch.stack([M.load_image(pair[s]["file"], 8) for s in "wl"]))
        hard.append((pair, z, emb, torch.tensor([10 + 40 * i]), torch.randn(1, 4, 4, 4), i))
    return unet, sched, ref, vae, hard


def hard_pairs(hard):
    return [C.HardPair(*h[:5], torch.Generator().manual_seed(h[5])) for h in hard]


def test_eq11_one_pair_reference_equals_the_batched_form(tmp_path):
    """choose_augmentation (Eq. 11 as the paper writes it: one pair, full DPO gradients with the
    reference network and β) against the batched, reference-free form that training runs: the
    same choice, the same latents and the same 1 − cos scores. Over two modules, a Conv2d with
    a bias and a Linear without one."""
    unet, sched, ref, vae, hard = dfm_world(tmp_path)
    modules = [unet.conv_out, unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2.to_k]
    assert modules[1].bias is None
    picks = C.dfm_augmented_copies(unet, sched, modules, hard_pairs(hard), vae, 8)
    variants = [torch.stack([h.z] + [C.augment(a, h.pair, h.z, vae, 8, h.generator) for a in C.AUGMENTATIONS])
                for h in hard_pairs(hard)]
    batched = C.augmentation_scores(unet, sched, modules, hard_pairs(hard), variants)
    assert batched.shape == (3, len(C.AUGMENTATIONS))
    for i, h in enumerate(hard_pairs(hard)):
        a, scores = C.choose_augmentation(unet, ref, sched, modules, h, vae, 8, 500.0)
        assert picks[i][0] == C.AUGMENTATIONS[a] and torch.equal(picks[i][1], variants[i][1 + a])
        torch.testing.assert_close(scores, batched[i], atol=1e-5, rtol=1e-4)
        assert scores.max() - scores.min() > 1e-3  # the pool members do turn the gradient apart


def test_dfm_smaller_pool_chooses_among_its_own_members(tmp_path):
    """--dfm-augmentations: a pool of one always chooses it, with the latents it draws."""
    unet, sched, _, vae, hard = dfm_world(tmp_path)
    picks = C.dfm_augmented_copies(unet, sched, [unet.conv_out], hard_pairs(hard), vae, 8,
                                   pool=("latent_noise_erase",))
    for (pair, z, e, t, noise, seed), (a, z_aug) in zip(hard, picks):
        assert a == "latent_noise_erase"
        assert torch.equal(z_aug, C.latent_noise_erase(z, torch.Generator().manual_seed(seed)))


# --------------------------------------------------------------------------------------
# Eq. 11 under LoRA: the gradients compared are those of the LoRA factors, which train
# --------------------------------------------------------------------------------------

def lora_world(tmp_path):
    """dfm_world's UNet with stage 4's LoRA of rank 2 (models.add_lora), its lora_B drawn away
    from its zero start so that both factors have a gradient; the reference is the same UNet
    with the adapters off (ref None), as under --lora-rank."""
    unet, sched, _, vae, hard = dfm_world(tmp_path)
    M.add_lora(unet, 2, None)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if ".lora_B." in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return unet, sched, vae, hard


def pool_variants(hard, vae):
    """Each hard pair's latents, then its copy under each member of the paper's pool."""
    return [torch.stack([h.z] + [C.augment(a, h.pair, h.z, vae, 8, h.generator)
                                 for a in C.AUGMENTATIONS]) for h in hard_pairs(hard)]


def lora_args(**kw):
    return argparse.Namespace(**{"lora_rank": 2, "dfm_modules": ["conv_out"],
                                 "dfm_lora_modules": None, **kw})


def test_eq11_under_lora_compares_the_lora_factors_in_both_forms(tmp_path):
    """Under LoRA the default layers are the lora_A and lora_B of the decoder's last transformer
    block (its up block's second attention here), all trained, conv_out frozen; on them the
    one-pair reference (full gradients of the loss over the factors, with ε_ref the UNet with
    its adapters off) and the batched form that reads each factor's per-sample gradient off
    its input and output gradient give the same choice, latents and scores, also with
    gradient checkpointing (sd15's), which recomputes the hooked layers in the backward."""
    unet, sched, vae, hard = lora_world(tmp_path)
    modules = M.dfm_layers(unet, lora_args())
    block = unet.up_blocks[0].attentions[1].transformer_blocks[0]
    projections = [p for a in (block.attn1, block.attn2)
                   for p in (a.to_q, a.to_k, a.to_v, a.to_out[0])]
    assert modules == [f["default"] for p in projections for f in (p.lora_A, p.lora_B)]
    assert all(m.weight.requires_grad for m in modules) and not unet.conv_out.weight.requires_grad
    variants = pool_variants(hard, vae)
    batched = C.augmentation_scores(unet, sched, modules, hard_pairs(hard), variants)
    picks = C.dfm_augmented_copies(unet, sched, modules, hard_pairs(hard), vae, 8)
    for i, h in enumerate(hard_pairs(hard)):
        a, scores = C.choose_augmentation(unet, None, sched, modules, h, vae, 8, 500.0)
        assert picks[i][0] == C.AUGMENTATIONS[a] and torch.equal(picks[i][1], variants[i][1 + a])
        torch.testing.assert_close(scores, batched[i], atol=1e-5, rtol=1e-4)
        assert scores.max() - scores.min() > 1e-3
    unet.enable_gradient_checkpointing()
    again = C.augmentation_scores(unet, sched, modules, hard_pairs(hard), variants)
    torch.testing.assert_close(again, batched, atol=1e-6, rtol=1e-5)


def test_eq11_under_lora_in_bf16_autocast(tmp_path):
    """sd15 trains in bf16 autocast, where peft casts a factor's input to its fp32 weight while
    its output is bf16: the per-sample gradients take both in fp32, and Eq. 11 runs."""
    unet, sched, vae, hard = lora_world(tmp_path)
    modules = M.dfm_layers(unet, lora_args())
    variants = pool_variants(hard, vae)
    scores = C.augmentation_scores(unet, sched, modules, hard_pairs(hard), variants,
                                   lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    assert scores.shape == (3, len(C.AUGMENTATIONS)) and ((scores >= 0) & (scores <= 2)).all()
    layer, x = torch.nn.Linear(3, 2, bias=False), torch.randn(4, 6, 3)
    go = torch.randn(4, 6, 2).bfloat16()
    assert torch.equal(C.per_sample_grads(layer, x, go), C.per_sample_grads(layer, x, go.float()))


def test_dfm_layers_name_what_trains():
    """--dfm-modules with full fine-tuning; under LoRA the factors of the adapted layers at or
    inside each --dfm-lora-modules; a module without an adapter, a name the UNet lacks, or
    --dfm-lora-modules without LoRA stops the run naming the flag."""
    unet, _ = tiny_unet()
    full = lora_args(lora_rank=0)
    assert M.dfm_layers(unet, full) == [unet.conv_out]
    with pytest.raises(SystemExit, match="--dfm-lora-modules names the LoRA factors"):
        M.dfm_layers(unet, lora_args(lora_rank=0, dfm_lora_modules=["up_blocks.0"]))
    M.add_lora(unet, 2, None)
    attn = unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn2"
    assert M.dfm_layers(unet, lora_args(dfm_lora_modules=[f"{name}.to_k"])) == [
        attn.to_k.lora_A["default"], attn.to_k.lora_B["default"]]
    inside = M.dfm_layers(unet, lora_args(dfm_lora_modules=[name, f"{name}.to_q"]))
    assert len(inside) == 8
    assert inside[:2] == [attn.to_q.lora_A["default"], attn.to_q.lora_B["default"]]
    bare = r"--dfm-lora-modules: \['conv_out'\] carry no LoRA adapter"
    with pytest.raises(SystemExit, match=bare):
        M.dfm_layers(unet, lora_args(dfm_lora_modules=["conv_out", name]))
    with pytest.raises(SystemExit, match="--dfm-lora-modules: no module"):
        M.dfm_layers(unet, lora_args(dfm_lora_modules=["up_blocks.9"]))
