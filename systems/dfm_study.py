"""The DFM study (~265 lines): the paper's Fig. 5 where Eq. 10 can measure descent rates.

In the toy's full training each pair is visited a handful of times, too few for a queue of
K losses to fill. `make dfm` trains stage 4 on a small subset of the pairs (--pair-subset),
long enough that every pair is visited ~50 times, with DFM on and off over seeds, with
smaller augmentation pools, and with other thresholds τ of Eq. 10 (Fig. 5 left), into
DIR/dfm/<name>/. Runs that share a seed share every batch, every timestep and every noise
draw (all are functions of (seed, step)), so on − off is paired by seed.

Command:  python -m systems.dfm_study train --pair-subset N --name dfm/NAME [stage 4's flags]
Stage 5 calls `section` (registry.SECTIONS): the final and mean loss with DFM on and off,
their paired t intervals over seeds, the τ sweep and the pool sweep, what DFM did, and the
figure DIR/eval/dfm_study.png.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

import common as C
from lib import data as D
from lib import plots
from lib import stats
from lib import utils as U

S4 = U.load_script("04_train_spo.py")


# ---------------------------------------------------------------------------------------
# 1. The runs: stage 4 on the same N pairs for every seed and pool
# ---------------------------------------------------------------------------------------

class Subset(S4.SPO):
    """Stage 4's training as it is, on --pair-subset of the relabelled pairs."""

    def pairs(self, args, hf):
        pairs, counts = super().pairs(args, hf)
        return D.pair_subset(pairs, args.pair_subset), counts

    def publish(self, tr):
        """No model.json: a study run is read from its logs, not evaluated as a model."""


U.PRESETS["toy"]["dfm_study"] = dict(U.PRESETS["toy"]["spo"], pair_subset=48)
U.PRESETS["sd15"]["dfm_study"] = dict(U.PRESETS["sd15"]["spo"], pair_subset=512)
U.TINY["dfm_study"] = dict(U.TINY["spo"], pair_subset=4)


def train_parser():
    p = S4.parser("dfm_study", "The DFM study: stage 4 on a small subset of the pairs, visited often")
    p.add_argument("--pair-subset", type=int,
                   help="train on N of the relabelled pairs, the same N for every --seed (chosen by a hash of the "
                        "pair, data.pair_subset)")
    return p


COMMANDS = {"train": (train_parser, lambda args: S4.train(args, Subset()))}


# ---------------------------------------------------------------------------------------
# 2. The study: Fig. 5's claims from the finished runs, paired by seed
# ---------------------------------------------------------------------------------------

DFM_SAME = ("objective", "lam", "pair_subset", "steps", "batch", "lr", "warmup", "dfm_k", "dfm_patience")


def dfm_runs(run: Path) -> list[dict]:
    """The finished runs under DIR/dfm/: settings, per-step log and stage-4 metrics. Runs
    that differ in anything but the seed, the DFM pool and τ are not comparable: an error."""
    folders = sorted(d for d in (run / "dfm").iterdir() if (d / "config.json").exists()) if (run / "dfm").is_dir() else []
    runs = []
    for d in folders:
        if not (d / "metrics.json").exists():
            U.log(f"DFM study: skipping {d}, still training (no metrics.json)")
            continue
        cfg = U.read_json(d / "config.json")
        rows = [r for r in U.read_jsonl(d / "log.jsonl") if "loss" in r]
        runs.append({"name": d.name, "folder": d, "cfg": cfg, "rows": rows, "metrics": U.read_json(d / "metrics.json"),
                     "seed": cfg["seed"], "pool": 0 if cfg["dfm"] == "off" else len(cfg["dfm_augmentations"]),
                     "tau": None if cfg["dfm"] == "off" else cfg["dfm_tau"]})
    for r in runs[1:]:
        differ = [k for k in DFM_SAME if r["cfg"].get(k) != runs[0]["cfg"].get(k)]
        if differ:
            raise U.DataError(f"DFM study: {r['folder']} and {runs[0]['folder']} differ in {differ}; "
                              f"the study compares runs that differ in --seed, the DFM pool and --dfm-tau only")
    return runs


def reference_tau(runs: list[dict]) -> float:
    """The τ of the on/off comparison and of the pool sweep: stage 4's preset value."""
    return U.PRESETS[runs[0]["cfg"]["preset"]]["spo"]["dfm_tau"]


def pool_groups(runs: list[dict]) -> dict[int, list[dict]]:
    """Runs at the reference τ by pool size (0 = no DFM), each group cut to the seeds that
    every size has."""
    tau = reference_tau(runs)
    runs = [r for r in runs if r["tau"] in (None, tau)]
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
    full, tau = max(r["pool"] for r in runs), reference_tau(runs)
    on = {r["seed"]: r for r in runs if r["pool"] == full and full > 0 and r["tau"] == tau}
    off = {r["seed"]: r for r in runs if r["pool"] == 0}
    seeds = sorted(set(on) & set(off))
    study = {"settings": {**{k: runs[0]["cfg"].get(k) for k in DFM_SAME}, "dfm_tau": tau},
             "runs": {r["name"]: {k: r[k] for k in ("seed", "pool", "tau", "final_loss", "mean_loss")} for r in runs},
             "seeds": seeds, "pool": {}, "tau": tau_sweep(runs, full, off)}
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


def tau_sweep(runs: list[dict], full: int, off: dict[int, dict]) -> dict[str, dict]:
    """Fig. 5 left: for each τ (full pool) and for no DFM, the final and mean loss as mean ±
    sd over seeds, and on − off paired by seed with its t interval (lower is better)."""
    out = {}
    for tau in sorted({r["tau"] for r in runs if r["pool"] == full and r["tau"] is not None}):
        members = {r["seed"]: r for r in runs if r["pool"] == full and r["tau"] == tau}
        paired = sorted(set(members) & set(off))
        out[f"{tau:g}"] = {"seeds": sorted(members), **{
            key: {**stats.spread([m[key] for m in members.values()]),
                  "on-off": stats.paired_t_interval([members[s][key] - off[s][key] for s in paired], -1.0)
                  if paired else None} for key in ("final_loss", "mean_loss")}}
    if off:
        out["off"] = {"seeds": sorted(off), **{key: stats.spread([r[key] for r in off.values()])
                                                for key in ("final_loss", "mean_loss")}}
    return out


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


def plot_curves(ax, groups: list[tuple[str, list[dict]]], window: int, off: dict[int, dict] | None = None,
                first_color: int = 0) -> None:
    """Each group's training loss against step, or with `off` its loss minus the no-DFM run's
    of the same seed (same batches, t and ε, so DFM's effect stands out of the noise): the
    mean over its seeds, with the min-max band."""
    for i, (label, members) in enumerate(g for g in groups if g[1]):
        n = min(len(m["rows"]) for m in [*members, *(off[m["seed"]] for m in members if off)])
        steps = [x["step"] for x in members[0]["rows"][:n]]
        loss = lambda r: np.array([x["loss"] for x in r["rows"][:n]])
        curves = np.stack([plots.moving_average(loss(m) - (loss(off[m["seed"]]) if off else 0), window) for m in members])
        color = f"C{i + first_color}"
        ax.plot(steps, curves.mean(0), color=color, label=f"{label}, {len(members)} seed(s)")
        if len(members) > 1:
            ax.fill_between(steps, curves.min(0), curves.max(0), color=color, alpha=0.2)
    if off:
        ax.axhline(0, color="grey", lw=1)


def plot_dfm_study(study: dict, path: Path) -> None:
    """Fig. 5. Left: training loss against step, DFM on (at the reference τ) and off, mean
    over seeds with the min-max band. Middle: every τ of the sweep, its loss minus the no-DFM
    run's of the same seed, mean and band over seeds. Right: the same, for each augmentation
    pool at the reference τ."""
    runs = study["_runs"]
    fig, (ax_l, ax_t, ax_r) = plots.pyplot().subplots(1, 3, figsize=(15, 3.8), layout="constrained")
    window = max(1, study["settings"]["steps"] // 15)
    full, tau = max(r["pool"] for r in runs), study["settings"]["dfm_tau"]
    plot_curves(ax_l, [(f"DFM on ({full} augmentations)", [r for r in runs if r["pool"] == full and r["tau"] == tau]),
                       ("DFM off", [r for r in runs if r["pool"] == 0])], window)
    off = {r["seed"]: r for r in runs if r["pool"] == 0}
    taus = sorted({r["tau"] for r in runs if r["pool"] == full and r["tau"] is not None})
    plot_curves(ax_t, [(f"τ = {t:g}", [r for r in runs if r["pool"] == full and r["tau"] == t and r["seed"] in off])
                       for t in taus], window, off)
    groups = pool_groups(runs)
    plot_curves(ax_r, [(f"pool of {size}", members) for size, members in groups.items() if size > 0], window,
                {r["seed"]: r for r in groups.get(0, [])}, first_color=2)
    for ax in (ax_l, ax_t, ax_r):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_xlabel("step")
    ax_l.set(ylabel=f"DPO loss (moving average of {window})",
             title=f"DFM on / off at τ = {tau:g}; {study['settings']['pair_subset']} pairs")
    ax_t.set(ylabel="loss − no-DFM loss, same seed", title="the threshold τ of Eq. 10 (paper Fig. 5, left)")
    ax_r.set(ylabel="loss − no-DFM loss, same seed", title="size of the augmentation pool (Fig. 5, right)")
    plots.save_figure(fig, path)


# ---------------------------------------------------------------------------------------
# 3. The report's section
# ---------------------------------------------------------------------------------------

def tau_table(sweep: dict) -> str:
    """The τ sweep as a table: each τ's mean loss and final loss, and their on − off intervals."""
    cell = lambda v: f"{v['mean']:.4f} ± {v['std']:.4f}" if v["n"] > 1 else f"{v['mean']:.4f}"
    diff = lambda c: "—" if c is None else (f"{c['diff']:+.4f} [{c['lo']:+.4f}, {c['hi']:+.4f}] {c['verdict']}"
                                            if c["lo"] is not None else f"{c['diff']:+.4f} (one seed)")
    return U.markdown_table(["τ", "seeds", "mean loss", "on − off", "final loss", "on − off"],
                            [[t, ", ".join(map(str, v["seeds"])), cell(v["mean_loss"]), diff(v["mean_loss"].get("on-off")),
                              cell(v["final_loss"]), diff(v["final_loss"].get("on-off"))] for t, v in sweep.items()])


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
                               for n, v in study["pool"].items()]), "", "The τ sweep (Fig. 5 left; mean ± sd over seeds; "
             "on − off paired by seed, 95% t interval):", "", tau_table(study["tau"]),
             "", "![dfm_study.png](dfm_study.png)"]
    return {"name": "dfm_study", "title": "The DFM study (paper Fig. 5)", "lines": lines, "metrics": study}


if __name__ == "__main__":
    U.run_commands(COMMANDS, __doc__)
