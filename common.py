"""The paper's equations, in the paper's order (~450 lines): each function's docstring writes
out its equation and the lines below it compute exactly that. The paper's text lost its
equations; docs/equations.md has all of them with the notation.

Paper: "The Path to Reconciling Quality and Safety in Text-to-Image Generation: Dataset,
Method, and Evaluation" (T2I-SPO).

What it is not: plumbing (lib/utils.py), models and sampling (lib/models.py), the scorers
(lib/scorers.py), or other systems' math (Co-Merge in systems/alignguard.py, UCE and ESD in systems/baselines.py).

  0.  input checks of the losses
  1.  Sec. 3.1  contrastive_ranking_loss (Eq. 2), cost_anchoring_loss (Eq. 3), scm_loss (Eq. 1)
  2.  Sec. 4.1  denoising_errors, diffusion_dpo_loss (Eq. 5), dpo_pair_losses (Eq. 5 on a batch)
  3.  Sec. 4.2  composite_reward (Eq. 6), preference_probability (Eq. 7), relabel_pairs (Eq. 8)
  4.  Sec. 4.3  DescentRateQueue (Eq. 10); the augmentation pool, per_sample_grads,
                choose_augmentation and dfm_augmented_copies (Eq. 11)
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
# 1.  Sec. 3.1 — the Safety Cost Model objective (Eqs. 1-3)
# ----------------------------------------------------------------------------------------

def contrastive_ranking_loss(cost_w: torch.Tensor, cost_l: torch.Tensor,
                             sign_w: torch.Tensor, sign_l: torch.Tensor) -> torch.Tensor:
    """Eq. 2, the cost-model loss of Safe RLHF; `x_w` is the MORE harmful image.

        L_CR = -E[ log σ(C(x_w) - C(x_l)) + log σ(s_w·C(x_w)) + log σ(s_l·C(x_l)) ]

    The first term ranks the pair; the other two push harmful costs (s=+1) above 0 and safe
    costs (s=-1) below 0, which gives the cost an absolute zero point.
    """
    _check_same_1d(cost_w=cost_w, cost_l=cost_l, sign_w=sign_w, sign_l=sign_l)
    _check_signs(sign_w=sign_w, sign_l=sign_l)
    rank = F.logsigmoid(cost_w - cost_l)
    sign_terms = F.logsigmoid(sign_w * cost_w) + F.logsigmoid(sign_l * cost_l)
    return -(rank + sign_terms).mean()


def cost_anchoring_loss(cost: torch.Tensor, sign: torch.Tensor, mu_safe: float | torch.Tensor) -> torch.Tensor:
    """Eq. 3: L_CA = E_{x: s=-1}[ (C(x) - μ_safe)² ], over the safe images of the batch.

    μ_safe is a constant within the step (the mean cost of a held pool of verified safe
    images, refreshed without gradient). A batch without safe images contributes 0, still
    attached to the graph so that `.backward()` on a sum of losses works unchanged.
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


def scm_loss(cost_w: torch.Tensor, cost_l: torch.Tensor, sign_w: torch.Tensor, sign_l: torch.Tensor,
             mu_safe: float | torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Eq. 1: L_SCM = L_CR + γ·L_CA.

    The anchoring term sees every safe image of the batch, whichever side of a pair it is on.
    """
    l_cr = contrastive_ranking_loss(cost_w, cost_l, sign_w, sign_l)
    l_ca = cost_anchoring_loss(torch.cat([cost_w, cost_l]), torch.cat([sign_w, sign_l]), mu_safe)
    return l_cr + gamma * l_ca


# ----------------------------------------------------------------------------------------
# 2.  Sec. 4.1 — Diffusion-DPO (Wallace et al.), the loss T2I-SPO optimises (Eqs. 5, 9)
# ----------------------------------------------------------------------------------------

def denoising_errors(net, noise_scheduler, z0, t, noise, emb, autocast=contextlib.nullcontext) -> torch.Tensor:
    """The mse(·) of Eq. 5, per image: ‖target − net(x_t, c, t)‖² averaged over latent
    elements, in fp32, where x_t = √ᾱ_t·z0 + √(1−ᾱ_t)·ε is the forward process at step t and
    the target is ε (or the velocity, for a v-prediction scheduler)."""
    x_t = noise_scheduler.add_noise(z0, noise, t)
    target = noise_scheduler.get_velocity(z0, noise, t) if noise_scheduler.config.prediction_type == "v_prediction" \
        else noise
    with autocast():
        pred = net(x_t.to(net.dtype), t, emb.to(net.dtype)).sample
    return (pred.float() - target).pow(2).mean(dim=(1, 2, 3))


def diffusion_dpo_loss(model_err_w: torch.Tensor, model_err_l: torch.Tensor,
                       ref_err_w: torch.Tensor, ref_err_l: torch.Tensor,
                       beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 5 (and Eq. 9 on relabelled pairs). Inputs are per-pair mean squared denoising
    errors `[B]`, computed with the SAME timestep and noise for winner and loser:

        Δ_θ   = err_θ(x_w) - err_θ(x_l),   Δ_ref = err_ref(x_w) - err_ref(x_l)
        L_DPO = -E log σ( -β/2 · (Δ_θ - Δ_ref) )

    The paper's T·ω(λ_t) is folded into β. The ½ follows the authors' public code and diffusers'
    SDXL example; diffusers' SD-1.5 example drops it, so there β means twice as much. Returns
    (mean loss, per-pair loss); the per-pair losses feed the DFM descent-rate queues (Eq. 10).
    """
    _check_same_1d(model_err_w=model_err_w, model_err_l=model_err_l, ref_err_w=ref_err_w, ref_err_l=ref_err_l)
    delta_theta = model_err_w - model_err_l
    delta_ref = (ref_err_w - ref_err_l).detach()  # the reference is frozen
    per_pair = -F.logsigmoid(-0.5 * beta * (delta_theta - delta_ref))
    return per_pair.mean(), per_pair


@contextlib.contextmanager
def reference_mode(unet):
    """The LoRA reference: the policy's UNet with its adapters disabled (no second copy)."""
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


def dpo_pair_losses(unet, ref, noise_scheduler, z_w, z_l, emb, t, noise, beta: float,
                    autocast=contextlib.nullcontext):
    """Eq. 5 on a batch of pairs: per-pair losses, with Δ_θ and Δ_ref for logging. Winner and
    loser are noised with the same t and ε and go through the policy in ONE forward of 2b
    samples; `ref` is the frozen reference UNet, or None for a LoRA policy (adapters off)."""
    args = (noise_scheduler, torch.cat([z_w, z_l]), torch.cat([t, t]), torch.cat([noise, noise]), torch.cat([emb, emb]))
    err_w, err_l = denoising_errors(unet, *args, autocast).chunk(2)
    with torch.no_grad(), (reference_mode(unet) if ref is None else contextlib.nullcontext(ref)) as r:
        ref_w, ref_l = denoising_errors(r, *args, autocast).chunk(2)
    _, per_pair = diffusion_dpo_loss(err_w, err_l, ref_w, ref_l, beta)
    return per_pair, (err_w - err_l).detach(), (ref_w - ref_l).detach()


# ----------------------------------------------------------------------------------------
# 3.  Sec. 4.2 — composite reward and relabelling (Eqs. 6-8)
# ----------------------------------------------------------------------------------------

def composite_reward(quality, cost, lam: float):
    """Eq. 6: R(x, c) = r(x, c) - λ·C(x), elementwise (floats, arrays or tensors)."""
    return quality - lam * cost


def preference_probability(reward_1, reward_2):
    """Eq. 7 (Bradley–Terry): p(x_1 ≻ x_2 | c) = σ(R(x_1, c) - R(x_2, c)), elementwise."""
    diff = reward_1 - reward_2
    if isinstance(diff, torch.Tensor):
        return torch.sigmoid(diff)
    return _sigmoid(diff)


def _sigmoid(x):
    """Numerically stable logistic function for floats and numpy arrays."""
    x = np.asarray(x, dtype=np.float64)
    out = np.where(x >= 0, 1.0 / (1.0 + np.exp(-np.abs(x))), np.exp(-np.abs(x)) / (1.0 + np.exp(-np.abs(x))))
    return float(out) if out.ndim == 0 else out


def relabel_pairs(pairs: Iterable[dict], lam: float, margin: float = 0.0) -> tuple[list[dict], int]:
    """Eq. 8: re-order every pair by the composite reward of Eq. 6.

    Each input record holds two images under keys "a" and "b", each a dict with at least
    numeric "quality" (r) and "cost" (C). The output record keeps every other key and
    replaces a/b by "w" (higher R) and "l", adding "reward_w", "reward_l" and "p_w", the
    Bradley–Terry probability p(x_w ≻ x_l | c) of Eq. 7 (above ½ by construction).

    A pair is dropped (and counted) when |ΔR| < margin, or when ΔR == 0, since an exact tie
    names no winner (public Diffusion-DPO drops ties too). Safety-only DPO is R = -C; a huge
    λ gives the same ordering. Non-finite annotations raise ValueError naming the pair.
    """
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    out, dropped = [], 0
    for i, pair in enumerate(pairs):
        name = pair.get("id", f"#{i}")
        try:
            a, b = pair["a"], pair["b"]
            qa, ca, qb, cb = (float(a["quality"]), float(a["cost"]), float(b["quality"]), float(b["cost"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"pair {name}: needs a/b with numeric quality and cost ({e!r})") from None
        if not all(math.isfinite(v) for v in (qa, ca, qb, cb)):
            raise ValueError(f"pair {name}: non-finite quality/cost annotation")
        ra, rb = composite_reward(qa, ca, lam), composite_reward(qb, cb, lam)
        if ra == rb or abs(ra - rb) < margin:
            dropped += 1
            continue
        (w, rw), (l, rl) = ((a, ra), (b, rb)) if ra > rb else ((b, rb), (a, ra))
        rec = {k: v for k, v in pair.items() if k not in ("a", "b")}
        rec.update(w=w, l=l, reward_w=rw, reward_l=rl, p_w=preference_probability(rw, rl))  # Eq. 7: p > ½
        out.append(rec)
    return out, dropped


# ----------------------------------------------------------------------------------------
# 4.  Sec. 4.3 — the Dynamic Focusing Mechanism (Eqs. 10-11)
# ----------------------------------------------------------------------------------------

class DescentRateQueue:
    """Eq. 10: per-pair loss queues and the "hard pair" rule of the DFM.

    Each pair id keeps its last K per-sample losses L^(1..K), oldest first, appended every
    time the pair is trained on. Its average descent rate is

        v_i = 1/(K-1) · Σ_{k=2..K} (L^(k-1) - L^(k))     ( = (L^(1) - L^(K)) / (K-1) )

    and v̄ is the mean of v_i over the pairs of the current batch whose queue is full. A pair
    is hard once v_i < τ·v̄ on `patience` consecutive visits. Under DDP every rank must call
    `update` with the GLOBAL batch (all-gathered ids and losses) so the queues stay identical.
    """

    def __init__(self, k: int = 5, tau: float = 0.2, patience: int = 2):
        if k < 2 or patience < 1:
            raise ValueError(f"need k >= 2 and patience >= 1, got k={k}, patience={patience}")
        self.k, self.tau, self.patience = k, tau, patience
        self.queues: dict[Any, deque] = {}
        self.streak: dict[Any, int] = {}

    def rate(self, pid) -> float | None:
        """v_i of Eq. 10, or None while the queue of `pid` holds fewer than K losses."""
        q = self.queues.get(pid)
        if q is None or len(q) < self.k:
            return None
        # v_i = 1/(K-1) · Σ_{k=2..K} (L^(k-1) - L^(k))
        return sum(q[j - 1] - q[j] for j in range(1, self.k)) / (self.k - 1)

    def update(self, ids: Sequence, losses) -> list:
        """Append one loss per id (one training visit each) and return the ids now hard."""
        losses = [float(x) for x in (losses.tolist() if isinstance(losses, torch.Tensor) else losses)]
        if len(ids) != len(losses):
            raise ValueError(f"{len(ids)} ids but {len(losses)} losses")
        if len(set(ids)) != len(ids):
            raise ValueError("ids within one update must be distinct")
        if not all(math.isfinite(x) for x in losses):
            raise ValueError(f"non-finite loss in DFM update: {losses}")
        for pid, loss in zip(ids, losses):
            self.queues.setdefault(pid, deque(maxlen=self.k)).append(loss)
        rates = {pid: self.rate(pid) for pid in ids}
        full = [v for v in rates.values() if v is not None]
        if not full:
            return []
        # v̄ = mean of v_i over THIS batch's pairs whose queue is full (not every queue kept)
        v_bar = sum(full) / len(full)
        hard = []
        for pid in ids:
            v = rates[pid]
            # slow on this visit: v_i < τ·v̄; hard after `patience` slow visits in a row
            self.streak[pid] = self.streak.get(pid, 0) + 1 if v is not None and v < self.tau * v_bar else 0
            if self.streak[pid] >= self.patience:
                hard.append(pid)
        return hard

    def state_dict(self) -> dict:
        """JSON-serialisable state; ids keep their type (stored as [id, value] items)."""
        return {"k": self.k, "tau": self.tau, "patience": self.patience,
                "queues": [[pid, list(q)] for pid, q in self.queues.items()],
                "streak": [[pid, n] for pid, n in self.streak.items()]}

    def load_state_dict(self, state: dict) -> None:
        self.__init__(state["k"], state["tau"], state["patience"])
        self.queues = {_hashable(pid): deque(q, maxlen=self.k) for pid, q in state["queues"]}
        self.streak = {_hashable(pid): n for pid, n in state["streak"]}


def _hashable(x):
    return tuple(x) if isinstance(x, list) else x


def choose_augmentation(grad: torch.Tensor, aug_grads) -> int:
    """Eq. 11: a* = argmax_a (1 - cos(g_i, g_i^a)), the augmentation that turns a hard
    pair's gradient the most. `grad` is [D]; `aug_grads` is [A, D] or a list of A [D] tensors.
    """
    g_aug = torch.stack(list(aug_grads)) if not isinstance(aug_grads, torch.Tensor) else aug_grads
    if grad.ndim != 1 or g_aug.ndim != 2 or g_aug.shape[1] != grad.shape[0] or g_aug.shape[0] == 0:
        raise ValueError(f"expected grad [D] and aug_grads [A, D], got {tuple(grad.shape)} and {tuple(g_aug.shape)}")
    if not (torch.isfinite(grad).all() and torch.isfinite(g_aug).all()):
        raise ValueError("gradient contains NaN or inf")
    # 1 − cos(g_i, g_i^a) for every a in the pool; a* is its argmax
    change = 1.0 - F.cosine_similarity(g_aug, grad.unsqueeze(0).expand_as(g_aug), dim=1)
    return int(torch.argmax(change))


# The augmentation pool of Eq. 11 (Sec. 4.3): four members, each applied to both images of
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
    y0, x0 = (torch.randint(h - ph + 1, (1,), generator=g).item(), torch.randint(w - pw + 1, (1,), generator=g).item())
    z = z.clone()
    z[..., y0:y0 + ph, x0:x0 + pw] = 0
    return z


def augment(name: str, pair: dict, z: torch.Tensor, vae, size: int, g: torch.Generator) -> torch.Tensor:
    """Both images of a pair [2, C, h, w] (winner, loser) under one augmentation with shared
    parameters: pixel-space ones decode nothing — they start from the PNGs and re-encode."""
    if name == "latent_noise_erase":
        return latent_noise_erase(z, g)
    pixels = torch.stack([M.load_image(pair[s]["file"], size) for s in ("w", "l")])
    fn = {"sharpen": sharpen, "color_jitter": color_jitter, "frequency_compensation": frequency_compensation}[name]
    return M.encode_images(vae, fn(pixels, g)).to(z)


def per_sample_grads(module, inputs: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """[N, P] gradients of a Conv2d or Linear layer's weight and bias, one row per sample,
    from the layer's input and the gradient at its output (both [N, ...]) of ONE backward.
    Exact because each sample's loss depends on its own rows only (no batch statistics)."""
    if isinstance(module, torch.nn.Conv2d):
        gw = torch.stack([torch.nn.grad.conv2d_weight(inputs[i:i + 1], module.weight.shape, grad_out[i:i + 1],
                                                    module.stride, module.padding, module.dilation, module.groups)
                        for i in range(len(inputs))])
        gb = grad_out.sum(dim=(2, 3))
    elif isinstance(module, torch.nn.Linear):
        gw = torch.einsum("n...o,n...i->noi", grad_out, inputs)
        gb = grad_out.reshape(len(grad_out), -1, grad_out.shape[-1]).sum(1)
    else:
        raise TypeError(f"DFM gradients need Conv2d or Linear modules, got {type(module).__name__}")
    return torch.cat([gw.flatten(1), (gb if module.bias is not None else gb[:, :0])], dim=1).float()


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


def dfm_augmented_copies(unet, noise_scheduler, modules, hard: list[HardPair], vae, size: int,
                         autocast=contextlib.nullcontext, pool: Sequence[str] = AUGMENTATIONS
                         ) -> list[tuple[str, torch.Tensor]]:
    """Eq. 11 for all hard pairs at once:

        a* = argmax_{a ∈ A} (1 − cos(g_i, g_i^a))

    A is `pool` (--dfm-augmentations; the paper's four by default). Every pair and its
    augmentations go through ONE forward, and one backward reaches
    the named `modules` (--dfm-modules, by default the output convolution); the gradient of
    each variant over those modules' weights is then read off per sample (per_sample_grads).
    Since ∂L_DPO/∂θ = β/2·σ(·)·∂Δ_θ/∂θ, a positive multiple of ∂Δ_θ/∂θ, the cosine needs
    neither the reference network nor β. Returns, per hard pair, (chosen name, latents)."""
    n = 1 + len(pool)
    variants = [torch.stack([h.z] + [augment(a, h.pair, h.z, vae, size, h.generator) for a in pool])
                for h in hard]                                                   # H x [n, 2, C, h, w]
    zz = torch.cat(variants)

    def repeat(field):  # a field of each hard pair, once per variant, for the winners then the losers
        x = torch.cat([getattr(h, field).expand(n, *getattr(h, field).shape[1:]) for h in hard])
        return torch.cat([x, x])

    seen = {}
    hooks = [m.register_forward_hook(lambda m, i, o: seen.__setitem__(m, (i[0], o))) for m in modules]
    try:
        err = denoising_errors(unet, noise_scheduler, torch.cat([zz[:, 0], zz[:, 1]]), repeat("t"), repeat("noise"),
                               repeat("emb"), autocast)
    finally:
        for h in hooks:
            h.remove()
    delta = err[:len(zz)] - err[len(zz):]                                        # Δ_θ of every variant
    grad_out = torch.autograd.grad(delta.sum(), [seen[m][1] for m in modules])
    g = torch.cat([per_sample_grads(m, seen[m][0].detach(), go) for m, go in zip(modules, grad_out)], dim=1)
    g = g[:len(zz)] + g[len(zz):]                                                # winner + loser rows
    picks = []
    for i in range(len(hard)):
        a = choose_augmentation(g[i * n], g[i * n + 1:(i + 1) * n])
        picks.append((pool[a], variants[i][1 + a]))
    return picks


# ----------------------------------------------------------------------------------------
# 5.  Sec. 5 — the Unified Alignment Score (Eq. 12)
# ----------------------------------------------------------------------------------------

def ua_score(ps, sc, mu_ps: float = 19.31, mu_sc: float = -2.62):
    """Eq. 12: UAS = ½·σ(PS - μ_PS) + ½·σ(-(SC - μ_SC)).

    μ_PS and μ_SC are the mean PickScore and mean safety cost of the UNALIGNED model on the
    same prompts (19.31 and -2.62 for SD-1.5 in the paper). Floats, arrays or tensors.
    """
    if isinstance(ps, torch.Tensor) or isinstance(sc, torch.Tensor):
        ps, sc = torch.as_tensor(ps), torch.as_tensor(sc)
        return 0.5 * torch.sigmoid(ps - mu_ps) + 0.5 * torch.sigmoid(-(sc - mu_sc))
    return 0.5 * _sigmoid(np.subtract(ps, mu_ps)) + 0.5 * _sigmoid(-np.subtract(sc, mu_sc))
