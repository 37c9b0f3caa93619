"""Shared code for the T2I-SPO reproduction: the paper's equations, presets, I/O, DDP.

Paper: "The Path to Reconciling Quality and Safety in Text-to-Image Generation: Dataset,
Method, and Evaluation" (T2I-SPO). The equation numbers below follow the paper; the
equations themselves are written out in SPEC.md section 2, since the paper's text lost them.

Contents, in the order the paper uses them:
  Sec. 3.1  contrastive_ranking_loss (Eq. 2), cost_anchoring_loss (Eq. 3), scm_loss (Eq. 1)
  Sec. 4.1  diffusion_dpo_loss (Eq. 5)
  Sec. 4.2  composite_reward (Eq. 6), preference_probability (Eq. 7), relabel_pairs (Eq. 8)
  Sec. 4.3  DescentRateQueue (Eq. 10), choose_augmentation (Eq. 11)
  Sec. 5    ua_score (Eq. 12)
and the plumbing every stage script shares: presets, argument parsing, seeding, rank-aware
logging, torch.distributed set-up, atomic writes, JSONL with line-numbered errors.

Heavy libraries (diffusers, transformers, open_clip) are imported inside the functions that
need them, so `import common` stays fast.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F


class DataError(ValueError):
    """Bad input data; the message names the file (and line) at fault."""


# ----------------------------------------------------------------------------------------
# Input checks shared by the loss functions: wrong shapes or non-finite values must fail
# loudly, never broadcast silently into a wrong number.
# ----------------------------------------------------------------------------------------

def _check_same_1d(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    first = next(iter(shapes.values()))
    if len(first) != 1 or any(s != first for s in shapes.values()):
        raise ValueError(f"expected 1-D tensors of one shape [B], got {shapes}")
    for name, t in tensors.items():
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} contains NaN or inf")


def _check_signs(**signs: torch.Tensor) -> None:
    for name, s in signs.items():
        if not ((s == 1) | (s == -1)).all():
            raise ValueError(f"{name} must hold only +1 (harmful) or -1 (safe), got {s.tolist()}")


# ----------------------------------------------------------------------------------------
# Sec. 3.1 — the Safety Cost Model objective
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
# Sec. 4.1 — Diffusion-DPO (Wallace et al.), the loss T2I-SPO optimises (Eqs. 5 and 9)
# ----------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------
# Sec. 4.2 — composite reward and relabelling
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
    replaces a/b by "w" (higher R) and "l", adding "reward_w" and "reward_l".

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
        rec.update(w=w, l=l, reward_w=rw, reward_l=rl)
        out.append(rec)
    return out, dropped


# ----------------------------------------------------------------------------------------
# Sec. 4.3 — Dynamic Focusing Mechanism
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


# ----------------------------------------------------------------------------------------
# Sec. 5 — the Unified Alignment Score
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
# Presets and command lines (SPEC.md section 6). One code path: a preset is only defaults.
# ----------------------------------------------------------------------------------------

# Per preset, per stage: the defaults of that stage's flags; `--tiny` lays TINY on top.
# parse_args installs them before parsing, so `--help` shows the preset's values and an
# explicit flag always wins. Each stage's issue fills its own entries.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "toy": {},
    "sd15": {},
}
TINY: dict[str, dict[str, Any]] = {}

STAGES = {  # stage key -> (script, folder under --run)
    "world": ("00_toy_world.py", "world"),
    "coarse": ("01_build_coarse.py", "coarse"),
    "scm": ("02_train_scm.py", "scm"),
    "hf": ("03_build_hf.py", "hf"),
    "spo": ("04_train_spo.py", "spo"),
    "safety": ("04_train_spo.py --objective safety", "safety"),
    "eval": ("05_evaluate.py", "eval"),
}


def stage_parser(stage: str, description: str) -> argparse.ArgumentParser:
    """The flags every stage shares (SPEC.md section 6); the script adds its own."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--run", default="runs/toy", help="run folder shared by all stages")
    p.add_argument("--preset", default="toy", choices=sorted(PRESETS), help="toy (CPU, minutes) or sd15 (GPUs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="smallest settings, for tests and smoke runs")
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
    Explicit flags always win over the preset."""
    first, _ = parser.parse_known_args(argv)
    defaults = preset_defaults(first.preset, first._stage, first.tiny)
    known = {a.dest for a in parser._actions}
    unknown = set(defaults) - known
    if unknown:
        raise ValueError(f"preset {first.preset!r} sets unknown {first._stage} options {sorted(unknown)}")
    parser.set_defaults(**defaults)
    return parser.parse_args(argv)


def stage_dir(run: str | Path, stage: str) -> Path:
    return Path(run) / STAGES[stage][1]


def require_inputs(paths: Iterable[str | Path], stage: str) -> None:
    """Stop with a message naming the earlier stage to run when its outputs are missing."""
    missing = [str(p) for p in paths if not Path(p).exists()]
    if missing:
        script = STAGES[stage][0]
        raise SystemExit(f"missing input(s): {', '.join(missing)}\n"
                         f"run the earlier stage first: python {script} --run <same run folder>")


def save_config(args: argparse.Namespace, out_dir: str | Path, **extra) -> dict:
    """Write every setting the stage ran with next to its outputs (config.json)."""
    cfg = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    cfg.update(extra)
    cfg["argv"] = sys.argv
    atomic_write_json(Path(out_dir) / "config.json", cfg)
    return cfg


# ----------------------------------------------------------------------------------------
# Seeding, logging, distributed
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
    """Append-only JSONL metrics log (rank 0 writes). Each record gets a wall-clock stamp."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.t0 = time.time()

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


def setup_distributed(device: str | None = None) -> Dist:
    """Join the process group when launched by torchrun (RANK/WORLD_SIZE set): NCCL on GPU,
    gloo on CPU. A plain `python script.py` runs as a single process with no group."""
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if use_cuda:
            torch.cuda.set_device(local_rank)
        torch.distributed.init_process_group(backend="nccl" if use_cuda else "gloo")
        dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
        return Dist(torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank, dev)
    return Dist(0, 1, 0, torch.device("cuda" if use_cuda else "cpu"))


def cleanup_distributed() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


# ----------------------------------------------------------------------------------------
# Files: atomic writes (temp file in the same folder, fsync, rename) and JSONL
# ----------------------------------------------------------------------------------------

def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
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
