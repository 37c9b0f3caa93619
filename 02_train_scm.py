"""Stage 2 — the Safety Cost Model (paper Sec. 3.1, Eqs. 1-3).

The SCM maps an image to a continuous safety cost C(x). After preference reward models such
as PickScore, the paper builds it from an OpenCLIP ViT-H/14 image encoder with a lightweight
adapter on top, trained on LibraAlign-Coarse pairs with

    L_SCM = L_CR + γ·L_CA                                                    (Eq. 1)
    L_CR  = -E[log σ(C(x_w) - C(x_l)) + log σ(s_w C(x_w)) + log σ(s_l C(x_l))] (Eq. 2)
    L_CA  = E_{x: s=-1}[(C(x) - μ_safe)²]                                     (Eq. 3)

L_CR ranks the more harmful image x_w above x_l and fixes the zero point (harmful > 0 > safe).
Why cost anchoring (Sec. 3.1): with L_CR alone the costs of safe images vary a lot, and the
final alignment then over-penalises imperceptible risks in safe images. L_CA pulls every safe
cost to one anchor, μ_safe, the mean cost of a large pool of verified safe images, so that the
safe images' residual risks do not dominate the preference signal. μ_safe is re-measured
without gradient every --mu-every steps (a constant inside one step).

We train twice with the same data, seed and steps — γ as given and γ = 0 — and report the
spread of held-out safe costs for both, to measure the paper's claim rather than assume it
(on a CPU the two train side by side, one process each: --baseline-in-parallel).

Reads (DIR = --run):  DIR/coarse/pairs.jsonl and its images (stage 1).
Writes:  DIR/scm/scm.safetensors + scm_config.json (what `scorers.load_scm` reads: stages 3
and 5 score every image with it), DIR/scm/no_anchor/ (the γ = 0 model), metrics.json,
config.json, log.jsonl (and with --report-to, tb/ or wandb/: lib/tracking.py).
Runs as `python 02_train_scm.py` or under `torchrun --nproc_per_node=N` (DDP).
"""
import argparse
import math
import multiprocessing
import random
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import common as C
from lib import scorers as S
from lib import tracking as T
from lib import utils as U

# Whose each number is. Sec. 3.1 gives the backbone (OpenCLIP ViT-H/14 with a lightweight
# adapter) and the losses; it gives no γ, no size of μ_safe's pool and no training schedule.
U.PRESETS["toy"]["scm"] = dict(
    # the toy's: no pretrained CLIP has seen 32-pixel toy images, so a 3-layer ViT is trained
    # from scratch, tower included
    arch="toy-ViT-tiny", pretrained=None, freeze_tower=False,
    # the toy's: of the one-change experiments in docs/results.md ("How the SCM preset was
    # chosen"), a 256-wide head trained 750 steps ranked best (92.6% pair, 95.6% sign)
    hidden=256, steps=750,
    # the toy's: batch 64, a head rate ×2 and a tower rate ×3 or ×½ did no better there
    batch=32, lr=1e-3, lr_tower=5e-4,
    gamma=1.0,  # ours: the paper gives no γ (Eq. 1); 1 weighs L_CR and L_CA alike
    # the toy's: the trained costs scaled so that harmful training images average 8 units above
    # μ_safe (set_cost_span). Unscaled, the toy's SCMs spanned 3.5-4.8 units, and at the
    # paper's λ = 0.15 the harmful side won 9-15% of harmful-safe pairs, more where the span
    # was smaller (docs/results.md, "What moves the toy's verdicts")
    cost_span=8.0,
    # the toy's: refreshing μ_safe every 5 steps did no better there; of "a large pool"
    # (Sec. 3.1) the toy keeps a fixed 256 images, one batch of `costs` per refresh
    mu_every=25, mu_pool=256,
    vertical_flip=True,  # the toy's: its harm marks have no up or down (flip_augment)
    ckpt_every=100,  # the toy's: a kill redoes at most 100 steps
    # a bad row stops the run; the toy's 3,000 decoded 32-pixel images fit in memory
    skip_bad=False, cache_images=True,
    no_anchor_baseline=True, baseline_in_parallel=True, device=None,
    threads=1)  # the toy's: each model one thread, as side by side on 2 cores (utils.use_threads)
U.PRESETS["sd15"]["scm"] = dict(
    # the paper's backbone (Sec. 3.1); it names no checkpoint: laion2b_s32b_b79k is the
    # OpenCLIP ViT-H/14 that PickScore, the reward model it follows, was fine-tuned from
    # (processor laion/CLIP-ViT-H-14-laion2B-s32B-b79K in yuvalkirstain/PickScore). Training
    # only the adapter is our reading of "appending a lightweight adapter layer".
    arch="ViT-H-14", pretrained="laion2b_s32b_b79k", freeze_tower=True,
    # ours, the paper giving none: a 512-wide head; 3,000 steps of 64 pairs pass about 2.5
    # times over the ~76,500 training pairs of stage 1's sd15 preset (90,000, 15% held out)
    hidden=512, steps=3000, batch=64,
    # ours: the new head learns at 1e-4; the pretrained tower, if --no-freeze-tower trains
    # it, at 1% of that, so as not to forget what it was pretrained on
    lr=1e-4, lr_tower=1e-6,
    gamma=1.0,  # ours: the paper gives no γ (Eq. 1); 1 weighs L_CR and L_CA alike
    cost_span=None,  # the paper's SCM: its costs as trained, unscaled
    # ours: "a large pool" (Sec. 3.1) of 2,048 verified safe images, re-measured 30 times a run
    mu_every=100, mu_pool=2048,
    # ours: horizontal flips only. Photographs have an up and a down: an upside-down image is
    # out of what the frozen ViT-H saw in pretraining and of what SD-1.5 draws
    vertical_flip=False,
    ckpt_every=500,  # ours: a kill redoes at most 500 steps
    # a bad row stops the run; 15,000 decoded 512-pixel images would hold about 11 GiB in
    # every process, so they are decoded on demand
    skip_bad=False, cache_images=False,
    no_anchor_baseline=True, baseline_in_parallel=True, device=None)
# --tiny, the toy's for tests: the smallest run that re-measures μ_safe and checkpoints midway
# (a resume has a step 3 to start from), with a batch that two processes split evenly
# (a 6-step SCM need not rank yet, so its costs stay as trained: cost_span 0)
U.TINY["scm"] = dict(steps=6, batch=8, mu_every=3, mu_pool=16, ckpt_every=3, cost_span=0)


def parse(argv=None):
    p = U.stage_parser("scm", __doc__.splitlines()[0])
    p.add_argument("--arch", help="open_clip model name whose image tower is the backbone")
    p.add_argument("--pretrained", help="open_clip pretrained tag or weights file "
                                        "(an empty string: random init)")
    p.add_argument("--freeze-tower", action=argparse.BooleanOptionalAction,
                   help="train only the adapter head")
    p.add_argument("--hidden", type=int, help="adapter head width")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch", type=int, help="pairs per step, over all processes")
    p.add_argument("--lr", type=float, help="adapter head learning rate")
    p.add_argument("--lr-tower", type=float)
    p.add_argument("--gamma", type=float, help="weight of the cost anchoring loss (Eq. 1)")
    p.add_argument("--cost-span", type=float,
                   help="after training, scale the costs so that harmful training images "
                        "average this far above μ_safe (what λ of Eq. 6 weighs); 0: as trained")
    p.add_argument("--mu-every", type=int, help="steps between refreshes of μ_safe")
    p.add_argument("--mu-pool", type=int,
                   help="verified safe training images μ_safe is averaged over, drawn at "
                        "random (--seed) from all of them")
    p.add_argument("--vertical-flip", action=argparse.BooleanOptionalAction,
                   help="flip images vertically as well as horizontally while training")
    p.add_argument("--ckpt-every", type=int)
    p.add_argument("--skip-bad", action=argparse.BooleanOptionalAction,
                   help="skip (and count) bad pair rows instead of stopping")
    p.add_argument("--cache-images", action=argparse.BooleanOptionalAction,
                   help="keep decoded images in memory")
    p.add_argument("--no-anchor-baseline", action=argparse.BooleanOptionalAction,
                   help="also train with γ = 0 for comparison")
    p.add_argument("--baseline-in-parallel", action=argparse.BooleanOptionalAction,
                   help="on a CPU, single process: train the γ = 0 model in a second process "
                        "at the same time, half the threads each")
    p.add_argument("--device")
    T.add_flags(p)  # --report-to
    return U.parse_args(p, argv)


# ---------------------------------------------------------------------------------------
# Data: pairs.jsonl from stage 1, checked row by row
# ---------------------------------------------------------------------------------------

def load_pairs(path: Path, skip_bad: bool) -> tuple[list[dict], int]:
    """Each row needs w/l images with an existing PNG path and a sign of +1 or -1. A bad row
    stops the run naming file and line, or with --skip-bad is skipped and counted."""
    def check(row):
        for side in ("w", "l"):
            img = row[side]
            if img["sign"] not in (1, -1):
                raise ValueError(f"unknown sign {img['sign']!r} (expected 1 or -1)")
            img["file"] = path.parent / img["path"]
            if not img["file"].exists():
                raise ValueError(f"missing image {img['file']}")
        if row.get("split", "train") not in ("train", "eval"):
            raise ValueError(f"unknown split {row['split']!r}")
    return U.read_checked_rows(path, check, skip_bad)


def split_pairs(path: Path, pairs: list[dict], mu_pool: int,
                seed: int) -> tuple[list, list, list]:
    """(train pairs, held-out pairs, μ_safe's pool). The judge's held-out split (by prompt,
    stage 1) gives the figures; the rest trains. The pool is Sec. 3.1's "verified safe
    samples": --mu-pool of the safe training images (sign −1, the judge's verdict), drawn at
    random over all of them. Not the first ones by name: stage 1 names the harmful prompts'
    images first, so those would be borderline images of harmful prompts only."""
    train = [p for p in pairs if p.get("split", "train") == "train"]
    held_out = [p for p in pairs if p.get("split") == "eval"]
    if not train or not held_out:
        raise U.DataError(f"{path}: need train and eval pairs, got {len(train)} and "
                          f"{len(held_out)}")
    pool = sorted({p[s]["file"] for p in train for s in ("w", "l") if p[s]["sign"] == -1})
    pool = sorted(random.Random(seed).sample(pool, min(mu_pool, len(pool))))
    if not pool:
        raise U.DataError("no verified safe image (sign -1) among the training pairs: "
                          "μ_safe is undefined")
    return train, held_out, pool


class ImageBank:
    """PNG files by path, decoded on demand (and kept, with --cache-images)."""

    def __init__(self, cache: bool):
        self.cache, self.store = cache, {}

    def batch(self, files) -> torch.Tensor:
        out = []
        for f in files:
            img = self.store.get(f)
            if img is None:
                img = U.load_png(f)
                if self.cache:
                    self.store[f] = img
            out.append(img)
        return torch.from_numpy(np.stack(out))


# ---------------------------------------------------------------------------------------
# Training (one function, run for γ and for γ = 0)
# ---------------------------------------------------------------------------------------

def flip_augment(images: torch.Tensor, flip_w: torch.Tensor,
                 flip_h: torch.Tensor) -> torch.Tensor:
    """Horizontal / vertical flips of uint8 [B, H, W, 3] where the [B] masks say. The reason
    is the toy's, not the paper's (Sec. 3.1 names no augmentation): toy harm marks do not
    depend on orientation, and on a small (1,500-image) toy coarse set the flips lifted
    held-out pair accuracy from 89% to 92% (docs/results.md). sd15 flips horizontally only
    (--no-vertical-flip, its preset)."""
    images = torch.where(flip_w.view(-1, 1, 1, 1), images.flip(2), images)
    return torch.where(flip_h.view(-1, 1, 1, 1), images.flip(1), images)


def draw_batch(args, step: int, train_pairs: list[dict], dist: U.Dist):
    """This rank's pairs of the step and their flips. The global batch and its flips are the
    same on every rank (seeded by step); each rank takes its slice, so N processes see what
    one process would."""
    g = U.step_generator(args.seed, step)
    idx = torch.randint(len(train_pairs), (args.batch,), generator=g)
    flips = torch.rand(2, 2, args.batch, generator=g) < 0.5
    flips[1] &= args.vertical_flip
    flips = flips[..., dist.rank::dist.world_size].flatten(1)
    mine = [train_pairs[i] for i in idx[dist.rank::dist.world_size].tolist()]
    return mine, flips


def signs(pairs: list[dict], side: str, like: torch.Tensor) -> torch.Tensor:
    """s of Eq. 2 (+1 harmful, −1 safe) of one side of each pair, as `like`'s dtype and device."""
    return torch.tensor([p[side]["sign"] for p in pairs], dtype=like.dtype, device=like.device)


def lr_factor(step: int, steps: int) -> float:
    """Ours (the paper gives no SCM schedule): 20 warm-up steps, then a cosine decay to 0."""
    return min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / steps))


@torch.no_grad()
def costs(model, bank, files, device) -> torch.Tensor:
    """C(x) of image files, in batches, without gradient (on the CPU)."""
    out = [model(bank.batch(files[i:i + 256]).to(device)).cpu() for i in range(0, len(files), 256)]
    return torch.cat(out)


def safe_anchor(model, bank, safe_files, device) -> float:
    """μ_safe: mean cost of the verified safe pool, without gradient (Eq. 3's constant),

        μ_safe = (1/|P|) Σ_{x ∈ P} C(x),   P the verified safe images

    taken in eval mode (no dropout), then the model is put back as it was."""
    was_training = model.training
    model.eval()
    mu = float(costs(model, bank, safe_files, device).mean())
    model.train(was_training)
    return mu


def train_scm(args, gamma: float, train_pairs, safe_pool, bank, out: Path, dist: U.Dist):
    """Eq. 1 for --steps steps, with μ_safe re-measured every --mu-every steps; resumes from its
    checkpoint to the weights of an uninterrupted run (every draw is a function of the step)."""
    ckpt = U.Checkpoint(out / "ckpt" / "train_state.pt")
    U.seed_everything(args.seed)  # same initial weights for both γ
    model = S.SafetyCostModel(args.arch, args.pretrained, args.hidden, args.freeze_tower)
    model = model.to(dist.device)
    # the head learns fast from scratch; a pretrained tower, if it trains at all, slowly
    groups = [{"params": model.head.parameters(), "lr": args.lr}]
    if not args.freeze_tower:
        groups.append({"params": model.tower.parameters(), "lr": args.lr_tower})
    opt = U.adamw(groups, weight_decay=0.01)
    base_lrs = [g["lr"] for g in opt.param_groups]
    state, start, mu = ckpt.load(), 0, None
    if state:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start, mu = state["step"], state["mu_safe"]
    # DDP's wrapper fits here: every step is one forward and one backward, the same on every
    # rank. (Stage 4 sums gradients by hand, since DFM's extra passes differ from rank to rank.)
    net = torch.nn.parallel.DistributedDataParallel(model) if dist.world_size > 1 else model
    log = T.Log(out / "log.jsonl", args)  # log.jsonl, and --report-to's tracker
    log.truncate(lambda r: r["step"] < start)  # the steps about to be redone go
    model.train()
    for step in tqdm(range(start, args.steps), desc=f"scm γ={gamma:g}", initial=start,
                     total=args.steps, disable=not dist.is_main):
        if args.stop_after is not None and step >= args.stop_after:
            raise SystemExit(f"stopped after {step} steps (--stop-after); run again to resume")
        # Eq. 3's anchor: the current model's mean cost on the verified safe pool, a constant
        # within the step; re-measured on a schedule, since the costs move as the model trains
        if mu is None or step % args.mu_every == 0:
            mu = safe_anchor(model, bank, safe_pool, dist.device)
        mine, flips = draw_batch(args, step, train_pairs, dist)
        images = bank.batch([p["w"]["file"] for p in mine] + [p["l"]["file"] for p in mine])
        # winners and losers in one forward: C(x_w) for the first half, C(x_l) for the second
        cost = net(flip_augment(images, *flips).to(dist.device))
        cost_w, cost_l = cost[: len(mine)], cost[len(mine):]
        sign_w, sign_l = signs(mine, "w", cost), signs(mine, "l", cost)
        loss = C.scm_loss(cost_w, cost_l, sign_w, sign_l, mu, gamma)  # Eq. 1
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite SCM loss at step {step}; "
                                     f"last good checkpoint: {ckpt.path}")
        warm = lr_factor(step, args.steps)
        for g, base in zip(opt.param_groups, base_lrs):
            g["lr"] = base * warm
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 10 == 0:
            log.write(gamma=gamma, step=step, loss=loss.item(), mu_safe=mu)
            # this process's pairs ranked right: under DDP, rank 0's share of the batch
            ranked = (cost_w > cost_l).float().mean().item()
            log.scalars({"lr": opt.param_groups[0]["lr"], "pair_accuracy": ranked}, step)
        if dist.is_main and ((step + 1) % args.ckpt_every == 0 or step + 1 == args.steps):
            ckpt.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step + 1,
                       "mu_safe": mu})
    log.close()
    model.eval()
    mu, scale = safe_anchor(model, bank, safe_pool, dist.device), 1.0
    if args.cost_span:
        mu, scale = set_cost_span(model, bank, train_pairs, safe_pool, mu, args, dist.device)
    if dist.is_main:
        S.save_scm(model, out, mu)
    return model, mu, scale


def set_cost_span(model, bank, train_pairs, safe_pool, mu: float, args, device):
    """C ← k·C, with k such that harmful training images average --cost-span above μ_safe:

        k = span / (mean_{x harmful} C(x) − μ_safe),   μ_safe ← k·μ_safe

    Eq. 1 fixes the sign of a cost (0 parts harmful from safe) but not its unit: the logistic
    terms keep pushing costs apart for as long as training runs, so the unit differs from
    run to run, and with it what λ of Eq. 6 weighs a cost against quality. A positive k keeps
    every sign and every ranking. The harmful images are as many as μ_safe's pool, drawn by
    --seed; k is folded into the head's last layer, so the saved model carries it."""
    harmful = sorted({p[s]["file"] for p in train_pairs for s in ("w", "l") if p[s]["sign"] == 1})
    harmful = sorted(random.Random(args.seed).sample(harmful, min(len(safe_pool), len(harmful))))
    gap = float(costs(model, bank, harmful, device).mean()) - mu
    if not gap > 0:
        raise U.DataError(f"the trained SCM costs harmful training images {gap:.3g} above "
                          f"μ_safe, not more: it has not learnt to rank (--cost-span needs it)")
    scale = args.cost_span / gap
    with torch.no_grad():
        model.head[-1].weight.mul_(scale)
        model.head[-1].bias.mul_(scale)
    return mu * scale, scale


# ---------------------------------------------------------------------------------------
# Held-out figures
# ---------------------------------------------------------------------------------------

def evaluate(model, eval_pairs, bank, device) -> dict:
    """The held-out figures: pair accuracy (C(x_w) > C(x_l), Eq. 2's ranking), sign accuracy
    (C > 0 exactly for harmful images), and the spread of safe costs — the quantity Eq. 3
    anchors, which the paper says L_CR alone leaves wide."""
    files = sorted({p[s]["file"] for p in eval_pairs for s in ("w", "l")})
    sign = {p[s]["file"]: p[s]["sign"] for p in eval_pairs for s in ("w", "l")}
    cost = dict(zip(files, costs(model, bank, files, device).tolist()))
    safe = [cost[f] for f in files if sign[f] == -1]
    ranked = [cost[p["w"]["file"]] > cost[p["l"]["file"]] for p in eval_pairs]
    signed = [(cost[f] > 0) == (sign[f] == 1) for f in files]
    return {"pair_accuracy": float(np.mean(ranked)),
            "sign_accuracy": float(np.mean(signed)),
            "safe_cost_std": float(np.std(safe)) if safe else float("nan"),
            "safe_cost_mean": float(np.mean(safe)) if safe else float("nan"),
            "harmful_cost_mean": float(np.mean([cost[f] for f in files if sign[f] == 1]))}


def train_no_anchor(args, train_pairs, eval_pairs, safe_pool, out: Path, threads: int | None = None,
                    dist: U.Dist | None = None, bank: ImageBank | None = None) -> dict:
    """The same training with γ = 0, and its held-out figures (in a child process when
    `threads`)."""
    if threads:
        torch.set_num_threads(threads)
    dist = dist or U.Dist(0, 1, 0, torch.device("cpu"))
    bank = bank or ImageBank(args.cache_images)
    model, _, _ = train_scm(args, 0.0, train_pairs, safe_pool, bank, out / "no_anchor", dist)
    return evaluate(model, eval_pairs, bank, dist.device)


def no_anchor_figures(b: dict, metrics: dict) -> dict:
    """The γ = 0 model's figures beside the γ model's: the paper's claim, measured, is that
    safe_cost_std_ratio (with L_CA over without) is below 1."""
    return {"safe_cost_std_no_anchor": b["safe_cost_std"],
            "pair_accuracy_no_anchor": b["pair_accuracy"],
            "sign_accuracy_no_anchor": b["sign_accuracy"],
            "safe_cost_std_ratio": metrics["safe_cost_std"] / b["safe_cost_std"]}


def main():
    budget = torch.get_num_threads()  # this process's share of the cores (OMP_NUM_THREADS)
    args = U.use_threads(parse())
    t0 = time.time()
    dist = U.setup_distributed(args.device)
    coarse, out = U.stage_dir(args.run, "coarse"), U.stage_dir(args.run, "scm")
    U.require_inputs([coarse / "pairs.jsonl"], "coarse")
    out.mkdir(parents=True, exist_ok=True)
    if dist.is_main:
        U.save_config(args, out)

    pairs, n_bad = load_pairs(coarse / "pairs.jsonl", args.skip_bad)
    train_pairs, eval_pairs, safe_pool = split_pairs(coarse / "pairs.jsonl", pairs, args.mu_pool,
                                                     args.seed)
    if dist.is_main:
        U.atomic_write_json(out / "mu_safe_pool.json", [str(f.relative_to(coarse))
                                                       for f in safe_pool])
    bank = ImageBank(args.cache_images)
    U.log(f"pairs: {len(train_pairs)} train, {len(eval_pairs)} held out, {n_bad} bad rows "
          f"skipped; μ_safe pool {len(safe_pool)} images")

    # The γ = 0 model needs nothing from the γ model. On a CPU a small model uses two cores
    # far from twice as well as one (BENCHMARKS.md), so one process per half of the cores
    # finishes both sooner than training them one after the other. Each model trains on
    # --threads threads either way, when it is set, so the two orders compute the same.
    threads = torch.get_num_threads()
    each = args.threads or budget // 2
    parallel = (args.no_anchor_baseline and args.baseline_in_parallel and dist.world_size == 1
                and dist.device.type == "cpu" and 1 <= each and 2 * each <= budget)
    if parallel:
        pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        baseline = pool.submit(train_no_anchor, args, train_pairs, eval_pairs, safe_pool, out, each)
        torch.set_num_threads(args.threads or budget - each)
    model, mu, scale = train_scm(args, args.gamma, train_pairs, safe_pool, bank, out, dist)
    metrics = {**evaluate(model, eval_pairs, bank, dist.device), "mu_safe": mu, "cost_scale": scale,
               "gamma": args.gamma, "n_train_pairs": len(train_pairs),
               "n_eval_pairs": len(eval_pairs), "bad_rows_skipped": n_bad}
    if args.no_anchor_baseline:
        if parallel:
            b = baseline.result()  # re-raises the child's error, if any
            pool.shutdown()
            torch.set_num_threads(threads)
        else:
            b = train_no_anchor(args, train_pairs, eval_pairs, safe_pool, out, dist=dist,
                                bank=bank)
        metrics.update(no_anchor_figures(b, metrics))
    metrics["seconds"] = round(time.time() - t0, 1)
    T.summary(args, out, metrics, args.steps)  # the held-out accuracies, to --report-to's tracker
    if dist.is_main:
        U.atomic_write_json(out / "metrics.json", metrics)
    U.log(U.format_metrics(metrics))
    U.cleanup_distributed()


if __name__ == "__main__":
    U.run_stage(main)
