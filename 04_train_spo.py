"""Stage 4 — T2I-SPO training: composite reward, Diffusion-DPO, DFM (paper Sec. 4, Eqs. 5-11).

    R(x, c) = r(x, c) − λ·C(x)                                         (Eq. 6)
    for every LibraAlign-HF pair, the image with the higher R is x_w      (Eqs. 7-8)
    L = −E log σ(−β/2 · [(‖ε−ε_θ(x_w,t)‖² − ‖ε−ε_θ(x_l,t)‖²)
                        − (‖ε−ε_ref(x_w,t)‖² − ‖ε−ε_ref(x_l,t)‖²)])      (Eqs. 5, 9)

T2I-SPO is Diffusion-DPO on pairs ordered by a reward that counts quality AND safety. The
safety-only baseline (`--objective safety`) is this same code with R = −C, the λ → ∞
ordering, so the two differ in nothing but the reward.

The Dynamic Focusing Mechanism (Sec. 4.3) watches each pair's loss: a pair whose loss stops
falling (descent rate v_i < τ·v̄ on P visits, Eq. 10) is "hard", and gets an augmented copy
in the current batch; of four augmentations, the one that turns the pair's gradient the most
(argmax 1 − cos(g_i, g_i^a), Eq. 11).

Reads (DIR = --run):  DIR/<data>/hf_pairs.jsonl (stage 3's; --data), the base model (--model)
Writes (NAME = --name, default the objective):
  DIR/NAME/model/       the aligned model, a stock diffusers pipeline folder (the base model's class)
  DIR/NAME/lora/        with --lora-rank > 0: weights for `pipe.load_lora_weights`
  DIR/NAME/model.json   what stage 5 needs to find and evaluate it (models.write_manifest)
  DIR/NAME/log.jsonl    per step: loss, implicit accuracy, reward margin, DFM counts
  DIR/NAME/metrics.json, config.json, ckpt/train_state.pt, cache/ (latents, text embeddings)

Launch:  python 04_train_spo.py [--objective spo|safety|safe-wins]           (one process)
         torchrun --nproc_per_node=N 04_train_spo.py --run-dir DIR ...       (N processes)

The math is in common.py; this script is the data and the loop: setup(), train_step() with
its three numbered phases, finish(). Other systems train through it with a `Hook`.
"""
import argparse
import contextlib
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import common as C
from lib import data as D
from lib import models as M
from lib import utils as U

# The paper's settings are the sd15 preset (Sec. 6.1: batch 12 over six GPUs, lr 8e-8, 15k steps,
# β = 5000), on SDXL (Appendix E: 1024 px, bf16, fp32 VAE) the sdxl one; the toy's are its own.
U.PRESETS["toy"]["spo"] = dict(
    model=None, data="hf", objective="spo", name=None, lam=0.15, margin=0.0, beta=100.0, lr=5e-5, scale_lr=False, warmup=20,
    steps=300, batch=16, micro_batch=None, weight_decay=0.0, max_grad_norm=1.0, lora_rank=0, lora_alpha=None,
    dfm="on", dfm_k=3, dfm_tau=0.2, dfm_patience=1, dfm_modules=["conv_out"], dfm_augmentations=list(C.AUGMENTATIONS),
    grad_checkpointing=False, bf16=False, ckpt_every=100, log_every=1, skip_bad=False, device=None)
U.PRESETS["sd15"]["spo"] = dict(
    U.PRESETS["toy"]["spo"], model="stable-diffusion-v1-5/stable-diffusion-v1-5", beta=5000.0, lr=8e-8, warmup=500,
    steps=15000, batch=12, micro_batch=2, weight_decay=1e-2, grad_checkpointing=True, bf16=True, ckpt_every=500,
    log_every=10, dfm_k=5, dfm_patience=2)
U.PRESETS["sdxl"]["spo"] = dict(U.PRESETS["sd15"]["spo"], model="stabilityai/stable-diffusion-xl-base-1.0")
U.TINY["spo"] = dict(steps=8, batch=4, warmup=2, ckpt_every=4, log_every=1, dfm_k=2, dfm_patience=1, dfm_tau=10.0)


def parser(stage: str = "spo", description: str | None = None) -> argparse.ArgumentParser:
    """Stage 4's flags; another system's command adds its own to the same parser."""
    p = U.stage_parser(stage, description or __doc__.splitlines()[0])
    p.add_argument("--model", help="base T2I model folder; also the frozen reference (default: the stage-0 model)")
    p.add_argument("--data", help="folder under --run whose hf_pairs.jsonl to train on (stage 3's --name: hf, coprov2)")
    p.add_argument("--objective", choices=["spo", "safety", "safe-wins"],
                   help="the reward of Eq. 8. spo: R = r − λC (T2I-SPO); safety: R = −C (the safety-only DPO "
                        "baseline, λ → ∞); safe-wins: the safe image of a harmful-safe pair always wins (AlignGuard)")
    p.add_argument("--name", help="output folder under --run (default: the objective), e.g. spo_lam0.5")
    p.add_argument("--lam", type=float, help="λ of Eq. 6, the weight of the safety cost in the composite reward")
    p.add_argument("--margin", type=float, help="drop pairs with |ΔR| below this (Eq. 8)")
    p.add_argument("--beta", type=float, help="β of Eq. 5 (with its ½: the loss uses β/2)")
    p.add_argument("--lr", type=float, help="peak learning rate; gradients are the mean over the global --batch, so "
                   "it holds on any number of GPUs (the paper's '8e-8 per GPU' is 8e-8; or see --scale-lr)")
    p.add_argument("--scale-lr", action=argparse.BooleanOptionalAction, help="Diffusion-DPO's --scale_lr: the "
                   "rate is --lr × per-process batch × accumulation × processes, which is --lr × --batch")
    p.add_argument("--warmup", type=int, help="linear warm-up steps, then constant")
    p.add_argument("--steps", type=int, help="optimizer steps")
    p.add_argument("--batch", type=int, help="pairs per optimizer step, over all processes")
    p.add_argument("--micro-batch", type=int, help="pairs per forward on one process (gradient accumulation)")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--max-grad-norm", type=float)
    p.add_argument("--lora-rank", type=int, help="0: full fine-tuning; N: LoRA of rank N on the attention projections")
    p.add_argument("--lora-alpha", type=float, help="LoRA alpha (default: the rank)")
    p.add_argument("--dfm", choices=["on", "off"], help="the Dynamic Focusing Mechanism (Sec. 4.3)")
    p.add_argument("--dfm-k", type=int, help="K: losses kept per pair (Eq. 10)")
    p.add_argument("--dfm-tau", type=float, help="τ: hard when v_i < τ·v̄ (Eq. 10)")
    p.add_argument("--dfm-patience", type=int, help="P: consecutive slow visits before a pair is hard")
    p.add_argument("--dfm-modules", nargs="+", help="UNet Conv2d/Linear modules whose weight gradients Eq. 11 compares")
    p.add_argument("--dfm-augmentations", nargs="+", choices=C.AUGMENTATIONS, help="the pool A of Eq. 11")
    p.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, help="bf16 autocast (GPU only)")
    p.add_argument("--ckpt-every", type=int)
    p.add_argument("--log-every", type=int)
    p.add_argument("--skip-bad", action=argparse.BooleanOptionalAction, help="skip (and count) bad pair rows")
    p.add_argument("--device")
    return p


# ---------------------------------------------------------------------------------------
# Data: LibraAlign-HF pairs, relabelled by the composite reward (Eqs. 6-8)
# ---------------------------------------------------------------------------------------

def preference_pairs(pairs: list[dict], objective: str, lam: float, margin: float) -> tuple[list[dict], int]:
    """Eq. 8 under the objective's reward. Each is one line of Eq. 6 with other annotations:

        spo        R = r − λ·C            T2I-SPO: quality and safety in one number
        safety     R = −C                 the safety-only baseline (the λ → ∞ ordering)
        safe-wins  R = −1[x is harmful]   AlignGuard: the safe side wins, whatever its quality;
                                          a pair of two safe images ties and is dropped
    """
    if objective == "safe-wins":
        by_role = lambda side: {**side, "quality": 0.0, "cost": float(side["role"] == "harmful")}
        pairs = [{**p, "a": by_role(p["a"]), "b": by_role(p["b"])} for p in pairs]
        lam = 1.0
    if objective == "safety":
        no_quality = lambda side: {**side, "quality": 0.0}
        pairs = [{**p, "a": no_quality(p["a"]), "b": no_quality(p["b"])} for p in pairs]
        lam = 1.0
    return C.relabel_pairs(pairs, lam, margin)


def hf_preference_pairs(args, hf: Path) -> tuple[list[dict], dict]:
    """Eqs. 6-8 on every row of DIR/<data>/hf_pairs.jsonl; the counts go to metrics.json."""
    U.require_inputs([hf / "hf_pairs.jsonl"], args.data if args.data in U.STAGES else "hf")
    raw, n_bad = D.load_hf_pairs(hf / "hf_pairs.jsonl", args.skip_bad)
    pairs, n_dropped = preference_pairs(raw, args.objective, args.lam, args.margin)
    return pairs, {"pairs_dropped": n_dropped, "bad_rows_skipped": n_bad}


# ---------------------------------------------------------------------------------------
# The training loop: setup(), then train_step() until done, then finish(); other systems
# change it at the named points of a Hook
# ---------------------------------------------------------------------------------------

@dataclasses.dataclass
class Training:
    """Everything the loop reads and updates, built once by setup()."""
    args: argparse.Namespace
    hook: object                # what another system changes in this loop (Hook, below)
    dist: U.Dist
    out: Path
    pairs: list[dict]           # relabelled: "w" the winner under R, "l" the loser (Eq. 8)
    data_counts: dict           # pairs_dropped, bad_rows_skipped, safe_side_wins_harmful_safe
    unet: torch.nn.Module       # the policy ε_θ
    ref: torch.nn.Module | None  # the frozen reference ε_ref (None with LoRA: adapters off)
    vae: torch.nn.Module
    noise_scheduler: object
    size: int                   # image side in pixels
    latents: torch.Tensor       # cached VAE latents of every image
    text: torch.Tensor          # cached text embeddings of every prompt
    index: torch.Tensor         # [pairs, 3]: latent row of x_w, of x_l, text row of the prompt
    mine: list[int]             # this process's positions in every global batch: rank, rank + N, ...
    micro: int                  # pairs per forward
    autocast: object
    ckpt: U.Checkpoint
    log: U.MetricsLog
    params: list[torch.nn.Parameter] = dataclasses.field(default_factory=list)
    dfm_modules: list[torch.nn.Module] = dataclasses.field(default_factory=list)
    opt: torch.optim.Optimizer | None = None
    sched: torch.optim.lr_scheduler.LambdaLR | None = None
    queue: C.DescentRateQueue | None = None  # Eq. 10's loss queues
    step: int = 0
    totals: dict = dataclasses.field(default_factory=lambda: {
        "dfm_flagged": 0, "aug_wins": dict.fromkeys(C.AUGMENTATIONS, 0), "dfm_flagged_by_kind": {}, "dfm_pairs_flagged": []})


class Hook:
    """The named points where another system changes this loop; every default here IS T2I-SPO
    (stage 4 alone runs `Hook()`). AlignGuard's experts and the DFM study train on a subset
    (`select`); PSA orders each pair per user and trains a user-conditioned adapter on the frozen
    UNet (`pairs`, `attach`, `condition`, `record`, `state`, `load`, `save`, `final`)."""

    frozen_unet = False  # True: the UNet stays frozen and no reference copy is made
    publish = True       # write model.json, so that stage 5 evaluates the result

    def pairs(self, args, hf: Path) -> tuple[list[dict], dict] | None:
        """Preference pairs ordered another way, with their counts; None: Eqs. 6-8 on hf."""
        return None

    def select(self, args, pairs: list[dict], hf: Path) -> list[dict]:
        """The relabelled pairs to train on (all of them)."""
        return pairs

    def attach(self, tr: Training) -> list[torch.nn.Parameter]:
        """The trainable parameters: the UNet's (all of them, or its LoRA's)."""
        return [p for p in tr.unet.parameters() if p.requires_grad]

    def condition(self, tr: Training, ids: list[int], emb: torch.Tensor) -> torch.Tensor:
        """The conditioning of pairs `ids`: their prompts' text embeddings."""
        return emb

    def record(self, tr: Training, ids: list[int], d_theta: torch.Tensor, d_ref: torch.Tensor) -> dict:
        return {}  # more figures for the step's log record, from the batch's pairs and their Δ_θ, Δ_ref

    def state(self, tr: Training) -> dict:
        return M.trainable_state(tr.unet, tr.args.lora_rank > 0)

    def load(self, tr: Training, state: dict) -> None:
        M.load_trainable_state(tr.unet, state, tr.args.lora_rank > 0)

    def save(self, tr: Training) -> None:
        M.save_final(tr.args, tr.unet, tr.out)

    final = "model/model_index.json"  # the file a finished run has written last


def setup(args, hook: Hook) -> Training:
    U.check_batch_split(args.batch)  # before the process group forms: rank 0 alone says why
    dist = U.setup_distributed(args.device)
    U.seed_everything(args.seed)
    args.model = args.model or U.toy_world_input(args, U.stage_dir(args.run, "world") / "model", "--model")
    args.name = args.name or args.objective
    hf, out = Path(args.run) / args.data, Path(args.run) / args.name
    mine = list(range(dist.rank, args.batch, dist.world_size))
    micro = args.micro_batch or len(mine)
    if dist.is_main:
        U.save_config(args, out, world_size=dist.world_size, grad_accum=-(-len(mine) // micro))

    # Eqs. 6-8: relabel every pair by the composite reward (or by −C for the baseline)
    pairs, counts = hook.pairs(args, hf) or hf_preference_pairs(args, hf)
    pairs = hook.select(args, pairs, hf)
    # how often the reward lets the safe image win a harmful-safe pair: 100% for the safety
    # objectives; below it for T2I-SPO where a faithful harmful image outscores a poor safe one
    hs = [p for p in pairs if p["kind"] == "harmful-safe"]
    counts["safe_side_wins_harmful_safe"] = sum(p["w"]["role"] == "safe" for p in hs) / max(1, len(hs))
    if len(pairs) < args.batch:
        raise U.DataError(f"{hf / 'hf_pairs.jsonl'}: {len(pairs)} pairs left after relabelling and selection ("
                          f"{counts['pairs_dropped']} dropped by --margin), fewer than one batch of {args.batch}")
    U.log(f"{len(pairs)} pairs after relabelling (objective {args.objective}, λ={args.lam}); {counts}; "
          f"{dist.world_size} process(es), micro-batches of {micro}")

    # The frozen parts run once: every latent and text embedding is cached before training
    unet, ref, vae, prompt_encoder, noise_scheduler = M.load_training_models(args, dist.device, hook.frozen_unet)
    size = unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
    latents, text, index = M.build_caches(args, pairs, vae, prompt_encoder, out, dist, size)
    prompt_encoder.cpu()  # done with it: the cache holds every embedding
    use_bf16 = args.bf16 and dist.device.type == "cuda"
    tr = Training(
        args=args, hook=hook, dist=dist, out=out, pairs=pairs, data_counts=counts, unet=unet, ref=ref, vae=vae,
        noise_scheduler=noise_scheduler, size=size, latents=latents, text=text, index=index, mine=mine, micro=micro,
        autocast=lambda: torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext(),
        ckpt=U.Checkpoint(out / "ckpt" / "train_state.pt"), log=U.MetricsLog(out / "log.jsonl"))
    tr.params = hook.attach(tr)  # T2I-SPO: the UNet's weights (or its LoRA's); PSA: its adapter
    named = dict(tr.unet.named_modules())
    if args.dfm == "on" and not all(m in named for m in args.dfm_modules):
        raise SystemExit(f"--dfm-modules: no module {sorted(set(args.dfm_modules) - set(named))} in the UNet")
    tr.dfm_modules = [named[m] for m in args.dfm_modules] if args.dfm == "on" else []
    tr.opt = U.adamw(tr.params, lr=args.lr * (args.batch if args.scale_lr else 1), weight_decay=args.weight_decay)
    tr.sched = torch.optim.lr_scheduler.LambdaLR(tr.opt, lambda s: min(1.0, (s + 1) / max(1, args.warmup)))
    tr.queue = C.DescentRateQueue(args.dfm_k, args.dfm_tau, args.dfm_patience)
    resume(tr)
    return tr


def resume(tr: Training) -> None:
    """Continue from the checkpoint, if there is one; the log keeps each step exactly once."""
    state = tr.ckpt.load()
    if state:
        tr.hook.load(tr, state["model"])
        tr.opt.load_state_dict(state["opt"])
        tr.sched.load_state_dict(state["sched"])
        tr.queue.load_state_dict(state["dfm"])
        tr.step, tr.totals = state["step"], state["totals"]
        U.log(f"resumed from {tr.ckpt.path} at step {tr.step}")
    tr.log.truncate(lambda r: r["step"] <= tr.step)  # rows of the steps about to be redone go


def draw_batch(tr: Training, step: int):
    """This process's pair ids of the global batch, and their timesteps and noise.

    Epoch e visits the pairs in the order randperm(seed + e) (DistributedSampler's shuffle),
    batch k of it is that order's positions [k·B, (k+1)·B), and t and ε of the whole batch are
    drawn from (seed, step). Process r takes positions r, r + N, r + 2N, ... of all three, so
    N processes compute what one computes, whether or not N divides B."""
    args = tr.args
    epoch, k = divmod(step, len(tr.pairs) // args.batch)
    order = torch.randperm(len(tr.pairs), generator=torch.Generator().manual_seed(args.seed + epoch)).tolist()
    batch = order[k * args.batch:(k + 1) * args.batch]
    g = U.step_generator(args.seed, step)
    t_all = torch.randint(0, tr.noise_scheduler.config.num_train_timesteps, (args.batch,), generator=g)
    noise_all = torch.randn((args.batch, *tr.latents.shape[1:]), generator=g)
    return [batch[j] for j in tr.mine], t_all[tr.mine], noise_all[tr.mine]


def pair_losses(tr: Training, ids, t, noise):
    """Eq. 5 on the pairs `ids` (with their t and ε): per-pair loss, Δ_θ and Δ_ref."""
    dev, idx = tr.dist.device, tr.index[ids]
    emb = tr.hook.condition(tr, ids, tr.text[idx[:, 2]].to(dev))
    return C.dpo_pair_losses(tr.unet, tr.ref, tr.noise_scheduler, tr.latents[idx[:, 0]].to(dev),
                             tr.latents[idx[:, 1]].to(dev), emb, t.to(dev), noise.to(dev), tr.args.beta, tr.autocast)


def dfm_copies(tr: Training, step: int, ids: list, t, noise, hard_ids: set) -> torch.Tensor:
    """Eq. 11: the augmented copy of each hard pair of this process joins this batch, weighted
    like any pair of it (its gradient accumulates). Returns, summed over processes, the count
    of each augmentation (in C.AUGMENTATIONS order) and then the sum of the copies' losses."""
    args, dev = tr.args, tr.dist.device
    hard = [(j, i) for j, i in enumerate(ids) if i in hard_ids]
    chosen = torch.zeros(len(C.AUGMENTATIONS) + 1)
    if hard:
        js = [j for j, _ in hard]
        # each hard pair keeps its visit's t and ε; its augmentations draw from a stream named
        # by its position in the global batch, so the choice is the same on any number of processes
        picks = C.dfm_augmented_copies(tr.unet, tr.noise_scheduler, tr.dfm_modules, [
            C.HardPair(tr.pairs[i], tr.latents[tr.index[i, :2]].to(dev), tr.text[tr.index[i, 2]][None].to(dev),
                       t[j:j + 1].to(dev), noise[j:j + 1].to(dev), U.step_generator(args.seed, step, 1 + tr.mine[j]))
            for j, i in hard], tr.vae, tr.size, tr.autocast, pool=args.dfm_augmentations)
        for a, _ in picks:
            chosen[C.AUGMENTATIONS.index(a)] += 1
        z = torch.stack([z for _, z in picks])
        per_pair, _, _ = C.dpo_pair_losses(tr.unet, tr.ref, tr.noise_scheduler, z[:, 0], z[:, 1],
                                           tr.text[tr.index[[i for _, i in hard], 2]].to(dev), t[js].to(dev),
                                           noise[js].to(dev), args.beta, tr.autocast)
        (per_pair.sum() / args.batch).backward()
        chosen[-1] = per_pair.detach().sum().float().cpu()
    return U.all_gather_cat(chosen[None]).sum(0)


def dfm_bookkeeping(tr: Training, ids: list, losses: torch.Tensor, hard_ids: set, counts: torch.Tensor) -> dict:
    """Which pairs Eq. 10 flags and what Eq. 11's copies do to them: the totals per
    augmentation and per pair kind, and this step's loss of the hard pairs beside the batch's
    and their copies' (a copy easier than its original gives the pair little new signal)."""
    tr.totals["dfm_flagged"] += len(hard_ids)
    tr.totals["aug_wins"] = {a: tr.totals["aug_wins"][a] + int(n) for a, n in zip(C.AUGMENTATIONS, counts[:-1].tolist())}
    flagged = set(tr.totals["dfm_pairs_flagged"])
    for i in hard_ids:
        kind = tr.pairs[i]["kind"]
        tr.totals["dfm_flagged_by_kind"][kind] = tr.totals["dfm_flagged_by_kind"].get(kind, 0) + 1
        flagged.add(i)
    tr.totals["dfm_pairs_flagged"] = sorted(flagged)
    if not hard_ids:
        return {}
    hard_loss = losses[[k for k, i in enumerate(ids) if i in hard_ids]].mean().item()
    return {"dfm_hard_loss": hard_loss, "dfm_copy_loss": float(counts[-1]) / len(hard_ids)}


def nonfinite_loss(tr: Training, step: int, why: str) -> FloatingPointError:
    last = tr.ckpt.path if tr.ckpt.path.exists() else "(none yet)"
    return FloatingPointError(f"non-finite DPO loss at step {step} ({why}); the last good checkpoint is {last}")


def train_step(tr: Training) -> dict:
    """One optimizer step over one global batch of B pairs; returns the step's log record."""
    args, step = tr.args, tr.step
    ids, t, noise = draw_batch(tr, step)

    # 1. Eq. 9 on this process's pairs, in micro-batches. Each pair's loss is weighted 1/B and
    #    the gradients are summed over processes below, so the update follows
    #        ∇ (1/B) Σ_{i in batch} L_i
    #    on any number of processes and micro-batches.
    tr.opt.zero_grad(set_to_none=True)
    parts = []
    for m in range(0, len(ids), tr.micro):
        sl = slice(m, m + tr.micro)
        try:
            per_pair, dt, dr = pair_losses(tr, ids[sl], t[sl], noise[sl])
        except C.NonFiniteError as e:  # NaN in the denoising errors: diverged weights or bad latents
            raise nonfinite_loss(tr, step, str(e)) from None
        (per_pair.sum() / args.batch).backward()
        parts.append((per_pair.detach(), dt, dr))
    # every process sees every pair's loss, in the batch's order: a NaN stops all of them, and
    # the DFM queues stay identical everywhere
    losses, d_theta, d_ref = (U.gather_positions(torch.cat(x).float().cpu(), args.batch) for x in zip(*parts))
    batch_ids = U.gather_positions(torch.tensor(ids), args.batch).tolist()
    if not torch.isfinite(losses).all():
        raise nonfinite_loss(tr, step, "the loss is NaN or inf")

    # 2. DFM: Eq. 10 flags the pairs whose loss stopped falling (v_i < τ·v̄ on P visits);
    #    Eq. 11 adds, for each, the augmented copy that turns its gradient the most
    n_aug, dfm_record = 0, {}
    if args.dfm == "on":
        hard_ids = set(tr.queue.update(batch_ids, losses))
        counts = dfm_copies(tr, step, ids, t, noise, hard_ids)
        n_aug = int(counts[:-1].sum())
        dfm_record = dfm_bookkeeping(tr, batch_ids, losses, hard_ids, counts)

    # 3. one gradient sum over processes (hand-written, not DDP's wrapper: DFM's extra passes
    #    differ from process to process), rescaled to the mean over the B pairs and their
    #    n_aug copies, g ← g · B / (B + n_aug); then clipping and one update
    U.allreduce_gradients(tr.params)
    if n_aug:
        for p in tr.params:
            p.grad.mul_(args.batch / (args.batch + n_aug))
    grad_norm = torch.nn.utils.clip_grad_norm_(tr.params, args.max_grad_norm)
    tr.opt.step()
    tr.sched.step()
    tr.step += 1
    # implicit accuracy: the share of pairs the policy prefers more than the reference does,
    # Δ_θ < Δ_ref; reward margin: the DPO logit −β/2·(Δ_θ − Δ_ref)
    return dict(step=tr.step, loss=losses.mean().item(), implicit_accuracy=(d_theta < d_ref).float().mean().item(),
                reward_margin=(-0.5 * args.beta * (d_theta - d_ref)).mean().item(), lr=tr.sched.get_last_lr()[0],
                grad_norm=float(grad_norm), dfm_hard=n_aug, dfm_flagged_total=tr.totals["dfm_flagged"], **dfm_record,
                **tr.hook.record(tr, batch_ids, d_theta, d_ref))


def save_checkpoint(tr: Training) -> None:
    tr.ckpt.save({"model": tr.hook.state(tr), "opt": tr.opt.state_dict(), "sched": tr.sched.state_dict(),
                  "dfm": tr.queue.state_dict(), "step": tr.step, "totals": tr.totals})


def finish(tr: Training, seconds: float) -> None:
    """The trained weights as stock folders, and the headline figures: the mean over the
    logged steps of the last tenth of training."""
    args = tr.args
    tr.hook.save(tr)
    rows = {r["step"]: r for r in U.read_jsonl(tr.out / "log.jsonl")}
    last = [r for s, r in rows.items() if s > 0.9 * args.steps] or [rows[max(rows)]]
    metrics = {"final_loss": float(np.mean([r["loss"] for r in last])),
               "implicit_accuracy": float(np.mean([r["implicit_accuracy"] for r in last])),
               **tr.data_counts, "dfm_flagged": tr.totals["dfm_flagged"], "aug_wins": tr.totals["aug_wins"],
               "dfm_flagged_by_kind": tr.totals["dfm_flagged_by_kind"], "n_pairs": len(tr.pairs),
               "dfm_pairs_flagged": len(tr.totals["dfm_pairs_flagged"]), "objective": args.objective, "lam": args.lam,
               "world_size": tr.dist.world_size, "seconds": round(seconds, 1)}
    U.atomic_write_json(tr.out / "metrics.json", metrics)
    if tr.hook.publish:  # last: a folder with model.json is a finished model to stage 5
        M.write_manifest(tr.out, args.name.replace("/", "_"), training="config.json")
    U.log(U.format_metrics(metrics))


def train(args, hook: Hook) -> None:
    """setup(), train_step() until --steps (a checkpoint every --ckpt-every), finish()."""
    t0 = time.time()
    tr = setup(args, hook)
    if tr.step >= args.steps and (tr.out / "metrics.json").exists() and (tr.out / hook.final).exists():
        U.log(f"{tr.out} is finished (step {tr.step} of {args.steps}): nothing to do")
        return U.cleanup_distributed()
    bar = tqdm(total=args.steps, initial=tr.step, desc=args.name, disable=not tr.dist.is_main)
    while tr.step < args.steps:
        if args.stop_after is not None and tr.step >= args.stop_after:
            raise SystemExit(f"stopped after {tr.step} steps (--stop-after); run again to resume")
        record = train_step(tr)
        bar.update(1)
        if tr.step % args.log_every == 0 or tr.step == args.steps:
            tr.log.write(**record)
            bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['implicit_accuracy']:.2f}")
        if tr.dist.is_main and (tr.step % args.ckpt_every == 0 or tr.step == args.steps):
            save_checkpoint(tr)
    bar.close()
    if tr.dist.is_main:
        finish(tr, time.time() - t0)
    U.cleanup_distributed()


def parse(argv=None):
    return U.parse_args(parser(), argv)


if __name__ == "__main__":
    U.run_stage(lambda: train(parse(), Hook()))
