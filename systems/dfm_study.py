"""The DFM study (~600 lines): the paper's Fig. 5 where Eq. 10 can measure descent rates, and
whether what Eq. 10 measures there is signal or noise.

In the toy's full training each pair is visited a handful of times, too few for a queue of
K losses to fill. `make dfm` trains stage 4 on a small subset of the pairs (--pair-subset),
long enough that every pair is visited ~50 times, with DFM on and off over seeds, with
smaller augmentation pools, with other thresholds τ of Eq. 10 (Fig. 5 left) and with another
reading of Eq. 10 (--dfm-reading: what its queue records), into DIR/dfm/<name>/. Runs that
share a seed share every batch, every timestep and every noise draw (all are functions of
(seed, step)), so on − off is paired by seed. Each run ends with its implicit accuracy on
--heldout pairs it never trained on (a lower training loss alone can come from easier copies).

Commands:
  python -m systems.dfm_study train --pair-subset N --name dfm/NAME [stage 4's flags]
  python -m systems.dfm_study signal --pair-subset N --name dfm_signal [stage 4's flags]
      Is a descent rate signal or noise? Stage 4 with DFM off; at each step, before the update,
      Eq. 10's queue under every reading and several τ reads the batch (nothing steers the
      training), and every (K − 1)·N/B steps, the span of a full queue, each pair's loss at
      --draws fixed (t, ε). Writes DIR/NAME/signal.json and signal.md (`signal_figures`).
Stage 5 calls `section` (registry.SECTIONS): the final and mean loss with DFM on and off,
their paired t intervals over seeds, the τ sweep, the readings and the pool sweep, what DFM
did, and the figure DIR/eval/dfm_study.png.

What it is not: DFM itself (common.py, Eqs. 10-11; stage 4 runs it).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

import common as C
from lib import data as D
from lib import models as M
from lib import plots
from lib import stats
from lib import utils as U

S4 = U.load_script("04_train_spo.py")


# ---------------------------------------------------------------------------------------
# 1. The runs: stage 4 on the same N pairs for every seed, pool, τ and reading
# ---------------------------------------------------------------------------------------

class Subset(S4.SPO):
    """Stage 4's training as it is, on --pair-subset of the relabelled pairs; at its end, the
    implicit accuracy on --heldout of the others (`heldout_figures`)."""

    def pairs(self, args, hf):
        pairs, counts = super().pairs(args, hf)
        subset = D.pair_subset(pairs, args.pair_subset)
        trained = {id(p) for p in subset}
        rest = [p for p in pairs if id(p) not in trained]
        self.heldout = D.pair_subset(rest, args.heldout) if args.heldout > 0 else []  # by the same hash
        return subset, counts

    def models(self, args, device):
        out = super().models(args, device)
        self.prompt_encoder = out[3]  # the held-out pairs' prompts are encoded at the end
        return out

    def publish(self, tr):
        """No model.json: a study run is read from its logs, not evaluated as a model. Its
        held-out figures go to heldout.json instead."""
        if self.heldout:
            U.atomic_write_json(tr.out / "heldout.json", heldout_figures(tr, self.heldout, self.prompt_encoder))


# Draws of (t, ε) per held-out pair, the same for every run (stream 0 of step −2 of seed 0): runs
# of any seed, pool, τ or reading are compared on the same pairs at the same t and ε
HELDOUT_DRAWS = 4


@torch.no_grad()
def heldout_figures(tr, pairs: list[dict], prompt_encoder) -> dict:
    """The trained policy on pairs it never saw: implicit accuracy (the share of (pair, draw)
    where Δ_θ < Δ_ref, as stage 4 logs it for its batches) and the mean DPO loss (Eq. 5)."""
    args, dev = tr.args, tr.dist.device
    latents, text, index = M.build_caches(args, pairs, tr.vae, prompt_encoder, tr.out / "heldout", tr.dist, tr.size)
    rows = index.repeat(HELDOUT_DRAWS, 1)
    g = U.step_generator(0, -2)
    t = torch.randint(0, tr.noise_scheduler.config.num_train_timesteps, (len(rows),), generator=g)
    noise = torch.randn((len(rows), *latents.shape[1:]), generator=g)
    losses, right = [], []
    for c in range(0, len(rows), args.batch):
        r = rows[c:c + args.batch]
        loss, d_theta, d_ref = C.dpo_pair_losses(
            tr.unet, tr.ref, tr.noise_scheduler, latents[r[:, 0]].to(dev), latents[r[:, 1]].to(dev),
            text[r[:, 2]].to(dev), t[c:c + args.batch].to(dev), noise[c:c + args.batch].to(dev), args.beta, tr.autocast)
        losses.append(loss.float().cpu())
        right.append((d_theta < d_ref).float().cpu())
    return {"heldout_pairs": len(pairs), "heldout_draws": HELDOUT_DRAWS,
            "heldout_implicit_accuracy": float(torch.cat(right).mean()), "heldout_loss": float(torch.cat(losses).mean())}


U.PRESETS["toy"]["dfm_study"] = dict(U.PRESETS["toy"]["spo"], pair_subset=48, heldout=256)
U.PRESETS["sd15"]["dfm_study"] = dict(U.PRESETS["sd15"]["spo"], pair_subset=512, heldout=512)
U.TINY["dfm_study"] = dict(U.TINY["spo"], pair_subset=4, heldout=4)


def train_parser(stage: str = "dfm_study", description: str = "The DFM study: stage 4 on a small subset of the pairs, "
                                                             "visited often"):
    p = S4.parser(stage, description)
    p.add_argument("--pair-subset", type=int,
                   help="train on N of the relabelled pairs, the same N for every --seed (chosen by a hash of the "
                        "pair, data.pair_subset)")
    p.add_argument("--heldout", type=int, help="at the end, the implicit accuracy on N other pairs (0: none)")
    return p


# ---------------------------------------------------------------------------------------
# 2. Is a descent rate signal or noise? Eq. 10's queue read beside a DFM-off run
# ---------------------------------------------------------------------------------------

# the thresholds the signal run's queues flag at, besides --dfm-tau: Fig. 5 left's
SIGNAL_TAUS = (0.05, 0.2, 0.5, 1.0)
U.PRESETS["toy"]["dfm_signal"] = dict(U.PRESETS["toy"]["dfm_study"], heldout=0, draws=8)
U.PRESETS["sd15"]["dfm_signal"] = dict(U.PRESETS["sd15"]["dfm_study"], heldout=0, draws=8)
U.TINY["dfm_signal"] = dict(U.TINY["dfm_study"], heldout=0, draws=3, dfm_k=2)


def signal_parser():
    p = train_parser("dfm_signal", "Is a descent rate (Eq. 10) signal or noise? Measured beside a DFM-off run")
    p.add_argument("--draws", type=int, help="(t, ε) draws per pair at each measurement at fixed weights")
    return p


def signal(args) -> None:
    """Stage 4 with DFM off on --pair-subset; before each update, Eq. 10's queue under every
    reading and every SIGNAL_TAUS reads the batch (`read_step`), and every `span` steps each
    pair's loss at fixed weights at --draws (t, ε) draws, the same draws each time
    (`fixed_losses`). The queues steer nothing: every reading is read on one trajectory."""
    args.dfm = "off"
    tr = S4.setup(args, Subset())
    if tr.dist.world_size > 1:
        raise SystemExit("python -m systems.dfm_study signal runs on one process")
    if tr.step:
        raise SystemExit(f"{tr.out} holds a checkpoint: the signal run starts from step 0 (its queues are not "
                         f"saved); pass another --name")
    n_t, shape = tr.noise_scheduler.config.num_train_timesteps, tuple(tr.latents.shape[1:])
    span = (args.dfm_k - 1) * (len(tr.pairs) // args.batch)  # a queue's first to last visit
    reading = lambda r: C.DescentReading(r, args.seed, n_t, shape)
    queues = {(r, tau): C.DescentRateQueue(args.dfm_k, tau, args.dfm_patience, reading(r))
              for r in C.DFM_READINGS for tau in sorted({*SIGNAL_TAUS, args.dfm_tau})}
    draws = fixed_draws(args.seed, len(tr.pairs), args.draws, n_t, shape)
    modules = M.dfm_layers(tr.unet, args)
    visits, tables, scores = [], {}, []
    while tr.step < args.steps:
        if tr.step % span == 0 and tr.step:
            tables[tr.step] = fixed_losses(tr, *draws)
        visits += read_step(tr, queues, modules, scores)
        S4.train_step(tr)
    if tr.step % span == 0:
        tables[tr.step] = fixed_losses(tr, *draws)
    figures = signal_figures(args, visits, tables, draws[0], scores, span, n_t)
    U.write_jsonl(tr.out / "visits.jsonl", visits)
    U.atomic_write_json(tr.out / "signal.json", figures)
    (tr.out / "signal.md").write_text("\n\n".join(signal_tables(figures)) + "\n")
    U.log("\n\n".join(signal_tables(figures)))


def fixed_draws(seed: int, n_pairs: int, draws: int, n_t: int, shape) -> tuple[torch.Tensor, torch.Tensor]:
    """[P, D] timesteps and [P, D, ...] noise: pair i's D draws from stream i of step −3."""
    gens = [U.step_generator(seed, -3, i) for i in range(n_pairs)]
    t = torch.stack([torch.randint(0, n_t, (draws,), generator=g) for g in gens])
    return t, torch.stack([torch.randn((draws, *shape), generator=g) for g in gens])


@torch.no_grad()
def fixed_losses(tr, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """[P, D]: every pair's loss (Eq. 5) at the current weights, at each of its draws."""
    n_pairs, draws = t.shape
    ids = torch.arange(n_pairs).repeat_interleave(draws).tolist()
    t, noise = t.flatten(), noise.flatten(0, 1)
    out = [S4.pair_losses(tr, ids[c:c + 64], t[c:c + 64], noise[c:c + 64])[0].float().cpu()
           for c in range(0, len(ids), 64)]
    return torch.cat(out).view(n_pairs, draws)


def read_step(tr, queues: dict, modules, scores: list) -> list[dict]:
    """The coming step's batch as Eq. 10 reads it, before the update as in stage 4: each visit's
    loss, and per (reading, τ) the value recorded, v_i, v̄ and whether the visit was slow
    (v_i < τ·v̄) and flagged (slow on P visits in a row). For the pairs the paper's reading
    flags at the preset's τ, Eq. 11's 1 − cos(g_i, g_i^a) for every augmentation, as stage 4
    would compute them at this step, and how far each moves the pair's latents."""
    args, step = tr.args, tr.step
    n_t = tr.noise_scheduler.config.num_train_timesteps
    ids, t, noise = M.draw_batch(len(tr.pairs), args.batch, tr.mine, args.seed, step, n_t, tr.latents.shape[1:])
    with torch.no_grad():
        losses = S4.pair_losses(tr, ids, t, noise)[0].float().cpu()
    probed = []

    def probe(t_i, noise_i):  # one forward a step, whichever τ asks
        if not probed:
            probed.append(S4.pair_losses(tr, ids, t_i, noise_i)[0])
        return probed[0]

    rows = [{"step": step, "pair": i, "t": int(t[j]), "loss": float(losses[j])} for j, i in enumerate(ids)]
    for (r, tau), q in queues.items():
        hard = set(q.update(ids, losses, t, probe))
        for j, i in enumerate(ids):
            rows[j][f"{r}@{tau:g}"] = {"value": q.queues[i][-1], "v": q.rate(i), "v_bar": q.v_bar,
                                      "slow": q.streak.get(i, 0) > 0, "hard": i in hard}
    flagged = [(j, i) for j, i in enumerate(ids) if rows[j][f"loss@{args.dfm_tau:g}"]["hard"]]
    if flagged:
        hard = [C.HardPair(tr.pairs[i], tr.latents[tr.index[i, :2]], tr.text[tr.index[i, 2]][None], t[j:j + 1],
                           noise[j:j + 1], U.step_generator(args.seed, step, 1 + j)) for j, i in flagged]
        variants = C.augmented_variants(hard, tr.vae, tr.size, args.dfm_augmentations)
        score = C.augmentation_scores(tr.unet, tr.noise_scheduler, modules, hard, variants, tr.autocast)
        for s, v in zip(score.tolist(), variants):
            moved = ((v[1:] - v[:1]).flatten(1).norm(dim=1) / v[0].norm()).tolist()
            scores.append({"score": dict(zip(args.dfm_augmentations, s)),
                           "latent_change": dict(zip(args.dfm_augmentations, moved))})
    return rows


def reading_tables(loss: torch.Tensor, t: torch.Tensor, n_t: int, bins: int = 10) -> dict[str, torch.Tensor]:
    """[P, D] losses at fixed weights as each reading records them. The probe records a loss
    at one draw, so its table is the loss's; normalised divides each by the mean loss in its
    t's bin over every pair and draw (the expected loss at t at these weights) and multiplies
    by the mean of those bin means, as `DescentReading` does with its running means."""
    b = (t * bins // n_t).flatten()
    flat = loss.flatten()
    means = torch.stack([flat[b == k].mean() if (b == k).any() else torch.tensor(float("nan")) for k in range(bins)])
    expected = means[b].view_as(loss) / means[~means.isnan()].mean()
    return {"loss": loss, "probe": loss, "normalised": loss / expected}


def fixed_weight_snr(before: torch.Tensor, after: torch.Tensor, same_draw: bool, batch: int) -> dict:
    """Signal against noise of v_i = (L^(1) − L^(K))/(K − 1) for each pair, from its losses at the
    weights of a queue's first visit (`before`, [P, D]) and of its last (`after`, K − 1
    visits later, the same D draws). Signal: the change of the pair's expected value, δ_i =
    E L^(1) − E L^(K). Noise: the sd of L^(1) − L^(K) over the reading's draws: two independent
    draws (loss, normalised: √(σ_1² + σ_K²)) or one draw kept at both visits (probe: the sd
    over draws of the paired change). v̄, the mean of `batch` pairs' v_i: signal the mean δ_i,
    noise √(mean sd_i² / batch); P(v̄ ≤ 0) = Φ(−SNR) under a normal approximation. The
    reliability var(δ)/(var(δ) + mean sd²) is the share of the spread of v_i across pairs that
    is their true difference: the part of the rule v_i < τ·v̄ that can find lagging pairs."""
    delta = before.mean(1) - after.mean(1)
    sd = (before - after).std(1) if same_draw else (before.var(1) + after.var(1)).sqrt()
    snr = delta / sd.clamp_min(1e-12)
    v_bar_snr = float(delta.mean() / (sd.pow(2).mean() / batch).sqrt().clamp_min(1e-12))
    var_delta = float(delta.var())
    return {"pair_snr": snr.tolist(), "delta": delta.tolist(), "noise_sd": sd.tolist(),
            "visit_sd": before.std(1).mean().item() if not same_draw else 0.0,
            "v_bar_snr": v_bar_snr, "v_bar_nonpositive_model": 0.5 * math.erfc(v_bar_snr / math.sqrt(2)),
            "reliability": var_delta / (var_delta + float(sd.pow(2).mean()))}


def flag_figures(visits: list[dict], key: str) -> dict:
    """From the queues' reading of the run: the share of steps with v̄ ≤ 0, of visits (with a
    full queue) that were slow and flagged, and each one's persistence: the share of a pair's
    slow (flagged) visits whose next visit was slow (flagged) again, beside its chance, the
    share of all visits with a full queue that were."""
    by_step = {}
    for v in visits:
        by_step.setdefault(v["step"], v[key]["v_bar"])
    v_bars = [x for x in by_step.values() if x is not None]
    full = [v for v in visits if v[key]["v"] is not None]
    last, pairs = {}, []
    for v in visits:  # visits in step order: each pair's consecutive visits with full queues
        if v[key]["v"] is not None and v["pair"] in last:
            pairs.append((last[v["pair"]], v))
        if v[key]["v"] is not None:
            last[v["pair"]] = v
    out = {"steps_v_bar_nonpositive": float(np.mean([x <= 0 for x in v_bars])) if v_bars else None}
    for what in ("slow", "hard"):
        rate = float(np.mean([v[key][what] for v in full])) if full else None
        again = [b[key][what] for a, b in pairs if a[key][what]]
        out[what] = {"rate": rate, "again": float(np.mean(again)) if again else None, "n": len(again)}
    return out


def signal_figures(args, visits: list[dict], tables: dict, t: torch.Tensor, scores: list[dict], span: int,
                   n_t: int) -> dict:
    """signal.json: per reading, the fixed-weight signal-to-noise figures (`fixed_weight_snr`,
    summarised over pairs and over each queue span of the run) and, per τ, the queues' own
    figures (`flag_figures`); then Eq. 11's scores on the pairs the paper's reading flagged."""
    steps = sorted(tables)
    per = {r: [fixed_weight_snr(reading_tables(tables[a], t, n_t)[r], reading_tables(tables[b], t, n_t)[r],
                                r == "probe", args.batch) for a, b in zip(steps, steps[1:])] for r in C.DFM_READINGS}
    out = {"settings": {k: getattr(args, k) for k in ("preset", "seed", "pair_subset", "steps", "batch", "beta", "lr",
                                                      "warmup", "dfm_k", "dfm_patience", "dfm_tau", "draws")},
           "span_steps": span, "measured_at_steps": steps, "readings": {}}
    for r, spans in per.items():
        snr = np.concatenate([s["pair_snr"] for s in spans]) if spans else np.array([])
        out["readings"][r] = {
            "pair_snr_median": float(np.median(snr)) if len(snr) else None,
            "pair_snr_above_1": float(np.mean(snr > 1)) if len(snr) else None,
            "delta_mean": float(np.mean([np.mean(s["delta"]) for s in spans])) if spans else None,
            "noise_sd_mean": float(np.mean([np.mean(s["noise_sd"]) for s in spans])) if spans else None,
            "visit_sd": float(np.mean([s["visit_sd"] for s in spans])) if spans else None,
            "v_bar_snr": [s["v_bar_snr"] for s in spans],
            "v_bar_nonpositive_model": float(np.mean([s["v_bar_nonpositive_model"] for s in spans])) if spans else None,
            "reliability": float(np.mean([s["reliability"] for s in spans])) if spans else None,
            "tau": {f"{tau:g}": flag_figures(visits, f"{r}@{tau:g}") for tau in sorted({*SIGNAL_TAUS, args.dfm_tau})}}
    pool = list(scores[0]["score"]) if scores else []
    out["augmentations"] = {"pairs": len(scores), **{a: {
        "score_mean": float(np.mean([s["score"][a] for s in scores])),
        "score_quartiles": np.quantile([s["score"][a] for s in scores], [0.25, 0.5, 0.75]).tolist(),
        "chosen": sum(max(s["score"], key=s["score"].get) == a for s in scores),
        "latent_change_mean": float(np.mean([s["latent_change"][a] for s in scores]))} for a in pool}}
    return out


def signal_tables(fig: dict) -> list[str]:
    """signal.md: the readings' signal against noise, then the augmentations' scores."""
    st = fig["settings"]
    cell = lambda x: "—" if x is None else f"{x:.3f}"
    rows = []
    for r, v in fig["readings"].items():
        tau = v["tau"][f"{st['dfm_tau']:g}"]
        rows.append([r, f"{v['visit_sd']:.4f}", f"{v['delta_mean']:+.4f}", f"{v['noise_sd_mean']:.4f}",
                     f"{v['pair_snr_median']:+.2f}", f"{v['pair_snr_above_1']:.0%}",
                     f"{np.mean(v['v_bar_snr']):+.2f}", f"{v['v_bar_nonpositive_model']:.0%} / "
                     f"{tau['steps_v_bar_nonpositive']:.0%}", f"{v['reliability']:.2f}",
                     f"{cell(tau['slow']['rate'])} → {cell(tau['slow']['again'])}",
                     f"{cell(tau['hard']['rate'])} → {cell(tau['hard']['again'])}"])
    head = (f"{st['pair_subset']} pairs, {st['steps']} steps of {st['batch']}, K = {st['dfm_k']}, P = {st['dfm_patience']}, "
            f"τ = {st['dfm_tau']:g}; fixed weights every {fig['span_steps']} steps (a queue's span) at {st['draws']} "
            f"draws per pair, steps {fig['measured_at_steps']}")
    table = U.markdown_table(["reading", "one visit's sd", "δ over a queue", "noise sd of L(1) − L(K)", "pair SNR (median)",
                              "pairs SNR > 1", "v̄ SNR", "v̄ ≤ 0 (model / seen)", "reliability",
                              "slow visits → slow again", "flagged → flagged again"], rows)
    taus = list(next(iter(fig["readings"].values()))["tau"])
    taus = U.markdown_table(["reading", *[f"τ = {t}: flagged → again" for t in taus]],
                            [[r, *[f"{cell(v['tau'][t]['hard']['rate'])} → {cell(v['tau'][t]['hard']['again'])}"
                                   for t in taus]] for r, v in fig["readings"].items()])
    aug = fig["augmentations"]
    augs = U.markdown_table(["augmentation", "1 − cos (mean)", "quartiles", "chosen", "latent change ‖z_a − z‖/‖z‖"],
                            [[a, f"{v['score_mean']:.4f}", ", ".join(f"{q:.4f}" for q in v["score_quartiles"]),
                              f"{v['chosen']} of {aug['pairs']}", f"{v['latent_change_mean']:.3f}"]
                             for a, v in aug.items() if a != "pairs"])
    return [head, table, taus, augs]


COMMANDS = {"train": (train_parser, lambda args: S4.train(args, Subset())),
            "signal": (signal_parser, signal)}


# ---------------------------------------------------------------------------------------
# 3. The study: Fig. 5's claims from the finished runs, paired by seed
# ---------------------------------------------------------------------------------------

DFM_SAME = ("objective", "lam", "pair_subset", "steps", "batch", "lr", "warmup", "dfm_k", "dfm_patience")


def dfm_runs(run: Path) -> list[dict]:
    """The finished runs under DIR/dfm/: settings, per-step log, stage-4 metrics and held-out
    figures (where the run has them). Runs that differ in anything but the seed, the DFM pool,
    τ and the reading are not comparable: an error."""
    folders = sorted(d for d in (run / "dfm").iterdir() if (d / "config.json").exists()) if (run / "dfm").is_dir() else []
    runs = []
    for d in folders:
        if not (d / "metrics.json").exists():
            U.log(f"DFM study: skipping {d}, still training (no metrics.json)")
            continue
        cfg = U.read_json(d / "config.json")
        rows = [r for r in U.read_jsonl(d / "log.jsonl") if "loss" in r]
        held = U.read_json(d / "heldout.json") if (d / "heldout.json").exists() else {}
        on = cfg["dfm"] == "on"
        runs.append({"name": d.name, "folder": d, "cfg": cfg, "rows": rows, "metrics": U.read_json(d / "metrics.json"),
                     "seed": cfg["seed"], "pool": len(cfg["dfm_augmentations"]) if on else 0,
                     "tau": cfg["dfm_tau"] if on else None, "reading": cfg.get("dfm_reading", "loss") if on else None,
                     "heldout_accuracy": held.get("heldout_implicit_accuracy"), "heldout_loss": held.get("heldout_loss")})
    for r in runs[1:]:
        differ = [k for k in DFM_SAME if r["cfg"].get(k) != runs[0]["cfg"].get(k)]
        if differ:
            raise U.DataError(f"DFM study: {r['folder']} and {runs[0]['folder']} differ in {differ}; "
                              f"the study compares runs that differ in --seed, the DFM pool, --dfm-tau and "
                              f"--dfm-reading only")
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


# Each figure a reading is judged on, and its better side (−1: lower is better)
FIGURES = (("mean_loss", -1.0), ("final_loss", -1.0), ("heldout_accuracy", 1.0), ("heldout_loss", -1.0))


def dfm_study(run: Path) -> dict | None:
    """metrics.json's "dfm_study": Fig. 5's claims, DFM (full pool, the paper's reading)
    against no DFM, paired by seed — final loss (mean over the last tenth of steps), mean loss
    over training (the area under the curve: lower is faster convergence) and the implicit
    accuracy on held-out pairs — then the τ sweep, the readings of Eq. 10 (`reading_sweep`),
    the pool sweep, and what DFM did: the share of each batch Eq. 10 flags, the flagged
    pairs' loss beside the batch's, and their augmented copies' loss beside the originals'."""
    everything = dfm_runs(run)
    runs = [r for r in everything if r["reading"] in (None, "loss")]  # all but the readings' sweep
    if not runs:
        return None
    for r in everything:
        r["final_loss"] = r["metrics"]["final_loss"]
        r["mean_loss"] = float(np.mean([x["loss"] for x in r["rows"]]))
    full, tau = max(r["pool"] for r in runs), reference_tau(runs)
    on = {r["seed"]: r for r in runs if r["pool"] == full and full > 0 and r["tau"] == tau}
    off = {r["seed"]: r for r in runs if r["pool"] == 0}
    seeds = sorted(set(on) & set(off))
    study = {"settings": {**{k: runs[0]["cfg"].get(k) for k in DFM_SAME}, "dfm_tau": tau},
             "runs": {r["name"]: {k: r[k] for k in ("seed", "pool", "tau", "reading", "final_loss", "mean_loss",
                                                   "heldout_accuracy", "heldout_loss")} for r in everything},
             "seeds": seeds, "pool": {}, "tau": tau_sweep(runs, full, off)}
    study["reading"] = reading_sweep(everything, full, tau, off)
    for key, better in FIGURES:
        known = [s for s in seeds if on[s][key] is not None and off[s][key] is not None]
        study[key] = {"on": stats.spread([on[s][key] for s in known]) if known else None,
                      "off": stats.spread([off[s][key] for s in known]) if known else None,
                      "on-off": stats.paired_t_interval([on[s][key] - off[s][key] for s in known], better) if known else None}
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
    study["_runs"] = everything  # for the figure; dropped before metrics.json is written
    return study


def reading_sweep(runs: list[dict], full: int, tau: float, off: dict[int, dict]) -> dict[str, dict]:
    """Each reading of Eq. 10 (--dfm-reading; full pool, reference τ): every figure of
    FIGURES as mean ± sd over its seeds, on − off paired by seed, and its difference from the
    paper's reading ("loss"), paired by seed, each with its t interval."""
    at = lambda name: {r["seed"]: r for r in runs if r["reading"] == name and r["pool"] == full and r["tau"] == tau}
    reference, out = at("loss"), {}

    def paired(a, b, key, better):
        both = sorted(s for s in set(a) & set(b) if a[s][key] is not None and b[s][key] is not None)
        return stats.paired_t_interval([a[s][key] - b[s][key] for s in both], better) if both else None

    for name in [x for x in C.DFM_READINGS if at(x)]:
        members = at(name)
        out[name] = {"seeds": sorted(members), **{key: {
            **stats.spread([m[key] for m in members.values()]), "on-off": paired(members, off, key, better),
            "vs loss": paired(members, reference, key, better) if name != "loss" else None}
            for key, better in FIGURES if all(m[key] is not None for m in members.values())}}
    return out


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
                       ("mean_loss", "DFM converges faster (lower mean loss over training)"),
                       ("heldout_accuracy", "DFM raises the implicit accuracy on held-out pairs"),
                       ("heldout_loss", "DFM lowers the DPO loss on held-out pairs")):
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
    over seeds with the min-max band. Middle left: every τ of the sweep, its loss minus the
    no-DFM run's of the same seed, mean and band over seeds. Middle right: the same, for each
    augmentation pool at the reference τ. Right: the same, for each reading of Eq. 10."""
    everything = study["_runs"]
    runs = [r for r in everything if r["reading"] in (None, "loss")]
    fig, (ax_l, ax_t, ax_r, ax_x) = plots.pyplot().subplots(1, 4, figsize=(20, 3.8), layout="constrained")
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
    plot_curves(ax_x, [(f"reading {x}", [r for r in everything if r["reading"] == x and r["pool"] == full
                                         and r["tau"] == tau and r["seed"] in off]) for x in C.DFM_READINGS],
                window, off)
    for ax in (ax_l, ax_t, ax_r, ax_x):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_xlabel("step")
    ax_l.set(ylabel=f"DPO loss (moving average of {window})",
             title=f"DFM on / off at τ = {tau:g}; {study['settings']['pair_subset']} pairs")
    ax_t.set(ylabel="loss − no-DFM loss, same seed", title="the threshold τ of Eq. 10 (paper Fig. 5, left)")
    ax_r.set(ylabel="loss − no-DFM loss, same seed", title="size of the augmentation pool (Fig. 5, right)")
    ax_x.set(ylabel="loss − no-DFM loss, same seed", title=f"what Eq. 10's queue records (τ = {tau:g})")
    plots.save_figure(fig, path)


# ---------------------------------------------------------------------------------------
# 4. The report's section
# ---------------------------------------------------------------------------------------

def tau_table(sweep: dict) -> str:
    """The τ sweep as a table: each τ's mean loss and final loss, and their on − off intervals."""
    cell = lambda v: f"{v['mean']:.4f} ± {v['std']:.4f}" if v["n"] > 1 else f"{v['mean']:.4f}"
    diff = lambda c: "—" if c is None else (f"{c['diff']:+.4f} [{c['lo']:+.4f}, {c['hi']:+.4f}] {c['verdict']}"
                                            if c["lo"] is not None else f"{c['diff']:+.4f} (one seed)")
    return U.markdown_table(["τ", "seeds", "mean loss", "on − off", "final loss", "on − off"],
                            [[t, ", ".join(map(str, v["seeds"])), cell(v["mean_loss"]), diff(v["mean_loss"].get("on-off")),
                              cell(v["final_loss"]), diff(v["final_loss"].get("on-off"))] for t, v in sweep.items()])


def reading_table(sweep: dict) -> str:
    """The readings as a table: each figure's mean ± sd over seeds, on − off and the difference
    from the paper's reading, both paired by seed with their 95% t intervals."""
    cell = lambda v: "—" if v is None else (f"{v['mean']:.4f} ± {v['std']:.4f}" if v["n"] > 1 else f"{v['mean']:.4f}")
    diff = lambda c: "—" if c is None else (f"{c['diff']:+.4f} [{c['lo']:+.4f}, {c['hi']:+.4f}] {c['verdict']}"
                                            if c["lo"] is not None else f"{c['diff']:+.4f} (one seed)")
    rows = [[name, ", ".join(map(str, v["seeds"])), key.replace("_", " "), cell(v.get(key)),
             diff((v.get(key) or {}).get("on-off")), diff((v.get(key) or {}).get("vs loss"))]
            for name, v in sweep.items() for key, _ in FIGURES]
    return U.markdown_table(["reading", "seeds", "figure", "mean ± sd", "on − off", "− the paper's reading"], rows)


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
             "on − off paired by seed, 95% t interval):", "", tau_table(study["tau"]), "",
             "What Eq. 10's queue records (--dfm-reading; τ = the preset's, full pool; paired by seed, 95% t interval):",
             "", reading_table(study["reading"]), "", "![dfm_study.png](dfm_study.png)"]
    return {"name": "dfm_study", "title": "The DFM study (paper Fig. 5)", "lines": lines, "metrics": study}


if __name__ == "__main__":
    U.run_commands(COMMANDS, __doc__)
