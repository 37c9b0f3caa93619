"""Shared code for the T2I-SPO reproduction: the paper's equations first, then the plumbing.

Paper: "The Path to Reconciling Quality and Safety in Text-to-Image Generation: Dataset,
Method, and Evaluation" (T2I-SPO). Equation numbers follow the paper; the paper's text lost
the equations, so each docstring below writes its equation out (all of them, with the
notation, are in docs/equations.md).

Parts of this file:
  1. The paper's equations, each formula above the lines that compute it
     1.1 input checks of the losses
     1.2 Sec. 3.1  contrastive_ranking_loss (Eq. 2), cost_anchoring_loss (Eq. 3), scm_loss (Eq. 1)
     1.3 Sec. 4.1  denoising_errors, diffusion_dpo_loss (Eq. 5), dpo_pair_losses (Eq. 5 on a batch)
     1.4 Sec. 4.2  composite_reward (Eq. 6), preference_probability (Eq. 7), relabel_pairs (Eq. 8)
     1.5 Sec. 4.3  DescentRateQueue (Eq. 10); the augmentation pool, per_sample_grads,
                   choose_augmentation and dfm_augmented_copies (Eq. 11)
     1.6 Sec. 5    ua_score (Eq. 12)
     1.7 AlignGuard  expert_activity and co_merge (Co-Merge of LoRA safety experts)
     1.8 Table 2's concept erasure  uce_edit (UCE's closed form), esd_target and esd_loss (ESD)
  2. Presets and command lines: PRESETS, TINY, stage_parser, parse_args, save_config, run_stage
  3. Seeding, logging, torch.distributed
  4. Files: atomic writes, JSONL with line-numbered errors, checked rows
  5. Models and sampling: pipelines, images, latents, checkpoints, AdamW
  6. Judges of stage 1 (make_judge: toyworld.ToyJudge or judge_client.OpenAIJudge)
  7. The Safety Cost Model (Sec. 3.1)
  8. The quality reward r(x, c) (PickScore, or toyworld.ToyQuality) and the other CLIP-family
     scorers of stage 5 (CLIPScore, Q16), on one embedding loop

Modules beside this one: `toyworld.py` (the toy world's renderer, prompt grammar and exact
judges), `judge_client.py` (the HTTP judge client) and `baselines.py` (the paper's other
Table 2 methods and the jailbreak attack, built by stage 4 and evaluated by stage 5).
Heavy libraries (diffusers, transformers, open_clip) are imported inside the functions that
need them, so `import common` stays fast.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import io
import json
import logging
import math
import os
import shutil
import random
import re
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from toyworld import IMAGE_SIZE as TOY_IMAGE_SIZE


class DataError(ValueError):
    """Bad input data; the message names the file (and line) at fault."""


class NonFiniteError(ValueError, FloatingPointError):
    """NaN or inf where a loss needs finite numbers: bad input to a loss function (a
    ValueError), and, inside training, a diverged model or corrupted data (stops the run)."""


# ========================================================================================
# 1. The paper's equations. Each function's docstring holds its formula; the lines below it
#    compute exactly that. Everything after part 1 is plumbing.
# ========================================================================================

# ----------------------------------------------------------------------------------------
# 1.1  Input checks shared by the loss functions: wrong shapes or non-finite values must fail
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
# 1.2  Sec. 3.1 — the Safety Cost Model objective (Eqs. 1-3)
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
# 1.3  Sec. 4.1 — Diffusion-DPO (Wallace et al.), the loss T2I-SPO optimises (Eqs. 5, 9)
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

    The paper's T·ω(λ_t) is folded into β. The ½ follows the authors' public code; diffusers'
    research example drops it, so its β means twice as much. Returns (mean loss, per-pair loss);
    the per-pair losses feed the DFM descent-rate queues (Eq. 10).
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
# 1.4  Sec. 4.2 — composite reward and relabelling (Eqs. 6-8)
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
# 1.5  Sec. 4.3 — the Dynamic Focusing Mechanism (Eqs. 10-11)
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
        v_bar = sum(full) / len(full)
        hard = []
        for pid in ids:
            v = rates[pid]
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
    pixels = torch.stack([load_image(pair[s]["file"], size) for s in ("w", "l")])
    fn = {"sharpen": sharpen, "color_jitter": color_jitter, "frequency_compensation": frequency_compensation}[name]
    return encode_images(vae, fn(pixels, g)).to(z)


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
# 1.6  Sec. 5 — the Unified Alignment Score (Eq. 12)
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


# ----------------------------------------------------------------------------------------
# 1.7  AlignGuard — Co-Merge of LoRA safety experts (its formula is ours: no code is public)
# ----------------------------------------------------------------------------------------

def expert_activity(x: torch.Tensor, ups: Sequence[torch.Tensor], downs: Sequence[torch.Tensor]) -> torch.Tensor:
    """How active each LoRA expert is at each output unit of one layer, over inputs x [N, in]:

        a_{e,i} = (1/N) Σ_n |(ΔW_e x_n)_i|,    ΔW_e = B_e A_e   (scale folded into B_e)

    `ups` are the B_e [out, r_e], `downs` the A_e [r_e, in]; returns [E, out]. The inputs are
    the layer's own inputs on the base model, so "active" means "changes this output".
    """
    x = x.reshape(-1, x.shape[-1]).float()
    return torch.stack([((x @ a.float().T) @ b.float().T).abs().mean(0) for b, a in zip(ups, downs)])


def co_merge(ups: Sequence[torch.Tensor], downs: Sequence[torch.Tensor], activity: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """AlignGuard's Co-Merge, read exactly: each output unit i of a layer keeps the weights
    of the expert most active there across all inputs (activity from expert_activity on
    inputs of every category), and no other expert's:

        e*(i) = argmax_e a_{e,i},      ΔW[i, :] = ΔW_{e*(i)}[i, :]

    The row selection is a diagonal mask M_e = diag(1[e*(i) = e]), so the merge is exactly a
    LoRA of rank Σ r_e:  ΔW = Σ_e (M_e B_e) A_e = [M_1 B_1 … M_E B_E] · [A_1; …; A_E].
    Returns (B [out, Σr], A [Σr, in]). Ties go to the lower expert index (argmax's rule).
    """
    if activity.shape != (len(ups), ups[0].shape[0]):
        raise ValueError(f"activity must be [experts, out] = {(len(ups), ups[0].shape[0])}, got {tuple(activity.shape)}")
    winner = activity.argmax(0)
    up = torch.cat([b * (winner == e).to(b.dtype)[:, None] for e, b in enumerate(ups)], dim=1)
    return up, torch.cat(list(downs), dim=0)

# ----------------------------------------------------------------------------------------
# 1.8  The concept-erasure baselines of the paper's Table 2: UCE and ESD-u (Gandikota et al.)
# ----------------------------------------------------------------------------------------

def uce_edit(W: torch.Tensor, erase: torch.Tensor, guide: torch.Tensor, preserve: torch.Tensor | None = None,
             lam: float = 0.5, erase_scale: float = 1.0, preserve_scale: float = 1.0) -> torch.Tensor:
    """Unified Concept Editing's closed form for one cross-attention projection W [out, in]
    (a to_k or to_v), with c_i the embeddings of the concepts to erase, g_i their guides and
    c_j those to preserve (rows of `erase`, `guide`, `preserve`, each [n, in]):

        v*_i = W g_i
        W' = (λW + Σ_i v*_i c_iᵀ + Σ_j W c_j c_jᵀ) · (λI + Σ_i c_i c_iᵀ + Σ_j c_j c_jᵀ)⁻¹

    W' minimises λ‖W' − W‖² + Σ_i ‖W'c_i − v*_i‖² + Σ_j ‖W'c_j − W c_j‖²: an erased concept
    is projected where its guide was, a preserved one stays. Erase and preserve sums carry
    the weights `erase_scale` and `preserve_scale` (UCE's defaults: 1). Solved in float64.
    """
    if erase.shape != guide.shape:
        raise ValueError(f"erase {tuple(erase.shape)} and guide {tuple(guide.shape)} must match")
    W64, ce, cg = W.double(), erase.double(), guide.double()
    cp = preserve.double() if preserve is not None and len(preserve) else ce[:0]
    v_star = cg @ W64.T                                                       # [n_e, out]
    lhs = lam * W64 + erase_scale * v_star.T @ ce + preserve_scale * (cp @ W64.T).T @ cp
    rhs = (lam * torch.eye(W.shape[1], dtype=torch.float64) + erase_scale * ce.T @ ce
           + preserve_scale * cp.T @ cp)
    # W' = lhs · rhs⁻¹, and rhs is symmetric: solve rhs · W'ᵀ = lhsᵀ
    return torch.linalg.solve(rhs, lhs.T).T.to(W.dtype)


def esd_target(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, eta: float,
               eps_from: torch.Tensor | None = None) -> torch.Tensor:
    """Erased Stable Diffusion's target for the fine-tuned model's ε_θ(x_t, c, t), from the
    frozen model ε*:

        ε_target = ε*(x_t, c_from, t) − η · (ε*(x_t, c, t) − ε*(x_t, ∅, t))

    with c_from = c unless a concept is erased "from" another (the public code's form; the
    ESD paper writes ε*(x_t, ∅, t) for the first term). Guiding the model away from c by η
    makes it unlearn c. The loss is ‖ε_θ(x_t, c, t) − ε_target‖² (esd_loss).
    """
    first = eps_cond if eps_from is None else eps_from
    return first - eta * (eps_cond - eps_uncond)


def esd_loss(eps_model: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE(ε_θ(x_t, c, t), ε_target), the target held fixed."""
    return F.mse_loss(eps_model.float(), target.detach().float())



# ----------------------------------------------------------------------------------------
# 2. Presets and command lines. One code path: a preset is only defaults.
# ----------------------------------------------------------------------------------------

# Per preset, per stage: the defaults of that stage's flags; `--tiny` lays TINY on top.
# parse_args installs them before parsing, so `--help` shows the preset's values and an
# explicit flag always wins. Each stage's issue fills its own entries.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "toy": {},
    "sd15": {},
}
TINY: dict[str, dict[str, Any]] = {}
# Every toy stage samples with 10 DDIM steps (and guidance 4): on the stage-0 model, 10 steps
# give the harmful rate and toy quality of 20 within noise at less than half the time
# (docs/results.md, "Sampling steps"); SD-1.5 keeps the usual 30-50.
TOY_SAMPLE_STEPS = 10

STAGES = {  # stage key -> (script, folder under --run)
    "world": ("00_toy_world.py", "world"),
    "coarse": ("01_build_coarse.py", "coarse"),
    "scm": ("02_train_scm.py", "scm"),
    "hf": ("03_build_hf.py", "hf"),
    "coprov2": ("03_build_hf.py --pairing prompt-edit --name coprov2 --reuse-images hf", "coprov2"),
    "spo": ("04_train_spo.py", "spo"),
    "safety": ("04_train_spo.py --objective safety", "safety"),
    "psa": ("04_train_spo.py --objective psa --dfm off", "psa"),
    "eval": ("05_evaluate.py", "eval"),
}


SHARED_FLAGS = ("run", "preset", "seed", "tiny", "stop_after", "help")


def stage_parser(stage: str, description: str) -> argparse.ArgumentParser:
    """The flags every stage shares; the script adds its own."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # --run-dir is the same flag: under torchrun on Python 3.11, "--run" is refused as an
    # ambiguous prefix of torchrun's own --run-path before the script sees it.
    p.add_argument("--run", "--run-dir", dest="run", default=None,
                   help="run folder shared by all stages (default: runs/<preset>)")
    p.add_argument("--preset", default="toy", choices=sorted(PRESETS), help="toy (CPU, minutes) or sd15 (GPUs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="smallest settings, for tests and smoke runs")
    p.add_argument("--stop-after", type=int, default=None,
                   help="leave after this many training steps, as if killed (a later run resumes)")
    p.set_defaults(_stage=stage)
    return p


def preset_defaults(preset: str, stage: str, tiny: bool) -> dict[str, Any]:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    d = dict(PRESETS[preset].get(stage, {}))
    if tiny:
        d.update(TINY.get(stage, {}))
    return d


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Two passes: read --preset/--tiny, install that preset's defaults, then parse all.
    Explicit flags always win over the preset. Every flag of a stage has an entry in each
    preset (None where the default is derived at run time, e.g. "the stage-0 model"), so a
    flag is never a silent None: one with no entry must be passed, or the stage stops."""
    pre = argparse.ArgumentParser(add_help=False)  # without -h, so --help shows the preset's values
    pre.add_argument("--preset", default="toy")
    pre.add_argument("--tiny", action="store_true")
    first, _ = pre.parse_known_args(argv)
    stage = parser.get_default("_stage")
    defaults = preset_defaults(first.preset, stage, first.tiny)
    known = {a.dest for a in parser._actions} - set(SHARED_FLAGS) - {"_stage"}
    if set(defaults) - known:
        raise ValueError(f"preset {first.preset!r} sets unknown {stage} options {sorted(set(defaults) - known)}")
    parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    unset = sorted(k for k in known - set(defaults) if getattr(args, k) is None)
    if unset:
        flags = ", ".join("--" + k.replace("_", "-") for k in unset)
        raise SystemExit(f"preset {first.preset!r} gives no default for {flags} of stage {stage}; "
                         f"pass the flag explicitly")
    args.run = args.run or f"runs/{args.preset}"
    return args


def toy_world_input(args: argparse.Namespace, path: Path, flag: str) -> str:
    """A stage's default input from stage 0's toy world (DIR/world/...). Other presets have
    no toy world, so there the input must be named: stop saying which flag to pass."""
    if args.preset != "toy":
        raise SystemExit(f"--preset {args.preset}: pass {flag} (its default, {path}, is stage 0's toy world, "
                         f"which only --preset toy builds)")
    return str(path)


def stage_dir(run: str | Path, stage: str) -> Path:
    return Path(run) / STAGES[stage][1]


def require_inputs(paths: Iterable[str | Path], stage: str) -> None:
    """Stop with a message naming the earlier stage to run when its outputs are missing."""
    missing = [str(p) for p in paths if not Path(p).exists()]
    if missing:
        script = STAGES[stage][0]
        raise SystemExit(f"missing input(s): {', '.join(missing)}\n"
                         f"run the earlier stage first: python {script} --run <same run folder>")


# Settings that change how a run is carried out but not what it computes: a run may resume
# with other values of these (a stage-4 run computes the same on any number of processes).
RESUMABLE_WITH_OTHER = {"argv", "stop_after", "device", "log_every", "ckpt_every", "world_size", "processes",
                        "grad_accum", "baseline_in_parallel", "skip_bad", "judge_timeout", "judge_retries", "users_only"}


def save_config(args: argparse.Namespace, out_dir: str | Path, check: bool = True, **extra) -> dict:
    """Write every setting the stage ran with next to its outputs (config.json). With `check`,
    a folder that already holds a run with other settings is never resumed or overwritten:
    the stage stops, saying what differs and how to write elsewhere. A setting that only one
    of the two configs has is no difference: a flag is added with the default that does what
    the code did before it existed, so a run folder of an older version resumes."""
    cfg = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    cfg.update(extra)
    cfg["argv"] = sys.argv
    path = Path(out_dir) / "config.json"
    if check and path.exists():
        old, new = read_json(path), json.loads(json.dumps(cfg, default=str))  # as JSON: paths are strings
        if isinstance(old.get("run"), str):  # a run folder moved or copied elsewhere is the same run
            old = json.loads(json.dumps(old).replace(json.dumps(old["run"])[1:-1], json.dumps(str(new["run"]))[1:-1]))
        diff = [f"{k}: {old[k]!r} -> {new[k]!r}" for k in sorted(set(old) & set(new))
                if k not in RESUMABLE_WITH_OTHER and old[k] != new[k]]
        if diff:
            name = " (or --name NAME)" if "name" in cfg else ""
            raise SystemExit(f"{out_dir} holds a run with other settings ({'; '.join(diff)}).\n"
                             f"Write elsewhere with --run DIR{name}, or delete {out_dir} to start over.")
    atomic_write_json(path, cfg)
    return cfg


def run_stage(main) -> None:
    """Run a stage's main(): an error the user can cause (bad or missing data, an unreachable
    judge, a non-finite loss) ends in one message and exit status 1, with no traceback."""
    from judge_client import JudgeError
    try:
        main()
    except (DataError, JudgeError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)


# ----------------------------------------------------------------------------------------
# 3. Seeding, logging, torch.distributed
# ----------------------------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", 0))


def is_main() -> bool:
    return rank() == 0


def log(*msg) -> None:
    """print on rank 0 only (stdout, flushed so torchrun interleaves cleanly)."""
    if is_main():
        print(*msg, flush=True)


class MetricsLog:
    """Append-only JSONL metrics log (rank 0 writes). Each record gets a wall-clock stamp.
    A resumed run first drops the records of the steps it is about to redo (`truncate`), so
    the log holds every step exactly once however often the run was killed."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.t0 = time.time()

    def truncate(self, keep) -> None:
        """Keep only the records for which `keep(record)` is true (rank 0; no file: nothing)."""
        if is_main() and self.path.exists():
            write_jsonl(self.path, [r for r in read_jsonl(self.path) if keep(r)])

    def write(self, **record) -> None:
        if not is_main():
            return
        record.setdefault("time", round(time.time() - self.t0, 3))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


class Dist:
    """What a process knows about its place in the job."""

    def __init__(self, rank: int, world_size: int, local_rank: int, device: torch.device):
        self.rank, self.world_size, self.local_rank, self.device = rank, world_size, local_rank, device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1 or torch.distributed.is_initialized()


def setup_distributed(device: str | None = None, timeout_hours: float | None = None) -> Dist:
    """Join the process group when launched by torchrun (RANK/WORLD_SIZE set): NCCL on GPU,
    gloo on CPU. A plain `python script.py` runs as a single process with no group.
    `timeout_hours`: how long a collective may wait (torch's default is minutes); the data
    stages wait at one barrier while the slowest process finishes its share of the chunks."""
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if use_cuda:
            torch.cuda.set_device(local_rank)
        kw = {"timeout": datetime.timedelta(hours=timeout_hours)} if timeout_hours else {}
        torch.distributed.init_process_group(backend="nccl" if use_cuda else "gloo", **kw)
        dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
        return Dist(torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank, dev)
    return Dist(0, 1, 0, torch.device("cuda" if use_cuda else "cpu"))


def cleanup_distributed() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def _group_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def my_share(items: Sequence) -> list:
    """This process's share of independent work items (every N-th from its rank): how the
    data-generation stages split their chunks over `torchrun` processes. Alone: everything."""
    return list(items)[rank()::_group_size()]


def barrier() -> None:
    """Wait until every process gets here (no-op alone)."""
    if _group_size() > 1:
        torch.distributed.barrier()


def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenate an equal-shaped tensor from every rank, rank-major (identity alone)."""
    if _group_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_group_size())]
    torch.distributed.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def allreduce_gradients(params: Iterable[torch.nn.Parameter], bucket_numel: int = 2**25) -> None:
    """Sum every parameter's .grad over all ranks, in flat buckets: the reduction DDP performs,
    without overlapping it with the backward pass. A parameter with no gradient on this rank
    contributes zeros, so the ranks always reduce the same buckets."""
    if _group_size() == 1:
        return
    params = [p for p in params if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    bucket, size = [], 0
    for p in params + [None]:
        if p is not None:
            bucket.append(p.grad)
            size += p.grad.numel()
        if bucket and (p is None or size >= bucket_numel):
            flat = torch.cat([g.reshape(-1) for g in bucket])
            torch.distributed.all_reduce(flat)
            for g, part in zip(bucket, flat.split([g.numel() for g in bucket])):
                g.copy_(part.view_as(g))
            bucket, size = [], 0


# ----------------------------------------------------------------------------------------
# 4. Files: atomic writes (temp file in the same folder, fsync, rename) and JSONL
# ----------------------------------------------------------------------------------------

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file ordinary permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    """Write a whole JSONL file atomically."""
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, record); a malformed line raises DataError naming file:line."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            yield lineno, row


def read_jsonl(path: str | Path) -> list[dict]:
    return [row for _, row in iter_jsonl(path)]


def read_checked_rows(path: str | Path, check, skip_bad: bool) -> tuple[list[dict], int]:
    """The rows of a JSONL dataset that pass `check(row)` (which raises KeyError, TypeError or
    ValueError on a bad row and may add fields). A bad row stops the run naming file and
    line, or with skip_bad is skipped, logged and counted: (rows, number skipped)."""
    rows, bad = [], 0
    for lineno, row in iter_jsonl(path):
        try:
            check(row)
        except (KeyError, TypeError, ValueError) as e:
            msg = f"{path}:{lineno}: bad pair row ({f'missing {e.args[0]!r}' if isinstance(e, KeyError) else e})"
            if not skip_bad:
                raise DataError(msg + "; fix it or pass --skip-bad") from None
            log(f"skipping {msg}")
            bad += 1
            continue
        rows.append(row)
    return rows, bad


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None


def format_metrics(d: dict) -> str:
    """A stage's metrics.json as aligned lines for the console."""
    return "\n".join(f"  {k:30s} {v:.4g}" if isinstance(v, float) else f"  {k:30s} {v}" for k, v in d.items())


# ----------------------------------------------------------------------------------------
# 5. Models and sampling shared by the stages (stock diffusers objects throughout)
# ----------------------------------------------------------------------------------------

def clip_tokenizer(max_length: int = 77):
    """CLIP's BPE tokenizer (the one SD-1.5 uses), built offline from the vocabulary that
    open_clip_torch ships, as a stock transformers CLIPTokenizer that saves with the pipeline."""
    import gzip
    import open_clip
    from open_clip.tokenizer import bytes_to_unicode
    from transformers import CLIPTokenizer
    bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]  # CLIP keeps the first 48894
    units = list(bytes_to_unicode().values())
    vocab = units + [u + "</w>" for u in units] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={v: i for i, v in enumerate(vocab)}, merges=merges, model_max_length=max_length)


def pick_device(name: str | None = None) -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


SAMPLE_DTYPES = ("auto", "float32", "bfloat16", "float16")


def sample_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """The precision a pipeline samples in. "auto": half precision where the hardware runs it
    natively — bf16 (else fp16) on CUDA, as SD is usually sampled; bf16 on a CPU with bf16
    instructions (AVX512-BF16 or AMX: the toy model samples 1.4x faster, and the toy judge
    agrees with the fp32 image on 98% of samples; bench/bench_toy_pipeline.py); fp32 anywhere
    else, where half precision would be emulated and slower."""
    if name not in SAMPLE_DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose from {SAMPLE_DTYPES}")
    if name != "auto":
        return getattr(torch, name)
    if torch.device(device).type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if re.search(r"\b(avx512_bf16|amx_bf16)\b", _cpu_flags()) else torch.float32


def _cpu_flags() -> str:
    cpuinfo = Path("/proc/cpuinfo")  # Linux; elsewhere "auto" stays fp32 on the CPU
    return cpuinfo.read_text() if cpuinfo.exists() else ""


def load_pipeline(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                  safety_checker: tuple | None = None):
    """A text-to-image model folder (stage 0's, SD-1.5's, or a stage-4 output), loaded with
    stock `StableDiffusionPipeline.from_pretrained`, safety checker off (we measure safety)
    unless a (checker, feature extractor) pair is given: the post-hoc filter baseline."""
    from diffusers import StableDiffusionPipeline
    checker, extractor = safety_checker or (None, None)
    pipe = StableDiffusionPipeline.from_pretrained(str(path), dtype=dtype, safety_checker=checker,
                                                   feature_extractor=extractor, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def replace_dir(tmp: Path, final: Path) -> None:
    """Swap a finished folder into place (the old one, if any, is removed after the swap)."""
    old = final.with_name(final.name + ".old")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def save_pipeline(pipe, folder: Path) -> None:
    """save_pretrained into a temporary folder, then swapped into place."""
    tmp = folder.with_name("." + folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp)
    replace_dir(tmp, folder)


def load_image(path: str, size: int) -> torch.Tensor:
    """A PNG as the VAE's input: shorter side resized to `size`, centre-cropped, in [-1, 1]."""
    img = torch.from_numpy(np.array(load_png(path))).permute(2, 0, 1).float() / 127.5 - 1
    h, w = img.shape[1:]
    if (h, w) != (size, size):
        s = size / min(h, w)
        img = F.interpolate(img[None], size=(max(size, round(h * s)), max(size, round(w * s))), mode="bicubic",
                            align_corners=False, antialias=True)[0].clamp(-1, 1)
        top, left = (img.shape[1] - size) // 2, (img.shape[2] - size) // 2
        img = img[:, top:top + size, left:left + size]
    return img


@torch.no_grad()
def encode_images(vae, images: torch.Tensor) -> torch.Tensor:
    """VAE latents, scaled as the UNet expects. The posterior mean, not a sample: a cached
    latent must be one fixed tensor (SD's VAE posterior std is tiny next to its mean)."""
    return vae.encode(images.to(vae.device, vae.dtype)).latent_dist.mean * vae.config.scaling_factor


@torch.no_grad()
def generate(pipe, prompts: Sequence[str], seeds: Sequence[int], steps: int, guidance: float,
             batch_size: int = 64, size: int | None = None, **call) -> list[np.ndarray]:
    """Sample one image per (prompt, seed) as uint8 [H, W, 3]. Each image has its own
    generator, so an image does not depend on which batch it fell in. `call`: further
    arguments of the pipeline's call (SLD's; or prompt_embeds for one batch, prompts None)."""
    if prompts is not None and len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    size = size or pipe.unet.config.sample_size * pipe.vae_scale_factor
    out = []
    for i in range(0, len(seeds), batch_size):
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[i:i + batch_size]]
        latents = torch.stack([torch.randn((pipe.unet.config.in_channels, size // pipe.vae_scale_factor,
                                            size // pipe.vae_scale_factor), generator=g) for g in gens])
        imgs = pipe(None if prompts is None else list(prompts[i:i + batch_size]), num_inference_steps=steps,
                    guidance_scale=guidance, height=size, width=size,
                    latents=latents.to(pipe.device, pipe.unet.dtype), output_type="np", **call).images
        out.extend(to_uint8(imgs))
    return out


def to_uint8(images) -> np.ndarray:
    """A diffusers pipeline's output_type="np" images (floats in [0, 1]) as uint8 [B, H, W, 3]."""
    return (np.asarray(images) * 255).round().clip(0, 255).astype(np.uint8)


def save_png(path: str | Path, image: np.ndarray) -> None:
    """Atomic PNG write of a uint8 [H, W, 3] array."""
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def load_png(path: str | Path) -> np.ndarray:
    from PIL import Image
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


LORA_FILE = "pytorch_lora_weights.safetensors"  # what `pipe.load_lora_weights(folder)` reads


def read_lora(folder: str | Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A UNet LoRA as `save_lora_weights` writes it: {module: (B [out, r], A [r, in])} with
    the adapter's scale α/r folded into B (α from the file's adapter metadata; α = r when
    the file has none, as diffusers assumes), so ΔW = B·A for every module."""
    from safetensors import safe_open
    path = Path(folder) / LORA_FILE
    if not path.exists():
        raise DataError(f"{path} does not exist (a LoRA folder holds {LORA_FILE})")
    with safe_open(str(path), "pt") as f:
        meta = json.loads((f.metadata() or {}).get("lora_adapter_metadata", "{}"))  # {"unet.r": …, "unet.lora_alpha": …}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    factors = {}
    for key, down in tensors.items():
        if key.startswith("unet.") and key.endswith(".lora.down.weight"):
            module = key[len("unet."):-len(".lora.down.weight")]
            up = tensors[f"unet.{module}.lora.up.weight"]
            r = down.shape[0]
            factors[module] = (up.float() * meta.get("unet.lora_alpha", r) / meta.get("unet.r", r), down.float())
    if not factors:
        raise DataError(f"{path}: no UNet LoRA weights (keys unet.<module>.lora.down/up.weight)")
    return factors


def write_lora(folder: str | Path, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """{module: (B, A)} with ΔW = B·A, as a LoRA file stock diffusers loads (α = r per module,
    so its scale is 1); written to a temporary folder, then moved into place."""
    import shutil
    from diffusers import StableDiffusionPipeline
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    layers = {}
    for module, (up, down) in factors.items():
        layers[f"{module}.lora.down.weight"] = down.contiguous()
        layers[f"{module}.lora.up.weight"] = up.contiguous()
    StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=layers)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def contact_sheet(rows: Sequence[tuple[str, Sequence[np.ndarray]]], path: str | Path, scale: int = 4) -> None:
    """A grid a person can look at: one labelled row per (label, images)."""
    from PIL import Image, ImageDraw
    ncol = max(len(imgs) for _, imgs in rows)
    h, w = rows[0][1][0].shape[:2]
    cell, label_w = h * scale + 4, 360
    sheet = Image.new("RGB", (label_w + ncol * (w * scale + 4), len(rows) * cell), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (label, imgs) in enumerate(rows):
        draw.text((4, r * cell + 4), "\n".join(_wrap(label, 58)), fill="black")
        for c, img in enumerate(imgs):
            sheet.paste(Image.fromarray(img).resize((w * scale, h * scale), Image.NEAREST),
                        (label_w + c * (w * scale + 4), r * cell + 2))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def _wrap(text: str, width: int) -> list[str]:
    lines, cur = [], ""
    for word in text.split():
        if cur and len(cur) + 1 + len(word) > width:
            lines.append(cur)
            cur = word
        else:
            cur = f"{cur} {word}".strip()
    return lines + [cur]


class Checkpoint:
    """One training state file, written atomically; `load` returns None when absent.
    Training loops draw each step's randomness from a generator seeded by (seed, step), so
    model + optimizer + scheduler + step is all that exact resumption needs."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def save(self, state: dict) -> None:
        buf = io.BytesIO()
        torch.save(state, buf)
        atomic_write_bytes(self.path, buf.getvalue())

    def load(self) -> dict | None:
        return torch.load(self.path, map_location="cpu", weights_only=False) if self.path.exists() else None


def adamw(params, **kwargs) -> torch.optim.AdamW:
    """AdamW with the multi-tensor ("foreach") update on every device. On the CPU PyTorch
    defaults to one small update per tensor: 42 ms a step for stage 0's UNet + text encoder
    (244 tensors) against 25 ms (bench/bench_toy_pipeline.py). The arithmetic is the same,
    bit for bit (tests/test_common.py checks), so it changes speed and nothing else. (The
    fused kernel takes 8 ms but rounds differently, so it would change every toy result.)"""
    return torch.optim.AdamW(params, foreach=True, **kwargs)


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """The randomness of one training step, independent of every earlier step."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 7 + stream)

# ----------------------------------------------------------------------------------------
# 6. Judges of stage 1 (paper Sec. 3.1): "which of two images is more harmful?" on a 4-level
# rubric with forced choice. One interface: `compare(a, b) -> {"winner": 0|1,
# "severity": [s_a, s_b]}`, or None when the judge's answer is unusable (counted, skipped).
# ----------------------------------------------------------------------------------------

def make_judge(name: str, model: str = "gpt-4o", base_url: str | None = None, timeout: float = 60.0,
               retries: int = 5):
    """--judge toy (the toy world's exact judge) or --judge openai (judge_client.OpenAIJudge;
    key from OPENAI_API_KEY, never logged)."""
    if name == "toy":
        from toyworld import ToyJudge
        return ToyJudge()
    if name == "openai":
        from judge_client import OpenAIJudge
        return OpenAIJudge(model=model, base_url=base_url, timeout=timeout, max_retries=retries)
    raise ValueError(f"unknown judge {name!r}: choose toy or openai")



# ----------------------------------------------------------------------------------------
# 7. The Safety Cost Model (paper Sec. 3.1): an OpenCLIP image tower + a small adapter head
# giving a scalar cost C(x). sd15: ViT-H-14 with LAION weights; toy: a tiny ViT, random init.
# ----------------------------------------------------------------------------------------

TOY_OPENCLIP = {"embed_dim": 64,
                "vision_cfg": {"image_size": TOY_IMAGE_SIZE, "layers": 3, "width": 96, "patch_size": 4,
                               "head_width": 32},
                "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 1, "layers": 1}}


def openclip_image_tower(arch: str, pretrained: str | None = None):
    """`open_clip.create_model(arch)`'s image tower. The toy arch "toy-ViT-tiny" is registered
    from TOY_OPENCLIP; `pretrained` names open_clip weights (from the local cache) or a file."""
    import open_clip
    if arch == "toy-ViT-tiny" and arch not in open_clip.list_models():
        with tempfile.TemporaryDirectory(prefix="openclip-cfg-") as folder:  # read at once, then gone
            (Path(folder) / f"{arch}.json").write_text(json.dumps(TOY_OPENCLIP))
            open_clip.add_model_config(folder)
    logging.getLogger().setLevel(max(logging.getLogger().level, logging.ERROR))  # "no pretrained weights" noise
    pretrained = pretrained or None  # "" (e.g. `--pretrained ''`): random init
    tag = pretrained and not Path(pretrained).is_file() and open_clip.get_pretrained_cfg(arch, pretrained)
    try:
        return open_clip.create_model(arch, pretrained=pretrained).visual
    except RuntimeError as e:  # open_clip's "Failed to download weights" (offline, or not in the cache)
        if not tag:
            raise
        repo = tag.get("hf_hub", "").strip("/")
        raise SystemExit(
            f"cannot load OpenCLIP {arch} weights {pretrained!r} (not in the local Hugging Face cache).\n"
            f"Download them on a machine with internet (`hf download {repo} open_clip_pytorch_model.bin`, "
            f"then copy ~/.cache/huggingface/hub here), or pass the weights file with --pretrained PATH."
            if repo else f"cannot load OpenCLIP {arch} weights {pretrained!r} ({e}); pass a weights file with "
                         f"--pretrained PATH.") from None


class SafetyCostModel(torch.nn.Module):
    """C(x): image tower -> LayerNorm -> Linear -> GELU -> Linear -> scalar cost."""

    def __init__(self, arch: str, pretrained: str | None = None, hidden: int = 256, freeze_tower: bool = False):
        super().__init__()
        self.arch, self.hidden = arch, hidden
        self.tower = openclip_image_tower(arch, pretrained)
        self.tower.requires_grad_(not freeze_tower)
        d = self.tower.output_dim
        self.head = torch.nn.Sequential(torch.nn.LayerNorm(d), torch.nn.Linear(d, hidden), torch.nn.GELU(),
                                        torch.nn.Linear(hidden, 1))
        cfg = self.tower.preprocess_cfg
        self.image_size = cfg["size"][0] if isinstance(cfg["size"], (tuple, list)) else cfg["size"]
        self.register_buffer("mean", torch.tensor(cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg["std"]).view(1, 3, 1, 1), persistent=False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, H, W, 3] -> the tower's normalised input [B, 3, S, S] (bicubic resize)."""
        x = images.permute(0, 3, 1, 2).float() / 255.0
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False).clamp(0, 1)
        return (x - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.tower(self.preprocess(images))).squeeze(-1)

    @torch.no_grad()
    def cost(self, images: Sequence[np.ndarray], batch_size: int = 256) -> torch.Tensor:
        """C(x) for a list of uint8 [H, W, 3] images, on the model's device, as a CPU tensor."""
        dev = next(self.parameters()).device
        out = [self(torch.from_numpy(np.stack(images[i:i + batch_size])).to(dev)).float().cpu()
               for i in range(0, len(images), batch_size)]
        return torch.cat(out) if out else torch.zeros(0)


def save_scm(model: SafetyCostModel, folder: str | Path, mu_safe: float) -> None:
    """Weights as safetensors + a config that `load_scm` rebuilds the model from."""
    from safetensors.torch import save_file
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / ".scm.safetensors.tmp"
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, folder / "scm.safetensors")
    atomic_write_json(folder / "scm_config.json", {"arch": model.arch, "hidden": model.hidden, "mu_safe": mu_safe})


def load_scm(path: str | Path, device: torch.device | str = "cpu") -> SafetyCostModel:
    """The one loader stages 3 and 5 use: a folder written by 02_train_scm.py."""
    from safetensors.torch import load_file
    path = Path(path)
    require_inputs([path / "scm.safetensors", path / "scm_config.json"], "scm")
    cfg = read_json(path / "scm_config.json")
    model = SafetyCostModel(cfg["arch"], pretrained=None, hidden=cfg["hidden"])
    model.load_state_dict(load_file(str(path / "scm.safetensors")))
    model.mu_safe = cfg["mu_safe"]
    return model.to(device).eval()


# ----------------------------------------------------------------------------------------
# 8. The quality reward r(x, c) of Eq. 6 (paper Sec. 3.2): PickScore for sd15 (Kirstain et al.),
# the toy world's exact toy_quality for toy. One interface: `reward(images, prompts) -> [B]`.
# Beside it the other CLIP-family scorers of stage 5 (paper Sec. 6.1): CLIPScore and Q16. All
# three are a ClipScorer: one CLIP model + processor and one batched embedding loop.
# ----------------------------------------------------------------------------------------

def from_pretrained_or_exit(load, name: str | Path, what: str, flag: str):
    """Call `load(name)`; turn a missing model into one message saying what to get and where.
    Everything loads from the local Hugging Face cache or a folder: nothing is downloaded
    when HF_HUB_OFFLINE=1, which is how the tests and CI run."""
    try:
        return load(str(name))
    except (OSError, ValueError) as e:
        if Path(str(name)).exists():
            raise
        raise SystemExit(
            f"cannot load {what} {str(name)!r} ({type(e).__name__}).\n"
            f"Download it into the Hugging Face cache on a machine with internet "
            f"(`hf download {name}`, then copy ~/.cache/huggingface/hub here), "
            f"or pass a local folder with {flag} PATH.") from None


def clip_projection(out) -> torch.Tensor:
    """CLIPModel.get_*_features: transformers 5 returns an output object whose .pooler_output
    is the projected embedding; older versions return the tensor itself."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class ClipScorer:
    """A transformers CLIPModel and its processor, loaded from the local Hugging Face cache or
    a folder, with the one batched loop that embeds images and prompts: what PickScore,
    CLIPScore and Q16 have in common. f(·) below is CLIP's projected embedding."""

    def __init__(self, model: str | Path, processor: str | Path, what: str, model_flag: str, processor_flag: str,
                 device, batch_size: int = 32):
        from transformers import AutoProcessor, CLIPModel
        self.processor = from_pretrained_or_exit(AutoProcessor.from_pretrained, processor, f"the {what} processor",
                                                 processor_flag)
        self.model = from_pretrained_or_exit(CLIPModel.from_pretrained, model, what, model_flag).to(device).eval()
        self.device, self.batch_size = device, batch_size

    @torch.no_grad()
    def embed(self, images: Sequence[np.ndarray] | None = None, texts: Sequence[str] | None = None
              ) -> Iterator[tuple[torch.Tensor | None, torch.Tensor | None]]:
        """Batch by batch (batch_size items): f(x) of images[i:i+B] and f(c) of texts[i:i+B], on
        the device and not normalised; None for what was not asked for."""
        from PIL import Image
        for i in range(0, len(images if images is not None else texts), self.batch_size):
            img = txt = None
            if images is not None:
                px = self.processor(images=[Image.fromarray(x) for x in images[i:i + self.batch_size]],
                                    return_tensors="pt")["pixel_values"].to(self.device)
                img = clip_projection(self.model.get_image_features(pixel_values=px))
            if texts is not None:
                tx = self.processor(text=list(texts[i:i + self.batch_size]), padding=True, truncation=True,
                                    max_length=77, return_tensors="pt").to(self.device)
                txt = clip_projection(self.model.get_text_features(**tx))
            yield img, txt

    def unit_embeddings(self, images: Sequence[np.ndarray] | None = None, texts: Sequence[str] | None = None
                        ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """e = f / ‖f‖ for all images and all texts at once, fp32 on the CPU (CLIPScore, Q16)."""
        img, txt = [], []
        for i, t in self.embed(images, texts):
            img += [] if i is None else [i.float().cpu()]
            txt += [] if t is None else [t.float().cpu()]
        return tuple(F.normalize(torch.cat(e), dim=-1) if e else None for e in (img, txt))


class PickScore(ClipScorer):
    """PickScore (Kirstain et al. 2023), a CLIP-H fine-tuned on Pick-a-Pic; ≈ 19-23 on SD-1.5
    images:
        PS(x, c) = exp(logit_scale) · cos(f(c), f(x))"""

    def __init__(self, model: str | Path = "yuvalkirstain/PickScore_v1",
                 processor: str | Path = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", device="cpu", batch_size: int = 32):
        super().__init__(model, processor, "PickScore", "--pickscore-model", "--pickscore-processor", device,
                         batch_size)

    @torch.no_grad()
    def __call__(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> list[float]:
        scores = []
        for img, txt in self.embed(images, prompts):  # scored on the device, batch by batch
            cos = (F.normalize(img, dim=-1) * F.normalize(txt, dim=-1)).sum(-1)
            scores += (self.model.logit_scale.exp() * cos).float().cpu().tolist()
        return scores


class ClipScore(ClipScorer):
    """CLIPScore (Hessel et al. 2021) on the scale of the paper's Table 5 (≈ 27 for SD-1.5),
    torchmetrics' convention:
        CLIPScore(x, c) = 100 · max(cos(f(x), f(c)), 0)"""

    def __init__(self, name: str | Path, device):
        super().__init__(name, name, "CLIPScore model", "--clip-model", "--clip-model", device)

    def __call__(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> list[float]:
        img, txt = self.unit_embeddings(images, prompts)
        return (100 * (img * txt).sum(-1).clamp(min=0)).tolist()


def load_q16_prompts(path: str | Path) -> torch.Tensor:
    """Q16's two learned prompt embeddings [2, D]: a pickled array as github.com/ml-research/Q16
    ships them (data/ViT-L-14/prompts.p; pickle runs code, so load only a file you trust), or
    a safetensors file holding one tensor."""
    import pickle
    path = Path(path)
    if not path.exists():
        raise SystemExit(f"--q16 {path}: file not found (Q16's prompts are data/ViT-L-14/prompts.p "
                         f"in github.com/ml-research/Q16)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        tensors = list(load_file(str(path)).values())
        if len(tensors) != 1:
            raise DataError(f"{path}: expected one tensor, found {len(tensors)}")
        prompts = tensors[0]
    else:
        with open(path, "rb") as f:
            prompts = torch.as_tensor(np.asarray(pickle.load(f), dtype=np.float32))
    if prompts.ndim != 2 or prompts.shape[0] != 2:
        raise DataError(f"{path}: Q16 prompts must have shape [2, D], got {tuple(prompts.shape)}")
    return prompts.float()


class Q16(ClipScorer):
    """Q16 (Schramowski et al. 2022), the I2P protocol's second classifier: CLIP ViT-L/14 and
    two learned prompt embeddings p_0 ("appropriate") and p_1 ("inappropriate"):
        P(k | x) = softmax_k(100 · cos(f(x), p_k)),   x is inappropriate ⇔ argmax_k P(k | x) = 1"""

    def __init__(self, prompts_file: str | Path, clip_name: str | Path, device):
        super().__init__(clip_name, clip_name, "Q16's CLIP model (ViT-L/14)", "--q16-clip", "--q16-clip", device)
        self.prompts = F.normalize(load_q16_prompts(prompts_file), dim=-1)
        dim = self.model.config.projection_dim
        if self.prompts.shape[1] != dim:
            raise DataError(f"{prompts_file}: Q16 prompts are {self.prompts.shape[1]}-d but {clip_name} embeds "
                            f"into {dim}-d: they were learned for another CLIP")

    def __call__(self, images: Sequence[np.ndarray]) -> list[bool]:
        img, _ = self.unit_embeddings(images)
        probs = (100 * img @ self.prompts.T).softmax(-1)
        return (probs.argmax(-1) == 1).tolist()


def make_quality_reward(name: str, device="cpu", model: str | None = None, processor: str | None = None):
    """--quality toy (default for the toy preset) or --quality pickscore (sd15)."""
    if name == "toy":
        from toyworld import ToyQuality
        return ToyQuality()
    if name == "pickscore":
        kw = {k: v for k, v in (("model", model), ("processor", processor)) if v}
        return PickScore(device=device, **kw)
    raise ValueError(f"unknown quality reward {name!r}: choose toy or pickscore")