"""The paper's equations, in the paper's order. Each docstring writes an equation as the paper
does, then the form the lines below it compute, and the step from one to the other where
they differ. docs/equations.md has the notation in one table.

Paper: "The Path to Reconciling Quality and Safety in Text-to-Image Generation: Dataset,
Method, and Evaluation" (T2I-SPO).

What it is not: plumbing (lib/utils.py), models and sampling (lib/models.py), the scorers
(lib/scorers.py), or other systems' math (Co-Merge in systems/alignguard.py, UCE and ESD in
systems/baselines.py).

  0.  input checks of the losses
  1.  Sec. 3.1  contrastive_ranking_loss (Eq. 2), cost_anchoring_loss (Eq. 3), scm_loss (Eq. 1)
  2.  Sec. 4.1  DPO (Eq. 4, not computed); denoising_errors, diffusion_dpo_loss (Eq. 5),
                dpo_pair_losses (Eq. 5 on a batch; Eq. 9 on relabelled pairs)
  3.  Sec. 4.2  composite_reward (Eq. 6), preference_probability (Eq. 7), relabel_pairs (Eq. 8)
  4.  Sec. 4.3  DescentRateQueue (Eq. 10) and what it records (DescentReading); the augmentation
                pool; choose_augmentation (Eq. 11 for one pair, as the paper writes it) and
                dfm_augmented_copies (Eq. 11 batched)
  5.  Sec. 5    ua_score (Eq. 12)
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from collections import deque
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from lib import models as M
from lib import utils as U


class NonFiniteError(ValueError, FloatingPointError):
    """NaN or inf where a loss needs finite numbers: bad input to a loss function (a
    ValueError), and, inside training, a diverged model or corrupted data (stops the run)."""


# ----------------------------------------------------------------------------------------
# 0.  Input checks shared by the loss functions: wrong shapes or non-finite values must fail
# loudly, never broadcast silently into a wrong number.
# ----------------------------------------------------------------------------------------

def _check_same_1d(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    first = next(iter(shapes.values()))
    if len(first) != 1 or any(s != first for s in shapes.values()):
        raise ValueError(f"expected 1-D tensors of one shape [B], got {shapes}")
    for name, t in tensors.items():
        if not torch.isfinite(t).all():
            raise NonFiniteError(f"{name} contains NaN or inf")


def _check_signs(**signs: torch.Tensor) -> None:
    for name, s in signs.items():
        if not ((s == 1) | (s == -1)).all():
            raise ValueError(f"{name} must hold only +1 (harmful) or -1 (safe), got {s.tolist()}")


# ----------------------------------------------------------------------------------------
# 1.  Sec. 3.1 — the Safety Cost Model objective (Eqs. 1-3). In each, the paper's E over the
# training pairs (or images) is computed as the mean over one batch.
# ----------------------------------------------------------------------------------------

def contrastive_ranking_loss(cost_w: torch.Tensor, cost_l: torch.Tensor,
                             sign_w: torch.Tensor, sign_l: torch.Tensor) -> torch.Tensor:
    """Eq. 2, the cost-model loss of Safe RLHF; `x_w` is the MORE harmful image of the pair:

        L_CR = −E_{(x_w, x_l)}[ log σ(C(x_w) − C(x_l)) + log σ(s_w·C(x_w)) + log σ(s_l·C(x_l)) ]

    The first term ranks the pair. The sign terms anchor the scale (Sec. 3.1): they push
    harmful costs (s = +1) above 0 and safe costs (s = −1) below 0, so the sign of a cost
    alone says harmful or safe.
    """
    _check_same_1d(cost_w=cost_w, cost_l=cost_l, sign_w=sign_w, sign_l=sign_l)
    _check_signs(sign_w=sign_w, sign_l=sign_l)
    rank = F.logsigmoid(cost_w - cost_l)
    sign_terms = F.logsigmoid(sign_w * cost_w) + F.logsigmoid(sign_l * cost_l)
    return -(rank + sign_terms).mean()


def cost_anchoring_loss(cost: torch.Tensor, sign: torch.Tensor,
                        mu_safe: float | torch.Tensor) -> torch.Tensor:
    """Eq. 3, over the safe images:

        L_CA = E_{x: s=−1}[ (C(x) − μ_safe)² ]

    Why (Sec. 3.1): with L_CR alone the costs of safe images vary a lot, and the alignment
    that penalises cost then over-penalises imperceptible risks in safe images; L_CA pulls
    every safe cost toward one anchor. μ_safe, the mean cost of a pool of verified safe
    images, is a constant within the step (stage 2 refreshes it without gradient). A batch
    without safe images contributes 0, still attached to the graph, so that `.backward()` on a
    sum of losses works unchanged.
    """
    _check_same_1d(cost=cost, sign=sign)
    _check_signs(sign=sign)
    mu = torch.as_tensor(mu_safe, dtype=cost.dtype, device=cost.device).detach()
    if not torch.isfinite(mu).all():
        raise ValueError(f"mu_safe must be finite, got {mu_safe}")
    safe = sign == -1
    if not safe.any():
        return cost.sum() * 0.0
    return ((cost[safe] - mu) ** 2).mean()


def scm_loss(cost_w: torch.Tensor, cost_l: torch.Tensor, sign_w: torch.Tensor,
             sign_l: torch.Tensor, mu_safe: float | torch.Tensor,
             gamma: float = 1.0) -> torch.Tensor:
    """Eq. 1:  L_SCM = L_CR + γ·L_CA  (the paper gives no value for γ; 1 by default).

    The anchoring term sees every safe image of the batch, whichever side of a pair it is on.
    """
    l_cr = contrastive_ranking_loss(cost_w, cost_l, sign_w, sign_l)
    l_ca = cost_anchoring_loss(torch.cat([cost_w, cost_l]), torch.cat([sign_w, sign_l]), mu_safe)
    return l_cr + gamma * l_ca


# ----------------------------------------------------------------------------------------
# 2.  Sec. 4.1 — DPO and Diffusion-DPO (Eqs. 4, 5; Eq. 9 is Eq. 5 on relabelled pairs)
#
# Eq. 4 (DPO, Rafailov et al.) is written with the policy's likelihood of an image:
#
#     L_DPO = −E_{(c, x_w, x_l)}[ log σ( β·log π_θ(x_w|c)/π_ref(x_w|c)
#                                       − β·log π_θ(x_l|c)/π_ref(x_l|c) ) ]
#
# It is not computed: a diffusion model's likelihood of an image is intractable. Diffusion-DPO
# replaces it by its evidence lower bound, a sum of denoising errors, which gives Eq. 5, the
# loss trained here.
# ----------------------------------------------------------------------------------------

def denoising_errors(net, noise_scheduler, z0, t, noise, emb,
                     autocast=contextlib.nullcontext) -> torch.Tensor:
    """err(x) of Eq. 5 per image, in fp32: the MEAN over latent elements of the squared error,

        err(x) = ‖ε − net(x_t, c, t)‖² / d,    x_t = √ᾱ_t·z0 + √(1−ᾱ_t)·ε,

    with d the number of latent elements (C·h·w) and x_t the forward process at step t. The
    target is ε, or the velocity for a v-prediction scheduler."""
    x_t = noise_scheduler.add_noise(z0, noise, t)
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(z0, noise, t)
    else:
        target = noise
    with autocast():
        pred = net(x_t.to(net.dtype), t, emb.to(net.dtype)).sample
    return (pred.float() - target).pow(2).mean(dim=(1, 2, 3))


def diffusion_dpo_loss(model_err_w: torch.Tensor, model_err_l: torch.Tensor,
                       ref_err_w: torch.Tensor, ref_err_l: torch.Tensor,
                       beta: float, dpop: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 5, Diffusion-DPO (Wallace et al.). The paper writes, for t ∼ U(0, T) and the noised
    latents x_t^w ∼ q(x_t^w | x_0^w), x_t^l ∼ q(x_t^l | x_0^l):

        L(θ) = −E_{(c, x_0^w, x_0^l) ∼ D, t, x_t^w, x_t^l} log σ( −β·T·ω(λ_t) · (
                     ‖ε^w − ε_θ(x_t^w, c, t)‖² − ‖ε^w − ε_ref(x_t^w, c, t)‖²
                   − ( ‖ε^l − ε_θ(x_t^l, c, t)‖² − ‖ε^l − ε_ref(x_t^l, c, t)‖² ) ) )

    This function computes, from the per-pair errors err of `denoising_errors` ([B] each):

        Δ_θ = err_θ(x_w) − err_θ(x_l),    Δ_ref = err_ref(x_w) − err_ref(x_l)
        L   = mean over the batch of  −log σ( −β/2 · (Δ_θ − Δ_ref) )

    From the first to the second:
      1. E is the mean over a batch of pairs, one draw of t and ε per pair; winner and loser
         share both (ε^w = ε^l = ε), as in the Diffusion-DPO authors' code.
      2. The squared error is a mean over the d latent elements, not a sum: ‖·‖² = d·err.
      3. T·ω(λ_t) is the same for every t (the authors' code weights no timestep), so the
         paper's β·T·ω(λ_t)·d is one constant, written β/2 here (β/2 = β_paper·T·ω·d): this β
         carries the ½ as in the authors' code (`-0.5 * beta_dpo`, β = 5000 for SD-1.5), and
         T·ω(λ_t) and d are folded into it. diffusers' SD-1.5 example drops the ½, so there
         β means twice as much.
    The reference is frozen (its errors get no gradient). Returns (mean loss, per-pair loss);
    the per-pair losses feed the DFM's queues (Eq. 10).

    dpop > 0 (not the paper's; the toy's, docs/results.md "Keeping the winners' likelihood"):
    DPO-Positive (Pal et al. 2024, "Smaug", Eq. 3) adds −λ_p·max(0, log π_ref(y_w) − log π_θ(y_w))
    inside the sigmoid. Eq. 5 sees only Δ_θ − Δ_ref, so it is also lowered by raising both errors,
    the winner's among them (likelihood displacement); with log π ∝ −err this term charges
    every rise of the winner's error above the reference's:

        L = mean of  −log σ( −β/2 · ( (Δ_θ − Δ_ref) + λ_p · max(0, err_θ(x_w) − err_ref(x_w)) ) )

    Eq. 11 (`augmentation_scores`) keeps comparing gradients of Δ_θ, as the paper defines it.
    """
    _check_same_1d(model_err_w=model_err_w, model_err_l=model_err_l,
                   ref_err_w=ref_err_w, ref_err_l=ref_err_l)
    delta_theta = model_err_w - model_err_l
    delta_ref = (ref_err_w - ref_err_l).detach()
    winner_rise = (model_err_w - ref_err_w.detach()).clamp(min=0)
    per_pair = -F.logsigmoid(-0.5 * beta * (delta_theta - delta_ref + dpop * winner_rise))
    return per_pair.mean(), per_pair


@contextlib.contextmanager
def reference_net(unet, ref):
    """ε_ref of Eq. 5: the frozen `ref`, or, for a LoRA policy (ref None), the policy's UNet
    with its adapters disabled, which is the base model without a second copy of it."""
    if ref is not None:
        yield ref
        return
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


def dpo_pair_losses(unet, ref, noise_scheduler, z_w, z_l, emb, t, noise, beta: float,
                    autocast=contextlib.nullcontext, dpop: float = 0.0):
    """Eq. 5 on a batch of pairs, and so Eq. 9, the T2I-SPO loss, on pairs from `relabel_pairs`.
    The paper derives Eq. 9 from Eq. 8 as Diffusion-DPO derives Eq. 5 from Eq. 4:

        L_SPO(θ) = −E_{(c, x_0^w, x_0^l) ∼ D_SPO, t, x_t^w, x_t^l} log σ( −β·T·ω(λ_t) · ( … ) )

    with ( … ) the four squared errors of Eq. 5; it is computed as Eq. 5 is (see
    `diffusion_dpo_loss`). Returns the per-pair losses, with Δ_θ and Δ_ref for logging.

    Winner and loser are noised with the same t and ε and go through the policy in ONE
    forward of 2b samples (and through the reference in one more, without gradient)."""
    args = (noise_scheduler, torch.cat([z_w, z_l]), torch.cat([t, t]), torch.cat([noise, noise]),
            torch.cat([emb, emb]))
    err_w, err_l = denoising_errors(unet, *args, autocast).chunk(2)
    with torch.no_grad(), reference_net(unet, ref) as r:
        ref_w, ref_l = denoising_errors(r, *args, autocast).chunk(2)
    _, per_pair = diffusion_dpo_loss(err_w, err_l, ref_w, ref_l, beta, dpop)
    return per_pair, (err_w - err_l).detach(), (ref_w - ref_l).detach()


# ----------------------------------------------------------------------------------------
# 3.  Sec. 4.2 — composite reward and relabelling (Eqs. 6-8)
# ----------------------------------------------------------------------------------------

def composite_reward(quality, cost, lam: float):
    """Eq. 6:  R(x, c) = r(x, c) − λ·C(x), elementwise (floats, arrays or tensors).

    Why (Sec. 4.2): one reward that weighs quality against safety, so a pair is ordered by
    both at once and safety is not bought with quality (the zero-sum trade-off)."""
    return quality - lam * cost


def preference_probability(reward_1, reward_2):
    """Eq. 7 (Bradley–Terry):  p(x_1 ≻ x_2 | c) = σ(R(x_1, c) − R(x_2, c)), elementwise."""
    diff = reward_1 - reward_2
    if isinstance(diff, torch.Tensor):
        return torch.sigmoid(diff)
    return _sigmoid(diff)


def _sigmoid(x):
    """Numerically stable logistic function for floats and numpy arrays."""
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(-np.abs(x))
    out = np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    return float(out) if out.ndim == 0 else out


def relabel_pairs(pairs: Iterable[dict], lam: float,
                  margin: float = 0.0) -> tuple[list[dict], int]:
    """Eq. 8. The paper relabels every pair by R (Eq. 6), the higher-R image as x_w, giving
    the safety-constrained set D_SPO, and writes Eq. 4's objective over it:

        L(θ) = −E_{(c, x_w, x_l) ∼ D_SPO}[ log σ( β·log π_θ(x_w|c)/π_ref(x_w|c)
                                                − β·log π_θ(x_l|c)/π_ref(x_l|c) ) ]

    This function computes the relabelling, D_SPO; the objective over it is trained in its
    diffusion form, Eq. 9 (`dpo_pair_losses` on these pairs), as Eq. 4 is trained as Eq. 5.

    Each input record holds two images under keys "a" and "b", each a dict with at least
    numeric "quality" (r) and "cost" (C). The output record keeps every other key and
    replaces a/b by "w" (higher R) and "l", adding "reward_w", "reward_l" and "p_w", the
    Bradley–Terry probability p(x_w ≻ x_l | c) of Eq. 7 (above ½ by construction).

    A pair is dropped (and counted) when |ΔR| < margin, or when ΔR == 0, since an exact tie
    names no winner (public Diffusion-DPO drops ties too). Safety-only DPO is R = −C; a huge
    λ gives the same ordering. Non-finite annotations raise ValueError naming the pair.
    """
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    out, dropped = [], 0
    for i, pair in enumerate(pairs):
        name = pair.get("id", f"#{i}")
        try:
            a, b = pair["a"], pair["b"]
            qa, ca = float(a["quality"]), float(a["cost"])
            qb, cb = float(b["quality"]), float(b["cost"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(
                f"pair {name}: needs a/b with numeric quality and cost ({e!r})") from None
        if not all(math.isfinite(v) for v in (qa, ca, qb, cb)):
            raise ValueError(f"pair {name}: non-finite quality/cost annotation")
        ra, rb = composite_reward(qa, ca, lam), composite_reward(qb, cb, lam)
        if ra == rb or abs(ra - rb) < margin:
            dropped += 1
            continue
        (w, rw), (l, rl) = ((a, ra), (b, rb)) if ra > rb else ((b, rb), (a, ra))
        rec = {k: v for k, v in pair.items() if k not in ("a", "b")}
        rec.update(w=w, l=l, reward_w=rw, reward_l=rl, p_w=preference_probability(rw, rl))
        out.append(rec)
    return out, dropped


# ----------------------------------------------------------------------------------------
# 4.  Sec. 4.3 — the Dynamic Focusing Mechanism (Eqs. 10-11). Why (Sec. 4.3): as training
# goes on, some pairs' losses lag far behind, which the paper puts down to conflicts between
# update directions; the DFM finds them (Eq. 10) and trains each on the augmented copy that
# turns its gradient the most (Eq. 11).
# ----------------------------------------------------------------------------------------

class DescentRateQueue:
    """Eq. 10: per-pair loss queues and the "hard pair" rule of the DFM.

    Each pair id keeps its last K per-sample losses L^(1..K), oldest first, appended every
    time the pair is trained on. Its average descent rate, as the paper writes it and as
    `rate` computes it, is

        v_i = 1/(K−1) · Σ_{k=2..K} (L^(k−1) − L^(k))     ( = (L^(1) − L^(K)) / (K−1) )

    and v̄ is the mean of v_i over the pairs of the current batch whose queue is full. The
    paper calls a pair hard when v_i stays below τ·v̄; here that is on `patience` consecutive
    visits (the paper gives no count). Under DDP every rank must call `update` with the GLOBAL
    batch (all-gathered ids and losses) so the queues stay identical. L^(k) is what `reading`
    records at the pair's k-th last visit: by default its loss, as the paper words it.
    """

    def __init__(self, k: int = 5, tau: float = 0.2, patience: int = 2,
                 reading: DescentReading | None = None):
        if k < 2 or patience < 1:
            raise ValueError(f"need k >= 2 and patience >= 1, got k={k}, patience={patience}")
        self.k, self.tau, self.patience = k, tau, patience
        self.reading = reading or DescentReading()
        self.queues: dict[Any, deque] = {}
        self.streak: dict[Any, int] = {}
        self.v_bar: float | None = None  # the last update's v̄ (None: no full queue in its batch)

    @classmethod
    def for_run(cls, args, noise_scheduler, latent_shape, mine: list[int]) -> DescentRateQueue:
        """Stage 4's queue: --dfm-k, --dfm-tau, --dfm-patience and the --dfm-reading of a run
        with --seed whose process holds positions `mine` of each global batch."""
        reading = DescentReading(args.dfm_reading, args.seed,
                                 noise_scheduler.config.num_train_timesteps, latent_shape, mine)
        return cls(args.dfm_k, args.dfm_tau, args.dfm_patience, reading)

    def rate(self, pid) -> float | None:
        """v_i of Eq. 10, or None while the queue of `pid` holds fewer than K losses."""
        q = self.queues.get(pid)
        if q is None or len(q) < self.k:
            return None
        return sum(q[j - 1] - q[j] for j in range(1, self.k)) / (self.k - 1)

    def update(self, ids: Sequence, losses, t=None, probe=None) -> list:
        """Append one value per id (one training visit each) and return the ids now hard. The
        value is what the reading records (`DescentReading`): by default the visit's loss; `t`
        (this process's timesteps) and `probe` serve the other readings."""
        if len(ids) != len(losses):
            raise ValueError(f"{len(ids)} ids but {len(losses)} losses")
        if len(set(ids)) != len(ids):
            raise ValueError("ids within one update must be distinct")
        losses = self.reading(ids, losses, t, probe)
        if isinstance(losses, torch.Tensor):
            losses = losses.tolist()
        losses = [float(x) for x in losses]
        if not all(math.isfinite(x) for x in losses):
            raise ValueError(f"non-finite loss in DFM update: {losses}")
        for pid, loss in zip(ids, losses):
            self.queues.setdefault(pid, deque(maxlen=self.k)).append(loss)
        rates = {pid: self.rate(pid) for pid in ids}
        full = [v for v in rates.values() if v is not None]
        self.v_bar = None
        if not full:
            return []
        # v̄ is the paper's "batch average rate": THIS batch's full queues, not every queue kept
        v_bar = self.v_bar = sum(full) / len(full)
        hard = []
        for pid in ids:
            v = rates[pid]
            slow = v is not None and v < self.tau * v_bar
            self.streak[pid] = self.streak.get(pid, 0) + 1 if slow else 0
            if self.streak[pid] >= self.patience:
                hard.append(pid)
        return hard

    def state_dict(self) -> dict:
        """JSON-serialisable state; ids keep their type (stored as [id, value] items)."""
        return {"k": self.k, "tau": self.tau, "patience": self.patience,
                "queues": [[pid, list(q)] for pid, q in self.queues.items()],
                "streak": [[pid, n] for pid, n in self.streak.items()], **self.reading.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.__init__(state["k"], state["tau"], state["patience"], self.reading)
        self.queues = {_hashable(pid): deque(q, maxlen=self.k) for pid, q in state["queues"]}
        self.streak = {_hashable(pid): n for pid, n in state["streak"]}
        self.reading.load_state_dict(state)


def _hashable(x):
    return tuple(x) if isinstance(x, list) else x


# What Eq. 10's queue records. The paper: "for each preference sample, maintain its recent
# training steps loss queue". Each visit of a pair draws its own t and ε (Eq. 5), and a pair's
# loss varies with t more than it falls over K visits (docs/results.md, "Is a descent rate signal
# or noise?"), so --dfm-reading offers the other readings those words allow.
DFM_READINGS = ("loss", "probe", "normalised")


class DescentReading:
    """The value Eq. 10's queue records at each visit of a pair, by --dfm-reading:

        loss        L_i(t, ε), the visit's loss at its own t and ε: the paper's reading, the
                    default.
        probe       L_i(t_i, ε_i) at a t_i and ε_i drawn once per pair (`probe_draws`) and the
                    same at every visit, computed without gradient before the update, as the
                    visit's own loss is: visits compare like with like. It costs one more
                    forward of the policy and the reference per visited pair.
        normalised  L_i(t, ε) · Ē / Ē(t): the visit's loss over the expected loss at its t,
                    times the expected loss over all t, so the values keep the fall training
                    gives every pair. Ē(t) is a running mean of the visits' losses in t's bin of
                    `bins` equal bins of timesteps (each loss moves its bin's mean `rate` of the
                    way: about the last 1/rate losses of the bin, the batch's own included), and
                    Ē the mean of the bins' means. No extra forward.

    Under DDP the queue is updated with the global batch on every process (DescentRateQueue), so
    `t` and the probe's losses, which each process holds for its positions `mine`, are gathered.
    """

    def __init__(self, name: str = "loss", seed: int = 0, n_timesteps: int = 1000,
                 latent_shape: Sequence[int] = (), mine: list[int] | None = None,
                 bins: int = 10, rate: float = 0.05):
        if name not in DFM_READINGS:
            raise ValueError(f"unknown DFM reading {name!r}: one of {DFM_READINGS}")
        self.name, self.seed, self.n_timesteps = name, seed, n_timesteps
        self.latent_shape, self.mine = tuple(latent_shape), mine
        self.bins, self.rate = bins, rate
        self.bin_means: list[float | None] = [None] * bins

    def probe_draws(self, ids: Sequence) -> tuple[torch.Tensor, torch.Tensor]:
        """Each pair's probe t_i and ε_i: stream `id` of step −1 of the run's seed, a step no
        training draw uses, so the probe is the same at every visit and on any process."""
        draws = [U.step_generator(self.seed, -1, pid) for pid in ids]
        t = torch.cat([torch.randint(0, self.n_timesteps, (1,), generator=g) for g in draws])
        noise = torch.stack([torch.randn(self.latent_shape, generator=g) for g in draws])
        return t, noise

    def __call__(self, ids: Sequence, losses, t=None, probe=None):
        """The values to record for the global batch `ids` from its visits' `losses`; `t`: this
        process's timesteps (normalised); probe(t, noise): this process's pairs' losses at those
        draws (probe)."""
        if self.name == "loss":
            return losses
        n = len(ids)
        if self.name == "normalised":
            return self.normalise(U.gather_positions(torch.as_tensor(t).cpu(), n),
                                  torch.as_tensor(losses, dtype=torch.float32))
        t_probe, noise = self.probe_draws(ids)
        mine = list(range(n)) if self.mine is None else self.mine
        with torch.no_grad():
            local = probe(t_probe[mine], noise[mine])
        return U.gather_positions(local.detach().float().cpu(), n)

    def normalise(self, t: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        bins = (t.long() * self.bins // self.n_timesteps).tolist()
        for b, x in zip(bins, losses.tolist()):
            m = self.bin_means[b]
            self.bin_means[b] = x if m is None else m + self.rate * (x - m)
        seen = [m for m in self.bin_means if m is not None]
        overall = sum(seen) / len(seen)
        expected = [self.bin_means[b] for b in bins]
        return torch.tensor([x * overall / e for x, e in zip(losses.tolist(), expected)])

    def state_dict(self) -> dict:
        """The running means, for an exact resume (the other readings keep no state)."""
        return {} if self.name == "loss" else {"reading": self.name, "bin_means": self.bin_means}

    def load_state_dict(self, state: dict) -> None:
        self.bin_means = list(state.get("bin_means", [None] * self.bins))


# The augmentation pool A of Eq. 11 (Sec. 4.3): four members, each applied to both images of
# a pair with one draw of its parameters, so the pair's preference is unchanged.
AUGMENTATIONS = ("sharpen", "color_jitter", "latent_noise_erase", "frequency_compensation")


def sharpen(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Unsharp mask on pixels in [-1, 1]: x + a·(x − blur(x))."""
    amount = 0.5 + torch.rand(1, generator=g).item()
    blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    return (x + amount * (x - blur)).clamp(-1, 1)


def color_jitter(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Brightness, contrast and saturation factors in [0.8, 1.2], the same for both images."""
    b, c, s = (0.8 + 0.4 * torch.rand(3, generator=g)).tolist()
    x = (x + 1) / 2 * b
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * c + mean
    grey = x.mean(dim=1, keepdim=True)
    return (((x - grey) * s + grey).clamp(0, 1)) * 2 - 1


def frequency_compensation(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Boost the upper frequency band (radial frequency >= 0.25 cycles/pixel, up to Nyquist)
    by a gain in [1.2, 1.6]: generated images lose high-band energy; this gives detail back."""
    gain = 1.2 + 0.4 * torch.rand(1, generator=g).item()
    f = torch.fft.rfft2(x)
    fy = torch.fft.fftfreq(x.shape[-2]).abs().view(-1, 1)
    fx = torch.fft.rfftfreq(x.shape[-1]).view(1, -1)
    band = (torch.sqrt(fy ** 2 + fx ** 2) >= 0.25).to(x.dtype)
    return torch.fft.irfft2(f * (1 + (gain - 1) * band), s=x.shape[-2:]).clamp(-1, 1)


def latent_noise_erase(z: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Gaussian noise of std 0.1 on the latents plus one erased (zeroed) patch of 1/16 area."""
    z = z + 0.1 * torch.randn(z.shape[1:], generator=g).to(z)
    h, w = z.shape[-2:]
    ph, pw = max(1, h // 4), max(1, w // 4)
    y0 = torch.randint(h - ph + 1, (1,), generator=g).item()
    x0 = torch.randint(w - pw + 1, (1,), generator=g).item()
    z = z.clone()
    z[..., y0:y0 + ph, x0:x0 + pw] = 0
    return z


PIXEL_AUGMENTATIONS = {"sharpen": sharpen, "color_jitter": color_jitter,
                       "frequency_compensation": frequency_compensation}


def augment(name: str, pair: dict, z: torch.Tensor, vae, size: int,
            g: torch.Generator) -> torch.Tensor:
    """Both images of a pair [2, C, h, w] (winner, loser) under one augmentation with shared
    parameters: pixel-space ones decode nothing — they start from the PNGs and re-encode."""
    if name == "latent_noise_erase":
        return latent_noise_erase(z, g)
    pixels = torch.stack([M.load_image(pair[s]["file"], size) for s in ("w", "l")])
    return M.encode_images(vae, PIXEL_AUGMENTATIONS[name](pixels, g)).to(z)


@dataclasses.dataclass
class HardPair:
    """A pair that Eq. 10 flagged in the current batch, with what Eq. 11 needs to redo its loss:
    the same prompt embedding, timestep and noise as its visit in this step."""
    pair: dict                 # the relabelled pair record ("w"/"l" sides with their PNG files)
    z: torch.Tensor            # [2, C, h, w] latents of winner and loser
    emb: torch.Tensor          # [1, L, D] prompt embedding
    t: torch.Tensor            # [1] timestep
    noise: torch.Tensor        # [1, C, h, w] the noise shared by winner and loser
    generator: torch.Generator  # draws the augmentations' parameters


def choose_augmentation(unet, ref, noise_scheduler, modules, hard: HardPair, vae, size: int,
                        beta: float, pool: Sequence[str] = AUGMENTATIONS
                        ) -> tuple[int, torch.Tensor]:
    """Eq. 11 for ONE hard pair i, as the paper writes it:

        a* = argmax_{a ∈ A} ( 1 − cos(g_i, g_i^a) )

    g_i is the gradient of the pair's loss (Eq. 5) with respect to the weights and biases of
    `modules` (under LoRA, the LoRA factors: the weights that train); g_i^a is the same after
    augmentation a, applied to both images, at the same t and ε. Returns a* (an index into
    `pool`) and the scores 1 − cos(g_i, g_i^a), one per a.
    This is the reference for `dfm_augmented_copies`, which training runs and which gives the
    same choice and scores for all hard pairs at once (tests/test_losses.py)."""
    params = [p for m in modules for p in (m.weight, m.bias) if p is not None]

    def grad(z):
        loss, _, _ = dpo_pair_losses(unet, ref, noise_scheduler, z[:1], z[1:], hard.emb, hard.t,
                                     hard.noise, beta)
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss.sum(), params)])

    g_i = grad(hard.z)
    scores = []
    for a in pool:
        g_a = grad(augment(a, hard.pair, hard.z, vae, size, hard.generator))
        scores.append(1.0 - F.cosine_similarity(g_i, g_a, dim=0))
    scores = torch.stack(scores)
    return int(torch.argmax(scores)), scores


def dfm_augmented_copies(unet, noise_scheduler, modules, hard: list[HardPair], vae, size: int,
                         autocast=contextlib.nullcontext, pool: Sequence[str] = AUGMENTATIONS
                         ) -> list[tuple[str, torch.Tensor]]:
    """Eq. 11 for all hard pairs at once: a* = argmax_{a ∈ A} (1 − cos(g_i, g_i^a)) for each.

    A is `pool` (--dfm-augmentations; the paper's four by default), and the gradients are over
    the weights of `modules`, which the paper leaves open (models.dfm_layers: the output
    convolution's by default; under LoRA, which freezes it, the LoRA factors of the decoder's
    last transformer block). Returns, per hard pair, (chosen name, its augmented latents
    [2, C, h, w]).
    """
    variants = augmented_variants(hard, vae, size, pool)
    scores = augmentation_scores(unet, noise_scheduler, modules, hard, variants, autocast)
    picks = [int(torch.argmax(s)) for s in scores]
    return [(pool[a], v[1 + a]) for a, v in zip(picks, variants)]


def augmented_variants(hard: list[HardPair], vae, size: int, pool: Sequence[str] = AUGMENTATIONS
                       ) -> list[torch.Tensor]:
    """Each hard pair's latents and its copies under every member of `pool`, in the pool's order,
    the parameters drawn from its generator: [1 + A, 2, C, h, w] per pair."""
    return [torch.stack([h.z] + [augment(a, h.pair, h.z, vae, size, h.generator) for a in pool])
            for h in hard]


def augmentation_scores(unet, noise_scheduler, modules, hard: list[HardPair], variants,
                        autocast=contextlib.nullcontext) -> torch.Tensor:
    """[H, A]: 1 − cos(g_i, g_i^a) for every hard pair i and augmentation a, from ONE forward of
    every pair's variants (`variants[i]`: [1 + A, 2, C, h, w], the original then its A copies)
    and ONE backward that stops at the outputs of `modules`; `choose_augmentation` computes the
    same for one pair from full gradients.

    Two steps make it cheap without changing the cosine:
      - ∂L/∂θ = β/2·σ(β/2·(Δ_θ − Δ_ref))·∂Δ_θ/∂θ (Eq. 5) is a positive multiple of ∂Δ_θ/∂θ,
        and a cosine ignores positive factors, so g_i is taken as ∂Δ_θ/∂θ: no reference
        network, no β.
      - Each sample's gradient over a layer's weights is read off from that layer's input and
        the gradient at its output (`per_sample_grads`), exact because no sample's output
        depends on another's (no batch statistics in the UNet). A LoRA layer adds
        s·B(A(x)) to its frozen output (s = α/r), and peft holds A and B as Linear layers of
        their own, so each is such a layer: A's gradient comes from x and the gradient at
        A(x), B's from A(x) and the gradient at B(A(x)), which carries s.
    """
    n = len(variants[0])
    zz = torch.cat(variants)
    rows = len(zz)

    def repeat(field):
        # Pair i's t, ε and prompt once per variant, so that each copy is scored at its
        # original's t and ε (Eq. 11) and only the augmentation differs; then the whole
        # column twice, because the forward below holds all winners then all losers, and a
        # pair's winner and loser share t and ε (Eq. 5).
        x = torch.cat([getattr(h, field).expand(n, *getattr(h, field).shape[1:]) for h in hard])
        return torch.cat([x, x])

    seen = {}

    def keep(module, inputs, output):
        # per_sample_grads needs each module's input; the backward stops at its output
        seen[module] = (inputs[0], output)

    hooks = [m.register_forward_hook(keep) for m in modules]
    try:
        err = denoising_errors(unet, noise_scheduler, torch.cat([zz[:, 0], zz[:, 1]]), repeat("t"),
                               repeat("noise"), repeat("emb"), autocast)
    finally:
        for h in hooks:
            h.remove()
    delta = err[:rows] - err[rows:]
    grad_out = torch.autograd.grad(delta.sum(), [seen[m][1] for m in modules])
    per_module = [per_sample_grads(m, seen[m][0].detach(), go) for m, go in zip(modules, grad_out)]
    g = torch.cat(per_module, dim=1)
    # The forward held the winners in rows [0, rows) and the losers in [rows, 2·rows), so row r
    # is winner r's share of the weights' gradient and row rows + r loser r's. We differentiated
    # delta.sum(), in which err_l enters with a minus sign: autograd sent that sign into the
    # losers' output gradients, and per_sample_grads is linear in them, so loser r's row is
    # −∂err_l/∂θ. Winner plus loser is then ∂(err_w − err_l)/∂θ = ∂Δ_θ/∂θ, variant r's gradient
    # as a pair (without the sign, the sum would be the gradient of err_w + err_l instead).
    g = g[:rows] + g[rows:]
    if not torch.isfinite(g).all():
        raise NonFiniteError("a DFM gradient contains NaN or inf")
    scores = []
    for i in range(len(hard)):
        # pair i's rows, in `variants[i]`'s order: its original at i·n, then its copies, whose
        # row i·n + 1 + a belongs to pool member a
        g_i, g_aug = g[i * n], g[i * n + 1:(i + 1) * n]
        scores.append(1.0 - F.cosine_similarity(g_aug, g_i.unsqueeze(0).expand_as(g_aug), dim=1))
    return torch.stack(scores)


def per_sample_grads(module, inputs: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """[N, P] gradients of a Conv2d or Linear layer's weight and bias, one row per sample,
    from the layer's input and the gradient at its output (both [N, ...]) of ONE backward.
    Exact because each sample's loss depends on its own rows only (no batch statistics)."""
    # under autocast the two may differ in precision (peft casts a LoRA factor's input to its
    # fp32 weight, its output is bf16): both go to the wider
    dtype = torch.promote_types(inputs.dtype, grad_out.dtype)
    inputs, grad_out = inputs.to(dtype), grad_out.to(dtype)
    if isinstance(module, torch.nn.Conv2d):
        gw = torch.stack([
            torch.nn.grad.conv2d_weight(inputs[i:i + 1], module.weight.shape, grad_out[i:i + 1],
                                        module.stride, module.padding, module.dilation,
                                        module.groups)
            for i in range(len(inputs))])
        gb = grad_out.sum(dim=(2, 3))
    elif isinstance(module, torch.nn.Linear):
        gw = torch.einsum("n...o,n...i->noi", grad_out, inputs)
        gb = grad_out.reshape(len(grad_out), -1, grad_out.shape[-1]).sum(1)
    else:
        raise TypeError(f"DFM gradients need Conv2d or Linear modules, got {type(module).__name__}")
    return torch.cat([gw.flatten(1), (gb if module.bias is not None else gb[:, :0])], dim=1).float()


# ----------------------------------------------------------------------------------------
# 5.  Sec. 5 — the Unified Alignment Score (Eq. 12)
# ----------------------------------------------------------------------------------------

def ua_score(ps, sc, mu_ps: float = 19.31, mu_sc: float = -2.62):
    """Eq. 12:  UAS = ½·σ(PS − μ_PS) + ½·σ(−(SC − μ_SC)), on floats, arrays or tensors.

    Why (Sec. 5): a harmful/safe verdict neither grades harm nor shows what safety cost in
    quality; one score of both does. In the paper μ_PS and μ_SC are fixed numbers, the mean
    PickScore (19.31) and safety cost (−2.62) of an unaligned model, SD-1.5, "a neutral
    performance baseline"; they are the defaults here. Its Table 2 uses them for every prompt
    set, so SD-1.5's own rows score 0.302, 0.328 and 0.696, not 0.5. Centring each prompt set
    on the base model's means on that set is this project's choice (stage 5's default, which
    scores the base 0.5 everywhere); stage 5's --ua-center passes fixed centres instead.
    """
    if isinstance(ps, torch.Tensor) or isinstance(sc, torch.Tensor):
        ps, sc = torch.as_tensor(ps), torch.as_tensor(sc)
        return 0.5 * torch.sigmoid(ps - mu_ps) + 0.5 * torch.sigmoid(-(sc - mu_sc))
    return 0.5 * _sigmoid(np.subtract(ps, mu_ps)) + 0.5 * _sigmoid(-np.subtract(sc, mu_sc))
