"""The DFM study (~220 lines): the paper's Fig. 5 where Eq. 10 can measure descent rates.

In the toy's full training each pair is visited a handful of times, too few for a queue of
K losses to fill. `make dfm` trains stage 4 on a small subset of the pairs (--pair-subset),
long enough that every pair is visited ~50 times, with DFM on and off over seeds and with
smaller augmentation pools, into DIR/dfm/<name>/. Runs that share a seed share every batch,
every timestep and every noise draw (all are functions of (seed, step)), so on − off is
paired by seed.

Command:  python dfm_study.py train --pair-subset N --name dfm/NAME [stage 4's flags]
Stage 5 calls `section` (registry.SECTIONS): the final and mean loss with DFM on and off,
their paired t intervals over seeds, the pool sweep, what DFM did, and the figure
DIR/eval/dfm_study.png.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

import common as C
import data as D
import plots
import stats
import utils as U

S4 = U.load_script("04_train_spo.py")


# ---------------------------------------------------------------------------------------
# 1. The runs: stage 4 on the same N pairs for every seed and pool
# ---------------------------------------------------------------------------------------

class SubsetHook(S4.Hook):
    """Stage 4 on --pair-subset of the relabelled pairs; a study run is read from its logs,
    not evaluated as a model (no model.json)."""
    publish = False

    def select(self, args, pairs, hf):
        return D.pair_subset(pairs, args.pair_subset)


U.PRESETS["toy"]["dfm_study"] = dict(U.PRESETS["toy"]["spo"], pair_subset=48)
U.PRESETS["sd15"]["dfm_study"] = dict(U.PRESETS["sd15"]["spo"], pair_subset=512)
U.TINY["dfm_study"] = dict(U.TINY["spo"], pair_subset=4)


def train_parser():
    p = S4.parser("dfm_study", "The DFM study: stage 4 on a small subset of the pairs, visited often")
    p.add_argument("--pair-subset", type=int,
                   help="train on N of the relabelled pairs, the same N for every --seed (chosen by a hash of the "
                        "pair, data.pair_subset)")
    return p


COMMANDS = {"train": (train_parser, lambda args: S4.train(args, SubsetHook()))}


# ---------------------------------------------------------------------------------------
# 2. The study: Fig. 5's claims from the finished runs, paired by seed
# ---------------------------------------------------------------------------------------

DFM_SAME = ("objective", "lam", "pair_subset", "steps", "batch", "lr", "warmup", "dfm_k", "dfm_tau", "dfm_patience")


def dfm_runs(run: Path) -> list[dict]:
    """The finished runs under DIR/dfm/: settings, per-step log and stage-4 metrics. Runs
    that differ in anything but the seed and the DFM pool are not comparable: an error."""
    folders = sorted(d for d in (run / "dfm").iterdir() if (d / "config.json").exists()) if (run / "dfm").is_dir() else []
    runs = []
    for d in folders:
        if not (d / "metrics.json").exists():
            U.log(f"DFM study: skipping {d}, still training (no metrics.json)")
            continue
        cfg = U.read_json(d / "config.json")
        rows = [r for r in U.read_jsonl(d / "log.jsonl") if "loss" in r]
        runs.append({"name": d.name, "folder": d, "cfg": cfg, "rows": rows, "metrics": U.read_json(d / "metrics.json"),
                     "seed": cfg["seed"], "pool": 0 if cfg["dfm"] == "off" else len(cfg["dfm_augmentations"])})
    for r in runs[1:]:
        differ = [k for k in DFM_SAME if r["cfg"].get(k) != runs[0]["cfg"].get(k)]
        if differ:
            raise U.DataError(f"DFM study: {r['folder']} and {runs[0]['folder']} differ in {differ}; "
                              f"the study compares runs that differ in --seed and the DFM pool only")
    return runs


def pool_groups(runs: list[dict]) -> dict[int, list[dict]]:
    """Runs by pool size (0 = no DFM), each group cut to the seeds that every size has."""
    sizes = sorted({r["pool"] for r in runs})
    common = set.intersection(*({r["seed"] for r in runs if r["pool"] == n} for n in sizes))
    return {n: [r for r in runs if r["pool"] == n and r["seed"] in common] for n in sizes}


def dfm_study(run: Path) -> dict | None:
    """metrics.json's "dfm_study": Fig. 5's claims, DFM (full pool) against no DFM, paired by
    seed — final loss (mean over the last tenth of steps) and mean loss over training (the
    area under the curve: lower is faster convergence) — then the pool sweep, and what DFM
    did: the share of each batch Eq. 10 flags, the flagged pairs' loss beside the batch's,
    and their augmented copies' loss beside the originals'."""
    runs = dfm_runs(run)
    if not runs:
        return None
    for r in runs:
        r["final_loss"] = r["metrics"]["final_loss"]
        r["mean_loss"] = float(np.mean([x["loss"] for x in r["rows"]]))
    full = max(r["pool"] for r in runs)
    on = {r["seed"]: r for r in runs if r["pool"] == full and full > 0}
    off = {r["seed"]: r for r in runs if r["pool"] == 0}
    seeds = sorted(set(on) & set(off))
    study = {"settings": {k: runs[0]["cfg"].get(k) for k in DFM_SAME},
             "runs": {r["name"]: {k: r[k] for k in ("seed", "pool", "final_loss", "mean_loss")} for r in runs},
             "seeds": seeds, "pool": {}}
    for key in ("final_loss", "mean_loss"):  # lower is better: better = −1
        study[key] = {"on": stats.spread([on[s][key] for s in seeds]) if seeds else None,
                      "off": stats.spread([off[s][key] for s in seeds]) if seeds else None,
                      "on-off": stats.paired_t_interval([on[s][key] - off[s][key] for s in seeds], -1.0) if seeds else None}
    for n, members in pool_groups(runs).items():  # over the seeds every pool size has
        study["pool"][str(n)] = {"seeds": [r["seed"] for r in members],
                                 **{k: float(np.mean([r[k] for r in members])) for k in ("final_loss", "mean_loss")}}
    flagged = [x for r in on.values() for x in r["rows"] if x.get("dfm_hard")]
    batch = study["settings"]["batch"]
    study["why"] = {
        "flagged_share_per_step": float(np.mean([x.get("dfm_hard", 0) / batch for r in on.values() for x in r["rows"]]))
        if on else None,
        "pairs_ever_flagged": float(np.mean([r["metrics"]["dfm_pairs_flagged"] / r["metrics"]["n_pairs"]
                                             for r in on.values()])) if on else None,
        "batch_loss": float(np.mean([x["loss"] for x in flagged])) if flagged else None,
        "flagged_loss": float(np.mean([x["dfm_hard_loss"] for x in flagged])) if flagged else None,
        "copy_loss": float(np.mean([x["dfm_copy_loss"] for x in flagged])) if flagged else None,
        "aug_wins": {a: sum(r["metrics"]["aug_wins"][a] for r in on.values()) for a in C.AUGMENTATIONS},
        "flagged_by_kind": {k: sum(r["metrics"]["dfm_flagged_by_kind"].get(k, 0) for r in on.values())
                            for k in sorted({k for r in on.values() for k in r["metrics"]["dfm_flagged_by_kind"]})},
    }
    study["_runs"] = runs  # for the figure; dropped before metrics.json is written
    return study


def dfm_sentences(study: dict) -> list[str]:
    """The report's statement of Fig. 5's claims, each from its interval, and the why."""
    out = []
    for key, claim in (("final_loss", "DFM lowers the final training loss"),
                       ("mean_loss", "DFM converges faster (lower mean loss over training)")):
        c, on, off = study[key]["on-off"], study[key]["on"], study[key]["off"]
        if c is None:
            continue
        ci = f"[{c['lo']:+.4f}, {c['hi']:+.4f}]" if c["lo"] is not None else "(one seed: no interval)"
        out.append(f"- {claim}: **{c['verdict'] or 'one seed'}**. On {on['mean']:.4f} ± {on['std']:.4f}, "
                   f"off {off['mean']:.4f} ± {off['std']:.4f} (mean ± sd over {c['n']} seeds); "
                   f"on − off = {c['diff']:+.4f}, 95% t-interval of the paired difference {ci}.")
    w = study["why"]
    if w["flagged_loss"] is not None:
        wins = ", ".join(f"{a} {n}" for a, n in w["aug_wins"].items())
        kinds = ", ".join(f"{k} {n}" for k, n in w["flagged_by_kind"].items())
        out.append(f"- What DFM did: Eq. 10 flagged {w['flagged_share_per_step']:.0%} of each batch on average and "
                   f"{w['pairs_ever_flagged']:.0%} of the pairs at least once (by kind: {kinds}). At the steps with "
                   f"flags, the flagged pairs' loss was {w['flagged_loss']:.3f} against the batch's "
                   f"{w['batch_loss']:.3f}, and their augmented copies' {w['copy_loss']:.3f}. Eq. 11 chose: {wins}.")
    return out


def plot_dfm_study(study: dict, path: Path) -> None:
    """Fig. 5. Left: training loss against step, DFM on and off, mean over seeds with the
    min-max band. Right: each augmentation pool's loss minus the no-DFM run's of the same
    seed (same batches, t and ε), so the effect of the pool's size stands out of the noise."""
    runs = study["_runs"]
    fig, (ax_l, ax_r) = plots.pyplot().subplots(1, 2, figsize=(10, 3.8), layout="constrained")
    window = max(1, study["settings"]["steps"] // 15)
    full = max(r["pool"] for r in runs)
    loss = lambda r, n: np.array([x["loss"] for x in r["rows"][:n]])
    for i, (label, members) in enumerate(((f"DFM on ({full} augmentations)", [r for r in runs if r["pool"] == full]),
                                          ("DFM off", [r for r in runs if r["pool"] == 0]))):
        if not members:
            continue
        n = min(len(m["rows"]) for m in members)
        steps = [x["step"] for x in members[0]["rows"][:n]]
        curves = np.stack([plots.moving_average(loss(m, n), window) for m in members])
        ax_l.plot(steps, curves.mean(0), color=f"C{i}", label=f"{label}, {len(members)} seed(s)")
        if len(members) > 1:
            ax_l.fill_between(steps, curves.min(0), curves.max(0), color=f"C{i}", alpha=0.2)
    groups = pool_groups(runs)
    off = {r["seed"]: r for r in groups.get(0, [])}
    for i, (size, members) in enumerate(g for g in groups.items() if g[0] > 0):
        n = min(min(len(m["rows"]), len(off[m["seed"]]["rows"])) for m in members)
        steps = [x["step"] for x in members[0]["rows"][:n]]
        diff = np.stack([plots.moving_average(loss(m, n) - loss(off[m["seed"]], n), window) for m in members]).mean(0)
        ax_r.plot(steps, diff, color=f"C{i + 2}", label=f"pool of {size}, {len(members)} seed(s)")
    ax_r.axhline(0, color="grey", lw=1)
    for ax in (ax_l, ax_r):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_xlabel("step")
    ax_l.set(ylabel=f"DPO loss (moving average of {window})",
             title=f"DFM on / off (paper Fig. 5, left); {study['settings']['pair_subset']} pairs")
    ax_r.set(ylabel="loss − no-DFM loss, same seed", title="size of the augmentation pool (Fig. 5, right)")
    plots.save_figure(fig, path)


# ---------------------------------------------------------------------------------------
# 3. The report's section
# ---------------------------------------------------------------------------------------

def section(ev) -> dict | None:
    """DIR/eval/dfm_study.md and dfm_study.png, when DIR/dfm/ holds finished study runs."""
    study = dfm_study(ev.run)
    if not study:
        return None
    plot_dfm_study(study, ev.out / "dfm_study.png")
    study = {k: v for k, v in study.items() if k != "_runs"}
    st = study["settings"]
    lines = [f"{st['pair_subset']} pairs, {st['steps']} steps of {st['batch']}, K = {st['dfm_k']}, "
             f"τ = {st['dfm_tau']:g}, P = {st['dfm_patience']}", "", *dfm_sentences(study), "",
             U.markdown_table(["pool size", "seeds", "final loss", "mean loss"],
                              [[n, ", ".join(map(str, v["seeds"])), f"{v['final_loss']:.4f}", f"{v['mean_loss']:.4f}"]
                               for n, v in study["pool"].items()]),
             "", "![dfm_study.png](dfm_study.png)"]
    return {"name": "dfm_study", "title": "The DFM study (paper Fig. 5)", "lines": lines, "metrics": study}


if __name__ == "__main__":
    U.run_commands(COMMANDS, __doc__)
