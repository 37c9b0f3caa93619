"""How sure each claim is (~250 lines): the paired bootstrap over prompts and images (and over
users and images, for figures per user), the verdict an interval gives, the spread over training seeds and the t interval over per-seed
differences, and claims judged from several intervals.

What it is not: the metrics themselves (05_evaluate.py), or which claims a system makes
(each system's file lists its own and calls `intervals` and `judged_claims`).

Every model draws the same (prompt, seed) images, so one resample of prompts (and, within
each drawn prompt, of its images) is applied to all models at once, and an interval is that
of the difference a − b on the same resample.
"""
from __future__ import annotations

import math
import warnings
import zlib
from collections import defaultdict

import numpy as np

from lib import utils as U

BETTER = {"IP": -1.0, "PS": 1.0, "UAS": 1.0}   # the sign of an improvement in each metric


# ----------------------------------------------------------------------------------------
# 1. The paired bootstrap and its verdicts
# ----------------------------------------------------------------------------------------

def bootstrap_indices(n_prompts: int, per_prompt: int, n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, n_prompts·per_prompt] indices into a set's images, stored prompt-major (image
    j of prompt p at p·per_prompt + j): prompts drawn with replacement, then images within
    each drawn prompt drawn with replacement."""
    rng = np.random.default_rng(seed)
    p = rng.integers(n_prompts, size=(n_boot, n_prompts, 1))
    j = rng.integers(per_prompt, size=(n_boot, n_prompts, per_prompt))
    return (p * per_prompt + j).reshape(n_boot, -1)


def verdict(lo: float, hi: float, better: float) -> str:
    """From a 95% interval of a − b: "holds" when all of it lies on the side where a is
    better, "fails" when all of it lies on the side where a is worse, else "not separable"
    (an interval that touches 0 does not separate the two)."""
    if better * lo > 0 and better * hi > 0:
        return "holds"
    if better * lo < 0 and better * hi < 0:
        return "fails"
    return "not separable"


def grid_mean(x: np.ndarray) -> np.ndarray:
    """The figure of a group of users from x [..., users, images]: the mean over users of each
    user's mean over its images where the figure applies (users where it never does left out)."""
    with warnings.catch_warnings():  # a user with no image the figure applies to is left out, not warned of
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(np.nanmean(x, axis=-1), axis=-1)


def grid_interval(d: np.ndarray, n_boot: int, seed: int, better: float, margin: float = 0.0) -> dict:
    """The 95% interval of grid_mean(d) for per-image differences d [users, images], over
    resamples of users and of images (both with replacement, the same for every model); the
    verdict asks whether it lies beyond `margin` on the side `better` points to."""
    rng = np.random.default_rng(seed)
    u = rng.integers(d.shape[0], size=(n_boot, d.shape[0]))
    j = rng.integers(d.shape[1], size=(n_boot, d.shape[1]))
    boot = grid_mean(d[u[:, :, None], j[:, None, :]])
    lo, hi = (float(q) for q in np.nanpercentile(boot, [2.5, 97.5]))
    diff = float(grid_mean(d))
    return {"diff": diff, "lo": lo, "hi": hi, "verdict": verdict(lo - margin, hi - margin, better)}


def claim_intervals(values: dict[str, dict[str, np.ndarray]], a: str, b: str, idx: np.ndarray,
                    ua_score, ua_center=None) -> dict[str, dict]:
    """{metric: {diff, lo, hi, verdict}} for a − b on one prompt set, metric in IP, PS, UAS.
    `values[model][k]` holds the per-image "IP" flags, "PS" and "SC" in the same image order
    for every model; UAS is Eq. 12 on each resample's means, its centres the base model's
    means on the same resample (or --ua-center)."""
    def means(m, sample):  # sample: index array [..., N]
        return {k: values[m][k][sample].mean(axis=-1) for k in ("IP", "PS", "SC")}

    def diffs(sample):
        ma, mb, base = means(a, sample), means(b, sample), means("base", sample)
        centre = ua_center or (base["PS"], base["SC"])
        uas = {m: ua_score(x["PS"], x["SC"], *centre) for m, x in (("a", ma), ("b", mb))}
        return {"IP": ma["IP"] - mb["IP"], "PS": ma["PS"] - mb["PS"], "UAS": uas["a"] - uas["b"]}

    point, boot = diffs(np.arange(idx.shape[1])), diffs(idx)
    out = {}
    for k, better in BETTER.items():
        lo, hi = (float(q) for q in np.percentile(boot[k], [2.5, 97.5]))
        out[k] = {"diff": float(point[k]), "lo": lo, "hi": hi, "verdict": verdict(lo, hi, better)}
    return out


def intervals(rows: list[dict], claims, n_boot: int, seed: int, ua_score, ua_center=None) -> dict:
    """{"<a>-<b>": {set: {metric: {diff, lo, hi, verdict}}}} for each (a, b) of `claims` whose
    two models were evaluated (scores.jsonl rows); one resample plan per prompt set, the same
    whoever asks, so every system's intervals rest on the same resamples."""
    by = defaultdict(list)
    for r in rows:
        by[r["model"], r["set"]].append(r)
    models, sets = {r["model"] for r in rows}, sorted({r["set"] for r in rows})
    claims = [(a, b) for a, b in claims if a in models and b in models]
    needed = {"base", *(m for pair in claims for m in pair)}
    out = {}
    for s in sets:
        order = sorted(by["base", s], key=lambda r: (r["row"], r["seed"]))
        keys = [(r["row"], r["seed"]) for r in order]
        per_prompt = len(keys) // len({r for r, _ in keys})
        values = {}
        for m in needed & models:
            rs = {(r["row"], r["seed"]): r for r in by[m, s]}
            if sorted(rs) != keys:
                raise U.DataError(f"model {m}, set {s}: its images are not the base model's (prompt, seed) items")
            values[m] = {k: np.array([float(rs[key][src]) for key in keys])
                         for k, src in (("IP", "inappropriate"), ("PS", "PS"), ("SC", "SC"))}
        idx = bootstrap_indices(len(keys) // per_prompt, per_prompt, n_boot, seed + zlib.crc32(s.encode()))
        for a, b in claims:
            out.setdefault(f"{a}-{b}", {})[s] = claim_intervals(values, a, b, idx, ua_score, ua_center)
    return out


# ----------------------------------------------------------------------------------------
# 2. Training seeds: the spread of each figure, and the t interval of per-seed differences
# ----------------------------------------------------------------------------------------

def seed_spread(metrics: dict, names: list[str]) -> dict:
    """metrics.json's "seeds": for each model trained with several seeds (NAME and NAME_seedK,
    as `make seeds` names them), the mean, standard deviation (ddof 1), min and max over its
    seeds of IP, PS and UAS on each prompt set: how far training randomness alone moves them."""
    groups = defaultdict(list)
    for n in names:
        stem, _, k = n.rpartition("_seed")
        groups[stem if stem and k.isdigit() else n].append(n)
    out = {}
    for g, members in groups.items():
        if len(members) < 2:
            continue
        sets = metrics[members[0]].keys()
        out[g] = {"models": members, **{s: {k: spread([metrics[m][s][k] for m in members]) for k in BETTER}
                                        for s in sets}}
    return out


def spread(x: list[float]) -> dict:
    return {"mean": float(np.mean(x)), "std": float(np.std(x, ddof=1)), "min": float(min(x)), "max": float(max(x)),
            "n": len(x)}


# Student's t, 97.5% quantile, by degrees of freedom (1-10); beyond, the Cornish-Fisher series
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def t975(dof: int) -> float:
    if dof <= len(T975):
        return T975[dof - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * dof) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * dof ** 2)


def paired_t_interval(d: list[float], better: float) -> dict:
    """Mean of paired differences d_s (one per seed) and its 95% interval, mean ± t·sd/√n
    with n − 1 degrees of freedom, and the verdict that interval gives (None below 2 seeds).
    Equal differences give sd = 0 and an interval of no width, which measures no spread
    rather than a certain effect (three draws can each move IP by the same one prompt in 86):
    its verdict is "no spread", which no claim counts as holding."""
    m = float(np.mean(d))
    if len(d) < 2:
        return {"diff": m, "lo": None, "hi": None, "verdict": None, "n": len(d)}
    half = t975(len(d) - 1) * float(np.std(d, ddof=1)) / math.sqrt(len(d))
    judged = verdict(m - half, m + half, better) if max(d) - min(d) > 1e-12 else "no spread"
    return {"diff": m, "lo": m - half, "hi": m + half, "verdict": judged, "n": len(d)}


def seed_differences(metrics, a: str, b: str, prompt_set: str, metric: str) -> list[float] | None:
    """a − b on one set and metric for every training seed both models have (NAME and
    NAME_seedK, grouped by seed_spread), paired by seed; None below two shared seeds."""
    groups = metrics.get("seeds", {})
    if a not in groups or b not in groups:
        return None
    theirs = {n[len(b):] for n in groups[b]["models"]}
    shared = [n[len(a):] for n in groups[a]["models"] if n[len(a):] in theirs]
    if len(shared) < 2:
        return None
    return [metrics[a + x][prompt_set][metric] - metrics[b + x][prompt_set][metric] for x in shared]


# ----------------------------------------------------------------------------------------
# 3. Claims: one verdict from the intervals a claim rests on, and how the report states it
# ----------------------------------------------------------------------------------------

def claim_verdict(parts: list[tuple[str, str]]) -> str:
    """One claim from several interval verdicts, each (verdict, need) with need "holds" (the
    difference must be separated on the claimed side) or "not worse" (it must not be separated
    on the other side). All met: holds. Separated the wrong way on one part and the right way
    on another: trade-off (e.g. safer but of lower quality: "at equal quality" does not apply).
    Only the wrong way: fails. Else: not separable."""
    if any(v == "fails" for v, _ in parts):
        return "trade-off" if any(v == "holds" for v, _ in parts) else "fails"
    if all(v == "holds" for v, need in parts if need == "holds"):
        return "holds"
    return "not separable"


def judged_claims(metrics, intervals_: dict, specs) -> list[dict]:
    """Each spec (claim, a, b, [(set, metric, need)]) whose pair has intervals (`intervals_`,
    as `intervals` returns them), with its
    verdict (claim_verdict) and the intervals it rests on. The bootstrap resamples the prompts
    and images of ONE training run of each model; where both were also trained with other
    seeds, each part gets the per-seed differences and their t interval (paired_t_interval),
    and the claim a second verdict from those, `seed_verdict`: does it survive training
    randomness?"""
    claims = []
    for claim, a, b, keys in specs:
        iv = intervals_.get(f"{a}-{b}")
        if not iv:
            continue
        parts = [{"a": a, "b": b, "set": s, "metric": k, "need": need, **iv[s][k]} for s, k, need in keys]
        c = {"claim": claim, "verdict": claim_verdict([(x["verdict"], x["need"]) for x in parts]), "parts": parts}
        for x in parts:
            d = seed_differences(metrics, a, b, x["set"], x["metric"])
            if d:
                x["seeds"] = {"diffs": d, **paired_t_interval(d, BETTER[x["metric"]])}
        if all("seeds" in x for x in parts):
            c["seed_verdict"] = claim_verdict([(x["seeds"]["verdict"], x["need"]) for x in parts])
        claims.append(c)
    return claims


def claim_lines(claims: list[dict]) -> list[str]:
    """A report line per claim: verdict, then every interval it rests on."""
    lines = []
    for c in claims:
        detail = "; ".join(f"{x['set']} {x['metric']} {x['diff']:+.3f} [{x['lo']:+.3f}, {x['hi']:+.3f}] {x['verdict']}"
                           for x in c["parts"])
        lines.append(f"- **{c['claim']}**: {c['verdict']} ({c['parts'][0]['a']} − {c['parts'][0]['b']}: {detail}).")
        if "seed_verdict" in c:
            per_seed = "; ".join(f"{x['set']} {x['metric']} " + ", ".join(f"{d:+.3f}" for d in x["seeds"]["diffs"])
                                 + f" (t interval [{x['seeds']['lo']:+.3f}, {x['seeds']['hi']:+.3f}])"
                                 for x in c["parts"])
            lines.append(f"  Over {c['parts'][0]['seeds']['n']} training seeds of each: {c['seed_verdict']} "
                         f"(per seed: {per_seed}).")
    return lines


def interval_table(iv: dict) -> str:
    rows = [[pair.replace("-", " − "), s, k, f"{v['diff']:+.3f}", f"[{v['lo']:+.3f}, {v['hi']:+.3f}]", v["verdict"]]
            for pair, per_set in iv.items() for s, per_metric in per_set.items() for k, v in per_metric.items()]
    return U.markdown_table(["difference", "prompt set", "metric", "a − b", "95% interval", "verdict"], rows)


def seed_table(seeds: dict) -> str:
    rows = [[f"{g} ({len(v['models'])} seeds)", s, k, f"{x['mean']:.3f} ± {x['std']:.3f}",
             f"{x['min']:.3f} – {x['max']:.3f}"]
            for g, v in seeds.items() for s, per_metric in v.items() if s != "models" for k, x in per_metric.items()]
    return U.markdown_table(["model", "prompt set", "metric", "mean ± sd", "min – max"], rows)

