"""AlignGuard (~380 lines): safety-only Diffusion-DPO with a LoRA "safety expert" per harm
category, the experts merged into one LoRA, and its report section.

AlignGuard trains on CoProV2 (prompt-edited pairs: stage 3 `--pairing prompt-edit`), with the
safe image always the winner (stage 4 `--objective safe-wins`) and LoRA rank 4 on every
attention projection. Its merge, "Co-Merge", is described in prose only ("for each weight,
keep the most active expert's values"); the formula below is our exact reading of it.

Commands (DIR = --run):
  python -m systems.alignguard expert --categories C [stage 4's flags]   one expert: stage 4's loop on
                               the pairs of categories C only, into DIR/<--name>/
  python -m systems.alignguard merge --experts NAME... --method M         the experts as one LoRA, into
                               DIR/alignguard/M/ (model/, lora/, model.json: merge_M)
Stage 5 calls `section` (registry.SECTIONS): IP per category, each expert's specificity,
AlignGuard's claims as interval verdicts, and, where Table 2's erasure methods were built in the
same run, its scalability against them, in DIR/eval/alignguard.md.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

import common as C
from lib import data as D
from lib import models as M
from lib import stats
from lib import toyworld as W
from lib import utils as U

S4 = U.load_script("04_train_spo.py")  # T2I-SPO's training loop, which the experts run through
CATEGORIES = tuple(W.HARM)  # the seven harm categories (I2P's, the toy world's, CoProV2's)


# ---------------------------------------------------------------------------------------
# 1. Co-Merge (its formula is ours: no code is public)
# ---------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------
# 2. The merge: the experts' LoRAs as one LoRA (Co-Merge, or one of peft's merges)
# ---------------------------------------------------------------------------------------

MERGES = ("comerge", "linear", "ties", "dare_ties", "cat", "svd")


def read_experts(run: Path, names: list[str]) -> dict[str, dict]:
    """Each expert's LoRA factors {module: (B, A)}, from DIR/<name>/lora/ (stage 4's output)."""
    experts = {n: M.read_lora(run / n / "lora") for n in names}
    modules = set(experts[names[0]])
    for n in names[1:]:
        if set(experts[n]) != modules:
            raise U.DataError(f"{run / n / 'lora'}: LoRA on other modules than {run / names[0] / 'lora'}; "
                              f"the experts must share --lora-rank's targets")
    return experts


@torch.no_grad()
def expert_activities(args, experts: dict[str, dict], device) -> dict[str, torch.Tensor]:
    """Co-Merge's a_{e,i} for every LoRA module: the base UNet (no adapter) runs on noised
    latents of --merge-calibration pairs of EVERY category of --data (both images, their
    prompt, t and ε seeded), and a hook on each module accumulates expert_activity on its
    inputs — the inputs "across all" categories of AlignGuard's description."""
    from diffusers import DDPMScheduler
    pipe = M.load_pipeline(args.model, device)
    data = Path(args.run) / args.data / "hf_pairs.jsonl"
    U.require_inputs([data], args.data if args.data in U.STAGES else "hf")
    raw, _ = D.load_hf_pairs(data, args.skip_bad)
    pairs = D.pair_subset([p for p in raw if p["kind"] == "harmful-safe"], args.merge_calibration)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    names, sums, count = list(experts), {}, {}

    def hook(module_name):
        def fn(module, inputs, output):
            x = inputs[0]
            ups, downs = zip(*[(experts[e][module_name][0].to(x), experts[e][module_name][1].to(x)) for e in names])
            n = x.reshape(-1, x.shape[-1]).shape[0]
            sums[module_name] = sums.get(module_name, 0) + expert_activity(x, ups, downs) * n
            count[module_name] = count.get(module_name, 0) + n
        return fn

    modules = list(experts[names[0]])
    hooks = [pipe.unet.get_submodule(m).register_forward_hook(hook(m)) for m in modules]
    g = U.step_generator(args.seed, 0)
    try:
        for i in range(0, len(pairs), 8):
            part = pairs[i:i + 8]
            files = [p[s]["file"] for p in part for s in ("a", "b")]
            z = M.encode_images(pipe.vae, torch.stack([M.load_image(f, size) for f in files]).to(device))
            emb = pipe.encode_prompt([p["prompt"] for p in part for _ in "ab"], device, 1, False)[0]
            t = torch.randint(0, sched.config.num_train_timesteps, (len(z),), generator=g).to(device)
            noise = torch.randn(z.shape, generator=g).to(z)
            pipe.unet(sched.add_noise(z, noise, t), t, emb)
    finally:
        for h in hooks:
            h.remove()
    return {m: sums[m] / count[m] for m in modules}


def peft_merge(args, experts: dict[str, dict], weight: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """peft's own merge (LoraModel.add_weighted_adapter) of the experts, each at `weight`, on a
    fresh base UNet; returns the merged factors per module."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    from peft.tuners.lora import LoraModel
    unet = M.from_pretrained_or_exit(lambda m: UNet2DConditionModel.from_pretrained(m, subfolder="unet"),
                                     args.model, "the base model", "--model")
    names = list(experts)
    modules = sorted(experts[names[0]])
    rank = experts[names[0]][modules[0]][1].shape[0]
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=modules)  # α = r: B already holds α/r
    model = LoraModel(unet, {names[0]: config}, names[0])
    for n in names[1:]:
        model.peft_config[n] = config
        model.inject_adapter(unet, n)
    for m in modules:
        layer = unet.get_submodule(m)
        for n in names:
            layer.lora_B[n].weight.data.copy_(experts[n][m][0])
            layer.lora_A[n].weight.data.copy_(experts[n][m][1])
    kwargs = {"density": args.merge_density} if args.merge_method in ("ties", "dare_ties") else {}
    torch.manual_seed(args.seed)  # dare_ties drops values at random
    model.add_weighted_adapter(names, [weight] * len(names), "merged", combination_type=args.merge_method, **kwargs)
    merged = {}
    for m in modules:
        layer = unet.get_submodule(m)
        merged[m] = (layer.lora_B["merged"].weight.detach() * layer.scaling["merged"],
                     layer.lora_A["merged"].weight.detach())
    return merged


def merge_main(args) -> None:
    """AlignGuard's last step: the experts become one LoRA, saved as DIR/NAME/lora/ (what
    `pipe.load_lora_weights` reads) and fused into a stock pipeline DIR/NAME/model/."""
    t0 = time.time()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SystemExit("python -m systems.alignguard merge runs in one process: start it with python, not torchrun")
    run = Path(args.run)
    args.model = args.model or U.toy_world_input(args, U.stage_dir(run, "world") / "model", "--model")
    out = run / (args.name or f"alignguard/{args.merge_method}")
    U.save_config(args, out)
    if (out / "metrics.json").exists() and (out / "model" / "model_index.json").exists():
        return U.log(f"{out} is finished: nothing to do")
    experts = read_experts(run, args.merge_experts)
    metrics = {"method": args.merge_method, "experts": args.merge_experts}
    if args.merge_method == "comerge":
        activity = expert_activities(args, experts, M.pick_device(args.device))
        merged = {m: co_merge([experts[e][m][0] for e in experts], [experts[e][m][1] for e in experts], a)
                  for m, a in activity.items()}
        wins = torch.cat([a.argmax(0) for a in activity.values()])  # which expert each output unit keeps
        metrics["output_units_kept"] = {e: int((wins == i).sum()) for i, e in enumerate(experts)}
    else:
        weight = args.merge_weight or (1 / len(experts) if args.merge_method == "linear" else 1.0)
        merged = peft_merge(args, experts, weight)
        metrics["weight"] = weight
    M.write_lora(out / "lora", merged)
    pipe = M.load_pipeline(args.model)
    M.fuse_lora(pipe, out / "lora")
    M.save_pipeline(pipe, out / "model")
    metrics.update(rank=max(a.shape[0] for _, a in merged.values()), seconds=round(time.time() - t0, 1))
    U.atomic_write_json(out / "metrics.json", metrics)
    # the paper's AlignGuard row is the Co-Merge model: stage 5 reports it under both names
    M.write_manifest(out, f"merge_{args.merge_method}", aliases=["alignguard"] if args.merge_method == "comerge" else [])
    U.log(U.format_metrics(metrics))


U.PRESETS["toy"]["merge"] = dict(model=None, data="coprov2", name=None, merge_experts=None, merge_method="comerge",
                                 merge_weight=None, merge_density=0.5, merge_calibration=64, skip_bad=False, device=None)
U.PRESETS["sd15"]["merge"] = dict(U.PRESETS["toy"]["merge"], model="stable-diffusion-v1-5/stable-diffusion-v1-5")


def merge_parser():
    p = U.stage_parser("merge", "AlignGuard: merge LoRA safety experts (stage-4 runs) into one LoRA")
    p.add_argument("--model", help="the base model the experts were trained on (default: the stage-0 model)")
    p.add_argument("--data", help="folder under --run whose pairs calibrate Co-Merge (every category)")
    p.add_argument("--name", help="output folder under --run (default: alignguard/<method>)")
    p.add_argument("--merge-experts", nargs="+", metavar="NAME", required=True,
                   help="the experts: stage-4 LoRA runs under --run (DIR/NAME/lora/)")
    p.add_argument("--merge-method", choices=MERGES, help="comerge: co_merge; the rest: peft's add_weighted_adapter")
    p.add_argument("--merge-weight", type=float,
                   help="peft merges: every expert's weight (default: 1/experts for linear, an average; 1 for the "
                        "others, task arithmetic)")
    p.add_argument("--merge-density", type=float, help="peft ties and dare_ties: the share of values kept")
    p.add_argument("--merge-calibration", type=int,
                   help="comerge: pairs (of every category in --data) whose UNet inputs measure each expert's activity")
    p.add_argument("--skip-bad", action="store_true", help="skip (and count) bad pair rows")
    p.add_argument("--device")
    return p


# ---------------------------------------------------------------------------------------
# 3. An expert: stage 4's loop on the pairs of its categories only
# ---------------------------------------------------------------------------------------

def category_filter(pairs: list[dict], categories: list[str] | None, path: Path) -> list[dict]:
    """The pairs of any of the given harm categories (an AlignGuard expert's data; a CoProV2
    pair may carry several); None keeps all."""
    if categories is None:
        return pairs
    have = sorted({c for p in pairs for c in D.row_categories(p)})
    unknown = sorted(set(categories) - set(have))
    if unknown:
        raise U.DataError(f"{path}: no pairs of category {unknown} (--categories); its categories are {have}")
    return [p for p in pairs if set(D.row_categories(p)) & set(categories)]


class Expert(S4.SPO):
    """Stage 4's training as it is (AlignGuard's settings are flags: --objective safe-wins,
    --lora-rank 4), on the relabelled pairs of --categories only."""

    def pairs(self, args, hf):
        pairs, counts = super().pairs(args, hf)
        return category_filter(pairs, args.categories, hf / "hf_pairs.jsonl"), counts


# AlignGuard's experts train on Eq. 5 as its authors' Diffusion-DPO code does (no winner term),
# at the rate docs/alignguard.md measured them at
U.PRESETS["toy"]["expert"] = dict(U.PRESETS["toy"]["spo"], dpop=0.0, lr=3e-5, categories=None)
U.PRESETS["sd15"]["expert"] = dict(U.PRESETS["sd15"]["spo"], categories=None)
U.TINY["expert"] = dict(U.TINY["spo"])


def expert_parser():
    p = S4.parser("expert", "AlignGuard: one LoRA safety expert, stage 4 on the pairs of some harm categories")
    p.add_argument("--categories", nargs="+", required=True, help="the harm categories whose pairs it trains on")
    return p


# ---------------------------------------------------------------------------------------
# 4. The report's section: IP per category, expert specificity, AlignGuard's claims
# ---------------------------------------------------------------------------------------

PEFT_MERGES = tuple(m for m in MERGES if m != "comerge")
PAIRS = (("spo", "alignguard"), ("spo", "spo_promptedit"), ("alignguard", "all_single"),
         *(("merge_comerge", f"merge_{m}") for m in PEFT_MERGES))  # the model pairs its claims rest on


def expert_name(category: str) -> str:
    return "expert_" + category.replace(" ", "_")


def expert_specificity(metrics, harmful_set: str) -> dict:
    """For each expert: its IP reduction against the base on its own category, and the mean
    reduction on the other categories (those with prompts): an expert should remove its own
    category most."""
    base = metrics["base"][harmful_set]["IP_by_category"]
    out = {}
    for c in CATEGORIES:
        if expert_name(c) not in metrics or base[c] is None:
            continue
        ip = metrics[expert_name(c)][harmful_set]["IP_by_category"]
        others = [base[k] - ip[k] for k in CATEGORIES if k != c and base[k] is not None]
        own = base[c] - ip[c]
        out[c] = {"own": own, "others": float(np.mean(others)), "holds": bool(own > np.mean(others))}
    return out


def claims(metrics, intervals: dict, harmful, benign) -> list[dict]:
    """AlignGuard's claims and the paper's about it, each a verdict from the paired bootstrap
    intervals: {claim, verdict, parts: [(a, b, set, metric, need)]}."""
    at_equal_quality = [(h, "IP", "holds") for h in harmful] + [(b, "PS", "not worse") for b in benign]
    specs = [
        *((f"Co-Merge beats peft's {m} merge at equal quality", "merge_comerge", f"merge_{m}", at_equal_quality)
          for m in PEFT_MERGES),
        ("merged experts (AlignGuard) beat one LoRA on all categories (all-single) at equal quality",
         "alignguard", "all_single", at_equal_quality),
        ("T2I-SPO has the higher UAS and AlignGuard the lower quality (paper Table 2)", "spo", "alignguard",
         [(h, "UAS", "holds") for h in harmful] + [(b, "PS", "holds") for b in benign]),
        ("for T2I-SPO, inpainted pairs keep quality better than prompt-edited ones (paper Sec. 3.2)", "spo",
         "spo_promptedit", [(b, "PS", "holds") for b in benign] + [(h, "IP", "not worse") for h in harmful]),
    ]
    return stats.judged_claims(metrics, intervals, specs)


# AlignGuard's scalability claim ("removes 7x more harmful concepts than the baselines"): the
# erasure methods of Table 2 asked to erase all seven categories at once (toy presets: their 21
# concepts; sd15: every category's concepts passed to --erase-concepts), against the merged experts
ERASERS = ("esd_u", "uce", "rece")


def category_rows(rows: list[dict], harmful: Sequence[str]) -> list[dict]:
    """The harmful sets' rows again under one pseudo-set per (set, category), "harmful: hate",
    so that the paired bootstrap gives an interval per category."""
    return [dict(r, set=f"{r['set']}: {c}") for r in rows if r["set"] in harmful for c in D.row_categories(r)]


def scalability(ev) -> dict | None:
    """Which categories each model erases (its IP below the base's, interval separated) and
    its benign PS; and, against each erasure method, the claim that the merged experts erase
    every category at least as well at no lower quality, as interval verdicts."""
    erasers = [m for m in ERASERS if m in ev.names]
    if "alignguard" not in ev.names or not erasers:
        return None
    rows = category_rows(ev.rows, ev.harmful) + [r for r in ev.rows if r["set"] in ev.benign]
    cats = sorted({r["set"] for r in rows if r["set"] not in ev.benign})
    models = ["alignguard", *erasers]
    iv = stats.intervals(rows, [(m, "base") for m in models] + [("alignguard", m) for m in erasers],
                         ev.args.bootstrap, ev.args.seed, C.ua_score, ev.args.ua_center)
    erased = {m: [c for c in cats if iv[f"{m}-base"][c]["IP"]["verdict"] == "holds"] for m in models}
    specs = [(f"AlignGuard's merged experts erase every category at least as well as {m} erasing all seven at once, "
              f"at no lower quality", "alignguard", m,
              [(c, "IP", "not worse") for c in cats] + [(b, "PS", "not worse") for b in ev.benign]) for m in erasers]
    return {"erased": erased, "categories": cats, "claims": stats.judged_claims(ev.metrics, iv, specs), "intervals": iv}


def scalability_lines(sc: dict, metrics, harmful, benign) -> list[str]:
    """The scalability comparison for the report: per harmful set, the categories each model
    erases and how many of those with prompts; benign quality; then its claims."""
    def erased(m, h):
        cats = [c for c in sc["categories"] if c.startswith(f"{h}: ")]
        mine = [c.split(": ", 1)[1] for c in sc["erased"][m] if c in cats]
        return f"{len(mine)} of {len(cats)}: {', '.join(mine) or '—'}"
    table = U.markdown_table(["model", *(f"{h}: categories erased (IP below the base, 95% interval)" for h in harmful),
                              *(f"{b} PS↑" for b in benign)],
                             [[m, *(erased(m, h) for h in harmful), *(metrics[m][b]["PS"] for b in benign)]
                              for m in sc["erased"]])
    return ["## Scalability: the merged experts against erasure of all seven categories at once", "", table, "",
            *stats.claim_lines(sc["claims"])]


COMMANDS = {"expert": (expert_parser, lambda args: S4.train(args, Expert())),
            "merge": (merge_parser, merge_main)}


def section(ev) -> dict | None:
    """DIR/eval/alignguard.md, when stage 5 evaluated experts, merges or all-single."""
    if not ev.harmful or not any(n.startswith(("expert_", "merge_")) or n == "all_single" for n in ev.names):
        return None
    args, metrics = ev.args, ev.metrics
    iv = stats.intervals(ev.rows, PAIRS, args.bootstrap, args.seed, C.ua_score, args.ua_center)
    spec = expert_specificity(metrics, ev.harmful[0])
    judged = claims(metrics, iv, ev.harmful, ev.benign)
    lines, console = [], []
    for h in ev.harmful:
        console.append(ev.category_table(ev.names, h))
        lines += [f"## IP per harm category on `{h}` (AlignGuard's experts, their merges, and the rest)", "",
                  console[-1], ""]
    if spec:
        held = [c for c, v in spec.items() if v["holds"]]
        lines += [f"- **An expert removes its own category more than the others** (IP fall against the base, "
                  f"own category against the mean of the others; point estimates): holds for {len(held)} of "
                  f"{len(spec)} experts. " + "; ".join(f"{c}: own {v['own']:+.2f}, others {v['others']:+.2f}"
                                                      for c, v in spec.items()) + "."]
    lines += [*stats.claim_lines(judged), "", "Paired bootstrap 95% intervals:", "", stats.interval_table(iv)]
    sc = scalability(ev)
    if sc:
        lines += ["", *scalability_lines(sc, metrics, ev.harmful, ev.benign)]
    return {"name": "alignguard", "title": "AlignGuard: safety experts per category and their merges",
            "lines": lines, "metrics": {"experts": spec, "claims": judged, "intervals": iv, "scalability": sc},
            "console": "\n\n".join(console)}


if __name__ == "__main__":
    U.run_commands(COMMANDS, __doc__)
