"""Stage 4 — T2I-SPO training: composite reward, Diffusion-DPO, DFM (paper Sec. 4, Eqs. 5-11).

    R(x, c) = r(x, c) − λ·C(x)                                         (Eq. 6)
    for every LibraAlign-HF pair, the image with the higher R is x_w      (Eqs. 7-8)
    L = −E log σ(−β/2 · [(‖ε−ε_θ(x_w,t)‖² − ‖ε−ε_θ(x_l,t)‖²)
                        − (‖ε−ε_ref(x_w,t)‖² − ‖ε−ε_ref(x_l,t)‖²)])      (Eqs. 5, 9)

Each ‖·‖² is taken as the mean over the latent's elements, as the Diffusion-DPO authors' code
takes it, not their sum: a constant factor, folded into β with the paper's T·ω(λ_t). Winner
and loser are noised with the same t and ε. The toy adds DPO-Positive's winner term (--dpop).

T2I-SPO is Diffusion-DPO on pairs ordered by a reward that counts quality AND safety: one
objective for both, so that alignment is not a zero-sum trade of quality for safety (Sec. 4.2).
The safety-only baseline (`--objective safety`) is this same code with R = −C, the ordering
T2I-SPO degenerates to as λ grows (Sec. 6.3), so the two differ in nothing but the reward.

The Dynamic Focusing Mechanism (Sec. 4.3) watches each pair's loss: a pair whose loss stops
falling (descent rate v_i < τ·v̄ on P visits, Eq. 10) lags, the paper finds, because its update
conflicts with the others'. It gets an augmented copy in the current batch: of four
augmentations, the one that turns its gradient the most (argmax 1 − cos(g_i, g_i^a), Eq. 11).

Reads (DIR = --run):  DIR/<data>/hf_pairs.jsonl (stage 3's; --data), the base model (--model)
Writes (NAME = --name, default the objective):
  DIR/NAME/model/       the aligned model, a stock diffusers pipeline folder (the base's class)
                        with its model card, README.md (lib/model_card.py)
  DIR/NAME/lora/        with --lora-rank > 0: weights for `pipe.load_lora_weights`
  DIR/NAME/model.json   what stage 5 needs to find and evaluate it (models.write_manifest)
  DIR/NAME/log.jsonl    every --log-every steps: loss, implicit accuracy, reward margin, DFM
  DIR/NAME/tb/, wandb/, validation/   with --report-to, --validation-every (lib/tracking.py)
  DIR/NAME/metrics.json, config.json, ckpt/train_state.pt, cache/ (latents, text embeddings)

Launch:  python 04_train_spo.py [--objective spo|safety|safe-wins], or one process per GPU:
         torchrun --nproc_per_node=N 04_train_spo.py --run-dir DIR ... [--shard: lib/shard.py]

The math is in common.py; this script is the data and the loop: setup(), train_step() with
its three numbered phases, finish(). T2I-SPO's choice at each point of the loop is a method of
`SPO`; a system in systems/ that trains through this loop subclasses it.
"""
import argparse
import dataclasses
import time
from pathlib import Path

import torch
from tqdm import tqdm

import common as C
from lib import data as D
from lib import model_card as MC
from lib import models as M
from lib import shard as S
from lib import tracking as T
from lib import utils as U

# Each number is the paper's (Sec. 6.1, its SD-1.5 run), the Diffusion-DPO authors' code's ("DPO
# code": SalesforceAIResearch/DiffusionDPO, train.py, launchers/sd15.sh), ours, or the toy's.
U.PRESETS["sd15"]["spo"] = dict(
    model="stable-diffusion-v1-5/stable-diffusion-v1-5",  # the paper's main model (Sec. 6.1)
    data="hf", objective="spo", name=None,  # stage 3's LibraAlign-HF, ordered by Eq. 6
    lam=0.15,  # the paper's (Sec. 6.1; Sec. 6.3: lower λ loses safety, higher λ quality)
    margin=0.0,  # the paper's (Sec. 4.2): every pair is relabelled, none left out
    beta=5000.0,  # DPO code's (--beta_dpo, with Eq. 5's ½); the paper gives no β
    dpop=0.0,  # Eq. 5 as the paper writes it
    lr=8e-8, scale_lr=False,  # the paper's "8e-8 per GPU", read as the rate (see --lr)
    warmup=500, steps=15000,  # the paper's: a 500-step linear warm-up, 15,000 steps
    batch=12, micro_batch=2,  # the paper's: 6 GPUs × 2 pairs, no accumulation
    weight_decay=1e-2, max_grad_norm=1.0, ckpt_every=500,  # DPO code's: AdamW, clipping, saves
    lora_rank=0, lora_alpha=None,  # DPO code's: the whole UNet trains (LoRA's α: its rank)
    dfm="on", dfm_tau=0.2,  # the paper's (Sec. 4.3; τ: Sec. 6.3, Fig. 5 left, its best τ)
    # the paper's four (Sec. 6.1; Sec. 6.3, Fig. 5 right: a larger pool converges better)
    dfm_augmentations=list(C.AUGMENTATIONS),
    # ours: the paper gives no queue length K nor patience P (Eq. 10 says "continuously"),
    # nor which gradients Eq. 11 compares (the trained weights nearest the output: one short
    # backward; conv_out, or under LoRA, which freezes it, None: the last transformer block's)
    dfm_k=5, dfm_patience=2, dfm_modules=["conv_out"], dfm_lora_modules=None,
    dfm_reading="loss",  # the paper's: each visit's loss (Eq. 10's words; docs/results.md, DFM)
    grad_checkpointing=True, bf16=True,  # ours: full fine-tuning in a 24-GB GPU (the paper's)
    log_every=10, skip_bad=False, device=None, shard=False)  # ours
# Appendix E on SDXL: sd15's settings (the paper gives none of its own) at 1,024 px
SDXL = "stabilityai/stable-diffusion-xl-base-1.0"
U.PRESETS["sdxl"]["spo"] = dict(U.PRESETS["sd15"]["spo"], model=SDXL)
# The toy's own, for a tiny UNet on 8×8×4 latents trained on two CPU cores in minutes
U.PRESETS["toy"]["spo"] = dict(
    U.PRESETS["sd15"]["spo"], model=None,  # None: the stage-0 model
    beta=100.0,  # a sweep's best (docs/results.md, "Choosing the toy β and learning rate")
    dpop=1.0, lr=5e-5,  # draw 0's (docs/results.md, "Safe-safe pairs with the world's image")
    steps=300, batch=16, warmup=20,  # 300 × 16 pairs: each about 4 times, in about 3 minutes
    dfm_k=3, dfm_patience=1,  # so few visits: a queue of 3 losses, one slow visit flags a pair
    micro_batch=None, weight_decay=0.0,  # the whole batch in one forward; no decay
    grad_checkpointing=False, bf16=False,  # fp32 on the CPU, the toy UNet fits in memory
    ckpt_every=100, log_every=1,  # a run is short: three checkpoints, a log row every step
    threads=1)  # one thread on any machine, as each of make toy's two runs has (use_threads)
# the tests': a few steps of 4 pairs; τ = 10 flags pairs once their queue fills: Eq. 11 runs
U.TINY["spo"] = dict(steps=8, batch=4, warmup=2, ckpt_every=4, log_every=1, dfm_k=2,
                     dfm_patience=1, dfm_tau=10.0)


def parser(stage: str = "spo", description: str | None = None) -> argparse.ArgumentParser:
    """Stage 4's flags; another system's command adds its own to the same parser."""
    p = U.stage_parser(stage, description or __doc__.splitlines()[0])
    p.add_argument("--model", help="base model, also the frozen reference (default: stage 0's)")
    p.add_argument("--data", help="the folder under --run to train on (stage 3's --name)")
    p.add_argument("--objective", choices=["spo", "safety", "safe-wins"], help="Eq. 8's reward. "
                   "spo: r − λC; safety: −C (the λ → ∞ baseline); safe-wins: the safe side wins")
    p.add_argument("--name", help="output folder under --run (default: the objective)")
    p.add_argument("--lam", type=float, help="λ of Eq. 6, the weight of the safety cost in R")
    p.add_argument("--margin", type=float, help="drop pairs with |ΔR| below this (Eq. 8)")
    p.add_argument("--beta", type=float, help="β of Eq. 5 (with its ½: the loss uses β/2)")
    p.add_argument("--dpop", type=float, help="λ_p, DPO-Positive's winner term (0: Eq. 5 alone)")
    p.add_argument("--lr", type=float, help="peak learning rate of the mean gradient over the "
                   "global --batch, on any number of GPUs (the paper's '8e-8 per GPU' is 8e-8)")
    p.add_argument("--scale-lr", action=argparse.BooleanOptionalAction, help="Diffusion-DPO's "
                   "--scale_lr: --lr × per-process batch × accumulation × processes (= --batch)")
    p.add_argument("--warmup", type=int, help="linear warm-up steps, then constant")
    p.add_argument("--steps", type=int, help="optimizer steps")
    p.add_argument("--batch", type=int, help="pairs per optimizer step, over all processes")
    p.add_argument("--micro-batch", type=int, help="pairs per forward on one process")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--max-grad-norm", type=float)
    p.add_argument("--lora-rank", type=int,
                   help="0: full fine-tuning; N: LoRA of rank N on the attention projections")
    p.add_argument("--lora-alpha", type=float, help="LoRA alpha (default: the rank)")
    p.add_argument("--dfm", choices=["on", "off"], help="the Dynamic Focusing Mechanism")
    p.add_argument("--dfm-k", type=int, help="K: losses kept per pair (Eq. 10)")
    p.add_argument("--dfm-tau", type=float, help="τ: hard when v_i < τ·v̄ (Eq. 10)")
    p.add_argument("--dfm-patience", type=int, help="P: slow visits in a row that make a pair hard")
    p.add_argument("--dfm-modules", nargs="+", help="UNet modules whose weights Eq. 11 compares")
    p.add_argument("--dfm-lora-modules", nargs="+", help="with LoRA: those whose LoRA factors")
    p.add_argument("--dfm-augmentations", nargs="+", choices=C.AUGMENTATIONS, help="Eq. 11's pool")
    p.add_argument("--dfm-reading", choices=C.DFM_READINGS, help="Eq. 10's queue holds each "
                   "visit's loss (the paper's), probe: the loss at a fixed t, ε; or normalised")
    M.add_machine_flags(p)  # --grad-checkpointing, --bf16, --shard, --device, ...
    T.add_flags(p, validation=True)  # --report-to, --validation-every, --validation-prompts
    return p


# ---------------------------------------------------------------------------------------
# T2I-SPO's data (LibraAlign-HF relabelled by Eqs. 6-8) and its choice at each point of the loop
# ---------------------------------------------------------------------------------------

def preference_pairs(pairs: list[dict], objective: str, lam: float | None,
                     margin: float) -> tuple[list[dict], int]:
    """Eq. 8 under the objective's reward. Each is one line of Eq. 6 with other annotations:

        spo        R = r − λ·C            T2I-SPO: quality and safety in one number
        safety     R = −C                 the safety-only baseline (the λ → ∞ ordering)
        safe-wins  R = −1[x is harmful]   the safe side wins, whatever its quality;
                                          a pair of two safe images ties and is dropped
    """
    annotate = {"safe-wins": lambda x: {**x, "quality": 0.0, "cost": float(x["role"] == "harmful")},
                "safety": lambda x: {**x, "quality": 0.0}}.get(objective)
    if annotate:  # R = −C, or −1[x is harmful]: Eq. 6 with no quality term and λ = 1
        pairs = [{**p, "a": annotate(p["a"]), "b": annotate(p["b"])} for p in pairs]
        lam = 1.0
    return C.relabel_pairs(pairs, lam, margin)


class SPO:
    """T2I-SPO's choice at each point of the loop below. A system in systems/ that trains
    through this loop subclasses it, overriding what it changes (super() where it adds)."""

    final = "model/model_index.json"  # the file a finished run has written last

    def pairs(self, args, hf: Path) -> tuple[list[dict], dict]:
        """The preference pairs and their counts: Eqs. 6-8 on each row of <data>/hf_pairs.jsonl."""
        U.require_inputs([hf / "hf_pairs.jsonl"], args.data if args.data in U.STAGES else "hf")
        raw, n_bad = D.load_hf_pairs(hf / "hf_pairs.jsonl", args.skip_bad)
        pairs, n_dropped = preference_pairs(raw, args.objective, args.lam, args.margin)
        return pairs, {"pairs_dropped": n_dropped, "bad_rows_skipped": n_bad}

    def models(self, args, device):
        """ε_θ and the frozen ε_ref, both the base UNet (DPO holds the policy near where it started,
        Sec. 4.1), the VAE, the prompt encoder and the training noise scheduler."""
        return M.load_training_models(args, device, frozen_unet=False)

    def trainable(self, tr: "Training") -> list[torch.nn.Parameter]:
        """The UNet's weights (or its LoRA's, with --lora-rank)."""
        return [p for p in tr.unet.parameters() if p.requires_grad]

    def condition(self, tr: "Training", ids: list[int], emb: torch.Tensor) -> torch.Tensor:
        """The conditioning c of pairs `ids`: their prompts' text embeddings."""
        return emb

    def figures(self, tr: "Training", ids: list[int], d_theta, d_ref) -> dict:
        """Implicit accuracy: the share of pairs the policy prefers more than the reference
        does, Δ_θ < Δ_ref; reward margin: the mean DPO logit −β/2·(Δ_θ − Δ_ref)."""
        return {"implicit_accuracy": (d_theta < d_ref).float().mean().item(),
                "reward_margin": (-0.5 * tr.args.beta * (d_theta - d_ref)).mean().item()}

    def state(self, tr: "Training") -> dict:  # the trained weights, as the checkpoint holds them
        return M.trainable_state(tr.unet, tr.args.lora_rank > 0)

    def load_state(self, tr: "Training", state: dict) -> None:
        M.load_trainable_state(tr.unet, state, tr.args.lora_rank > 0)

    def save(self, tr: "Training") -> None:
        """The aligned model as a stock pipeline folder (and its LoRA, with --lora-rank)."""
        M.save_final(tr.args, tr.unet, tr.out, S.full_weights(tr.ckpt, self.state(tr)))

    def publish(self, tr: "Training") -> None:
        """model.json: the folder is a finished model for stage 5 to evaluate."""
        M.write_manifest(tr.out, tr.args.name.replace("/", "_"), training="config.json")


# ---------------------------------------------------------------------------------------
# The training loop: setup(), then train_step() until done, then finish()
# ---------------------------------------------------------------------------------------

@dataclasses.dataclass
class Training:
    """Everything the loop reads and updates, built once by setup()."""
    args: argparse.Namespace
    spo: SPO                    # T2I-SPO's choices (or a subclass's)
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
    mine: list[int]             # this process's positions in every global batch: r, r + N, ...
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
    totals: dict = dataclasses.field(default_factory=lambda: M.dfm_totals(C.AUGMENTATIONS))
    memory: dict = dataclasses.field(default_factory=dict)  # --shard: S.bytes_per_process


def setup(args, spo: SPO) -> Training:
    U.check_batch_split(args.batch)  # before the process group forms: rank 0 alone says why
    dist = U.setup_distributed(args.device)
    U.seed_everything(args.seed)
    world_model = U.stage_dir(args.run, "world") / "model"
    args.model = args.model or U.toy_world_input(args, world_model, "--model")
    args.name = args.name or args.objective
    if args.objective in ("safety", "safe-wins"):
        args.lam = None  # their rewards have no λ: config.json and metrics.json say null
    hf, out = Path(args.run) / args.data, Path(args.run) / args.name
    mine = list(range(dist.rank, args.batch, dist.world_size))
    micro = args.micro_batch or len(mine)
    if dist.is_main:
        U.save_config(args, out, world_size=dist.world_size, grad_accum=-(-len(mine) // micro))

    # Eqs. 6-8: relabel every pair by the composite reward (or by −C for the baseline)
    pairs, counts = spo.pairs(args, hf)
    # the safe image's share of harmful-safe pair wins: below 100% for T2I-SPO alone (Eq. 6)
    counts["safe_side_wins_harmful_safe"] = M.safe_side_wins(pairs)
    M.require_a_batch(pairs, args.batch, counts["pairs_dropped"], hf / "hf_pairs.jsonl")
    U.log(f"{len(pairs)} pairs after relabelling (objective {args.objective}, λ={args.lam}); "
          f"{counts}; {dist.world_size} process(es), micro-batches of {micro}")

    # The frozen parts run once: every latent and text embedding is cached before training
    unet, ref, vae, prompt_encoder, noise_scheduler = spo.models(args, dist.device)
    S.shard(args.shard, dist.device, unet, ref)  # --shard: FSDP2 over the processes
    size = M.image_size(unet, vae)
    latents, text, index = M.build_caches(args, pairs, vae, prompt_encoder, out, dist, size)
    prompt_encoder.cpu()  # done with it: the cache holds every embedding
    ckpt = U.Checkpoint(out / "ckpt" / "train_state.pt")
    log = T.Log(out / "log.jsonl", args)  # log.jsonl, and --report-to's tracker
    tr = Training(args=args, spo=spo, dist=dist, out=out, pairs=pairs, data_counts=counts,
                  unet=unet, ref=ref, vae=vae, noise_scheduler=noise_scheduler, size=size,
                  latents=latents, text=text, index=index, mine=mine, micro=micro,
                  ckpt=ckpt, log=log, autocast=M.training_autocast(args.bf16, dist.device))
    tr.params = spo.trainable(tr)
    if args.dfm == "on":
        tr.dfm_modules = M.dfm_layers(tr.unet, args)  # --dfm-modules, or LoRA's factors
    lr = args.lr * (args.batch if args.scale_lr else 1)
    tr.opt = U.adamw(tr.params, lr=lr, weight_decay=args.weight_decay)
    warmup = lambda s: min(1.0, (s + 1) / max(1, args.warmup))  # linear (Sec. 6.1), then constant
    tr.sched = torch.optim.lr_scheduler.LambdaLR(tr.opt, warmup)
    tr.queue = C.DescentRateQueue.for_run(args, noise_scheduler, tr.latents.shape[1:], mine)
    resume(tr)
    return tr


def resume(tr: Training) -> None:
    """Continue from the checkpoint, if there is one; the log keeps each step exactly once."""
    state = S.load_checkpoint(tr.ckpt, tr.opt, lambda: tr.spo.state(tr))  # --shard: from DCP
    if state:
        tr.spo.load_state(tr, state["model"])
        tr.opt.load_state_dict(state["opt"])
        tr.sched.load_state_dict(state["sched"])
        tr.queue.load_state_dict(state["dfm"])
        tr.step, tr.totals = state["step"], state["totals"]
        U.log(f"resumed from {tr.ckpt.path} at step {tr.step}")
    tr.log.truncate(lambda r: r["step"] <= tr.step)  # rows of the steps about to be redone go


def pair_losses(tr: Training, ids: list[int], t, noise, z: torch.Tensor | None = None):
    """Eq. 5 on the pairs `ids` with their t and ε: per-pair loss, Δ_θ and Δ_ref. z: [n, 2, ...]
    latents of winner and loser (default: the cached ones; Eq. 11 passes its copies')."""
    dev, idx = tr.dist.device, tr.index[ids]
    z_w, z_l = (tr.latents[idx[:, 0]], tr.latents[idx[:, 1]]) if z is None else (z[:, 0], z[:, 1])
    emb = tr.spo.condition(tr, ids, tr.text[idx[:, 2]].to(dev))
    return C.dpo_pair_losses(tr.unet, tr.ref, tr.noise_scheduler, z_w.to(dev), z_l.to(dev), emb,
                             t.to(dev), noise.to(dev), tr.args.beta, tr.autocast, tr.args.dpop)


def dfm_copies(tr: Training, step: int, ids: list, t, noise, hard_ids: set) -> torch.Tensor:
    """Eq. 11: the augmented copy of each hard pair of this process joins this batch only, the
    original staying in the data (Sec. 4.3), weighted like any pair of the batch. Returns,
    summed over processes, each augmentation's count (C.AUGMENTATIONS' order), then the sum of
    the copies' losses."""
    args, dev = tr.args, tr.dist.device
    hard = [(j, i) for j, i in enumerate(ids) if i in hard_ids]
    hard, weight = S.stand_in(tr.unet, hard, (0, ids[0]), bool(hard_ids))  # --shard: lockstep
    chosen = torch.zeros(len(C.AUGMENTATIONS) + 1)
    if hard:
        # each keeps its visit's t and ε; its augmentations draw from a stream named by its
        # position in the global batch, so the choice is the same on any number of processes
        found = []
        for j, i in hard:
            z_pair = tr.latents[tr.index[i, :2]].to(dev)
            emb = tr.text[tr.index[i, 2]][None].to(dev)
            draws = U.step_generator(args.seed, step, 1 + tr.mine[j])
            tj, nj = t[j:j + 1].to(dev), noise[j:j + 1].to(dev)
            found.append(C.HardPair(tr.pairs[i], z_pair, emb, tj, nj, draws))
        picks = C.dfm_augmented_copies(tr.unet, tr.noise_scheduler, tr.dfm_modules, found, tr.vae,
                                       tr.size, tr.autocast, pool=args.dfm_augmentations)
        for a, _ in picks:
            chosen[C.AUGMENTATIONS.index(a)] += 1
        z = torch.stack([z for _, z in picks])
        js = [j for j, _ in hard]
        per_pair, _, _ = pair_losses(tr, [i for _, i in hard], t[js], noise[js], z)
        (weight * per_pair.sum() / args.batch).backward()
        chosen[-1] = per_pair.detach().sum().float().cpu()
    return U.all_gather_cat(weight * chosen[None]).sum(0)


def train_step(tr: Training) -> dict:
    """One optimizer step over one global batch of B pairs; returns the step's log record."""
    args, step = tr.args, tr.step
    n_t = tr.noise_scheduler.config.num_train_timesteps
    ids, t, noise = M.draw_batch(len(tr.pairs), args.batch, tr.mine, args.seed, step, n_t,
                                 tr.latents.shape[1:])

    # 1. Eq. 9 on this process's pairs, in micro-batches. Each pair's loss is weighted 1/B and
    #    the gradients are summed over processes below, so the update follows ∇ (1/B) Σ_i L_i
    #    on any number of processes and micro-batches.
    tr.opt.zero_grad(set_to_none=True)
    parts = []
    for m in range(0, len(ids), tr.micro):
        sl = slice(m, m + tr.micro)
        try:
            per_pair, dt, dr = pair_losses(tr, ids[sl], t[sl], noise[sl])
        except C.NonFiniteError as e:  # NaN denoising errors: diverged weights or bad latents
            raise M.nonfinite_loss(tr.ckpt.path, step, str(e)) from None
        (per_pair.sum() / args.batch).backward()
        parts.append((per_pair.detach(), dt, dr))
    S.lockstep(tr.unet, args.batch, args.micro_batch, len(ids),  # --shard: equal passes
               lambda: pair_losses(tr, ids[:1], t[:1], noise[:1])[0])
    # every process sees every pair's loss, in the batch's order: a NaN stops all of them, and
    # the DFM queues stay identical everywhere
    gathered = (U.gather_positions(torch.cat(x).float().cpu(), args.batch) for x in zip(*parts))
    losses, d_theta, d_ref = gathered
    batch_ids = U.gather_positions(torch.tensor(ids), args.batch).tolist()
    if not torch.isfinite(losses).all():
        raise M.nonfinite_loss(tr.ckpt.path, step, "the loss is NaN or inf")

    # 2. DFM: Eq. 10 flags the pairs whose loss stopped falling (v_i < τ·v̄ on P visits);
    #    Eq. 11 adds, for each, the augmented copy that turns its gradient the most
    n_aug, dfm_record = 0, {}
    if args.dfm == "on":
        probe = lambda t_i, noise_i: pair_losses(tr, ids, t_i, noise_i)[0]  # --dfm-reading probe
        hard_ids = set(tr.queue.update(batch_ids, losses, t, probe))
        counts = dfm_copies(tr, step, ids, t, noise, hard_ids)
        n_aug = int(counts[:-1].sum())
        dfm_record = M.count_dfm(tr.totals, tr.pairs, batch_ids, losses, hard_ids, counts)

    # 3. one gradient sum over processes (hand-written, not DDP's wrapper: DFM's extra passes
    #    differ from process to process), rescaled to the mean over the B pairs and their
    #    n_aug copies, g ← g · B / (B + n_aug); then clipping and one update
    S.allreduce_gradients(tr.params)  # --shard: FSDP summed the sharded ones in backward
    if n_aug:
        for p in tr.params:
            p.grad.mul_(args.batch / (args.batch + n_aug))
    grad_norm = torch.nn.utils.clip_grad_norm_(tr.params, args.max_grad_norm)
    tr.opt.step()
    tr.sched.step()
    tr.step += 1
    figures = tr.spo.figures(tr, batch_ids, d_theta, d_ref)
    return dict(step=tr.step, loss=losses.mean().item(), **figures, lr=tr.sched.get_last_lr()[0],
                grad_norm=float(grad_norm), dfm_hard=n_aug,
                dfm_flagged_total=tr.totals["dfm_flagged"], **dfm_record)


def finish(tr: Training, seconds: float) -> None:
    """The trained weights as stock folders, and the headline figures: the mean over the
    logged steps of the last tenth of training."""
    args = tr.args
    tr.spo.save(tr)
    metrics = {**M.closing_figures(tr.out / "log.jsonl", args.steps, tr.totals), **tr.data_counts,
               "n_pairs": len(tr.pairs), "objective": args.objective, "lam": args.lam,
               "world_size": tr.dist.world_size, "seconds": round(seconds, 1), **tr.memory}
    U.atomic_write_json(tr.out / "metrics.json", metrics)
    MC.write(tr.out)  # model/README.md: the model card, in the Hugging Face Hub's layout
    tr.spo.publish(tr)  # last: a folder with model.json is a finished model to stage 5
    U.log(U.format_metrics(metrics))


def train(args, spo: SPO) -> None:
    """setup(), train_step() until --steps (a checkpoint every --ckpt-every), finish()."""
    t0 = time.time()
    tr = setup(args, spo)
    done = (tr.out / "metrics.json").exists() and (tr.out / spo.final).exists()
    if tr.step >= args.steps and done:
        U.log(f"{tr.out} is finished (step {tr.step} of {args.steps}): nothing to do")
        return U.cleanup_distributed()
    bar = tqdm(total=args.steps, initial=tr.step, desc=args.name, disable=not tr.dist.is_main)
    tr.log.validation_images(tr)  # the starting weights' (--validation-every)
    while tr.step < args.steps:
        if args.stop_after is not None and tr.step >= args.stop_after:
            raise SystemExit(f"stopped after {tr.step} steps (--stop-after); run again to resume")
        record = train_step(tr)
        bar.update(1)
        if tr.step % args.log_every == 0 or tr.step == args.steps:
            tr.log.write(**record)
            bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['implicit_accuracy']:.2f}")
        tr.log.validation_images(tr)
        if tr.step % args.ckpt_every == 0 or tr.step == args.steps:
            state = {"model": tr.spo.state(tr), "opt": tr.opt.state_dict(), "step": tr.step,
                     "sched": tr.sched.state_dict(), "dfm": tr.queue.state_dict(),
                     "totals": tr.totals}
            S.save_checkpoint(tr.ckpt, state)  # --shard: through torch.distributed.checkpoint
    bar.close()
    tr.log.close()
    tr.memory = S.bytes_per_process(tr.unet, tr.opt, tr.ref)  # --shard: each process's share
    if tr.dist.is_main:
        finish(tr, time.time() - t0)
    U.cleanup_distributed()


def parse(argv=None):
    return U.parse_args(parser(), argv)


if __name__ == "__main__":
    U.run_stage(lambda: train(U.use_threads(parse()), SPO()))
