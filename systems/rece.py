"""RECE (Gong et al. 2024, "Reliable and Efficient Concept Erasure"), the last row of the
paper's Table 2, as CharlesGong12/RECE's train.py computes it: its own UCE edit, then a few
epochs of adversarial erasure. Each epoch finds, in closed form, the embedding c′ that makes
the EDITED cross-attention give back what the original gave the erased concept (the embedding
a jailbreak would look for), and erases c′ with UCE's closed form too. The base model, the UCE
start and every epoch are judged on a validation split of harmful prompts (never the
evaluation prompts); RECE is the first of them with the lowest IP.

  uce        RECE's UCE start (its erase_methods/train_uce.py, start_rows): each erased
             concept's text-encoder rows from its last word token to the end of the window
             edited onto " "'s rows, "" and the preserved concepts kept; λ = 0.5. Not Table 2's
             `uce` row, which follows UCE's own code (one row per concept, systems/baselines.py)
  epoch k    c′ = adversarial_embedding(c, W′, W) for every row of each concept's window, then
             W′ ← uce_edit(W′, c′ → the rows of " ", adversarial_keep kept at 0.1), λ = 0.1

Every edit is baselines.uce_edit on every cross-attention to_k and to_v. The window is the text
encoder's: 77 tokens on SD-1.5, 32 on the toy. sd15 validates on RECE's own prompts
(dataset/validation_inappropriate.csv, each with its seed: --val-prompts) drawn with RECE's
sampler (LMS, 50 steps, guidance 7.5) and judged by NudeNet; the toy on its world's harmful
TRAINING prompts, with its own sampler and judge.

Command:  python -m systems.rece build --run DIR    -> DIR/baselines/rece/ (model/, model.json,
          metrics.json); stage 5 evaluates it beside the others, and baselines.section reports it.

What it is not: UCE's closed form (baselines.uce_edit), the Table 2 section (systems/baselines.py).
"""
import random
import time
from pathlib import Path

import torch

from lib import data as D
from lib import models as M
from lib import scorers as S
from lib import toyworld as W
from lib import utils as U
from systems import baselines as B

# RECE's validation sampler (execs/generate_images.py): LMS on SD's noise schedule
RECE_LMS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


# ---------------------------------------------------------------------------------------
# RECE's closed form and the rows each edit takes
# ---------------------------------------------------------------------------------------

def adversarial_embedding(c: torch.Tensor, edited: list[torch.Tensor], original: list[torch.Tensor],
                          lam: float = 0.1) -> torch.Tensor:
    """The embedding c′ whose keys and values under the edited projections W′_l are nearest
    what the original projections W_l made of c, over every cross-attention to_k and to_v l:

        c′ = argmin Σ_l ‖W′_l c′ − W_l c‖² + λ‖c′‖²  =  (λI + Σ_l W′_lᵀW′_l)⁻¹ Σ_l W′_lᵀW_l c

    c: [n, d], one embedding per row; returns [n, d]. Solved in float64."""
    d = c.shape[1]
    A = lam * torch.eye(d, dtype=torch.float64)
    B_ = torch.zeros(d, d, dtype=torch.float64)
    for We, Wo in zip(edited, original):
        We, Wo = We.double(), Wo.double()
        A += We.T @ We
        B_ += We.T @ Wo
    # c′ᵀ = A⁻¹ B cᵀ: A is symmetric positive definite
    return torch.linalg.solve(A, B_ @ c.double().T).T.to(c.dtype)


def aligned_from_last_word(concept: tuple[torch.Tensor, int], guide: tuple[torch.Tensor, int]):
    """The rows RECE's UCE start edits, from (window rows, last word token) of a concept and of
    its guide: the concept's from its last word token on, the guide's from its own (" ": the
    start token), as many as both windows hold, so row i of one is edited onto row i of the other."""
    (c, i), (g, j) = concept, guide
    n = len(c) - max(i, j)
    return c[i:i + n], g[j:j + n]


def windows(encode, texts: list[str]) -> torch.Tensor:
    """Every row of every text's window, stacked: what RECE's edits take for a concept."""
    return torch.cat([encode(t)[0] for t in texts])


def start_rows(encode, erase: list[str], preserve: list[str]):
    """RECE's own UCE edit, where its epochs start (erase_methods/train_uce.py, edit_model):
    each erased concept onto " " (aligned_from_last_word), and "" with every preserved concept
    kept, each whole window, at the weight max(0.1, 1/(their number)) train_uce.py gives them.
    encode(text) -> (window rows, last word token). Returns (erase, guide, keep, keep weight)."""
    pairs = [aligned_from_last_word(encode(c), encode(" ")) for c in erase]
    kept = ["", *preserve]
    return (torch.cat([c for c, _ in pairs]), torch.cat([g for _, g in pairs]), windows(encode, kept),
            round(max(0.1, 1 / len(kept)), 3))


def adversarial_keep(preserve: list[str], n_erase: int, seed: int) -> list[str]:
    """What every adversarial epoch keeps (train.py): " " once per erased concept when no
    concept is to be preserved, else as many preserved concepts as erased ones, drawn at
    random (the toy's 21 of 21: all of them)."""
    if not preserve:
        return [" "] * n_erase
    if len(preserve) < n_erase:
        raise SystemExit(f"RECE keeps one preserved concept per erased one: {len(preserve)} preserved concepts "
                         f"for {n_erase} erased")
    return random.Random(seed).sample(preserve, n_erase)


def cross_attention_projections(unet) -> dict[str, torch.nn.Linear]:
    """Every cross-attention to_k and to_v: the layers UCE and RECE edit."""
    return {n: m for n, m in unet.named_modules() if n.endswith(("attn2.to_k", "attn2.to_v"))}


def projection_weights(layers: dict) -> list[torch.Tensor]:
    return [m.weight.detach().cpu().clone() for m in layers.values()]


def load_projection_weights(layers: dict, weights: list[torch.Tensor]) -> None:
    for m, w in zip(layers.values(), weights):
        m.weight.data.copy_(w.to(m.weight.dtype))


def edit_projections(layers: dict, erase: torch.Tensor, guide: torch.Tensor, keep: torch.Tensor,
                     keep_scale: float, lam: float) -> None:
    """One UCE edit of every projection, in place: erase → guide, keep kept."""
    load_projection_weights(layers, [B.uce_edit(w, erase, guide, keep, lam=lam, preserve_scale=keep_scale)
                                     for w in projection_weights(layers)])


def rece_models(layers: dict, encode, args):
    """The models RECE judges, in train.py's order, each made in place from the last: the base
    model ("sd"), the UCE start ("uce"), then every adversarial epoch ("epoch k")."""
    original = projection_weights(layers)
    yield "sd"
    edit_projections(layers, *start_rows(encode, args.erase_concepts, args.preserve_concepts), lam=args.uce_lambda)
    yield "uce"
    n = len(args.erase_concepts)
    concepts = windows(encode, args.erase_concepts)
    guide = windows(encode, [" "] * n)
    keep = windows(encode, adversarial_keep(args.preserve_concepts, n, args.seed))
    for k in range(1, args.epochs + 1):
        adv = adversarial_embedding(concepts, projection_weights(layers), original, lam=args.adv_lambda)
        edit_projections(layers, adv, guide, keep, args.preserve_scale, lam=args.rece_lambda)
        yield f"epoch {k}"


# ---------------------------------------------------------------------------------------
# The build: every model judged on the validation split
# ---------------------------------------------------------------------------------------

def validation_prompts(args) -> list[dict]:
    """The validation split: --val-prompts (sd15: RECE's dataset/validation_inappropriate.csv;
    default on the toy: the world's harmful TRAINING prompts, which stage 5 never evaluates),
    its first --val-n rows (none given: every row)."""
    source = args.val_prompts or U.toy_world_input(args, U.stage_dir(args.run, "world") / "prompts" /
                                                   "harmful_train.jsonl", "--val-prompts")
    rows, _ = D.load_prompt_set(str(source))
    return rows[:args.val_n]


def validation_sampler(pipe, sampler: str):
    """The pipeline that draws the validation images: the model's own ("model"), or RECE's LMS
    sampler ("lms") on the same modules, so that the model saved keeps its own."""
    if sampler == "model":
        return pipe
    from diffusers import LMSDiscreteScheduler
    out = type(pipe)(**{**pipe.components, "scheduler": LMSDiscreteScheduler(**RECE_LMS)})
    out.set_progress_bar_config(disable=True)
    return out


def validation_ip(pipe, rows: list[dict], args, detector) -> float:
    """IP of one model on the validation split: one image per prompt, with the row's seed (or
    seeds 0, 1, ...); the toy judge on the toy, NudeNet's exposed parts on sd15."""
    seeds = [r["seed"] if r["seed"] is not None else k for k, r in enumerate(rows)]
    images = M.generate(pipe, [r["prompt"] for r in rows], seeds, args.sample_steps, args.guidance, args.batch_size)
    if args.preset == "toy":
        return sum(map(S.toy_inappropriate, images)) / len(images)
    bgr = [im[..., ::-1].copy() for im in images]  # NudeNet reads arrays as OpenCV does: BGR
    flags = [bool(S.nudenet_parts(d)) for d in detector.detect_batch(bgr)]
    return sum(flags) / len(flags)


def build(args, out: Path, device) -> dict:
    rows = validation_prompts(args)
    pipe = M.load_pipeline(args.model, device)
    layers = cross_attention_projections(pipe.unet)
    sampler = validation_sampler(pipe, args.val_sampler)
    detector = None
    if args.preset != "toy":
        from nudenet import NudeDetector
        detector = NudeDetector()
    encode = lambda text: B.concept_states(pipe.text_encoder, pipe.tokenizer, text)
    judged, best = [], None
    for name in rece_models(layers, encode, args):
        ip = validation_ip(sampler, rows, args, detector)
        judged.append({"model": name, "validation_IP": ip})
        U.log(f"{name}: validation IP {ip:.3f} on {len(rows)} prompts")
        if best is None or ip < best[1]:  # train.py keeps a model only for a strictly lower rate
            best = (name, ip, projection_weights(layers))
    load_projection_weights(layers, best[2])
    M.save_pipeline(pipe, out / "model")
    return {"judged": judged, "chosen": best[0], "validation_prompts": len(rows)}


def run_build(args) -> None:
    """DIR/baselines/rece/, ending with the model.json that tells stage 5 to evaluate it."""
    t0 = time.time()
    out = Path(args.run) / "baselines" / "rece"
    U.save_config(args, out)
    if (out / "metrics.json").exists() and (out / M.MANIFEST).exists():
        return U.log(f"{out}: finished, nothing to do")
    metrics = {"method": "rece", **build(args, out, M.pick_device(args.device)), "seconds": round(time.time() - t0, 1)}
    U.atomic_write_json(out / "metrics.json", metrics)
    M.write_manifest(out, "rece")
    U.log(U.format_metrics(metrics))


# ---------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------

# RECE's numbers are its code's: uce_lambda its train_uce.py default; epochs, adv_lambda
# (--regular_scale), rece_lambda (--lamb) and preserve_scale its scripts/nudity.sh. The toy's
# own: its validation split (64 of the world's harmful training prompts), sampler and guidance.
U.PRESETS["toy"]["rece"] = dict(
    model=None, erase_concepts=W.harm_concepts(), preserve_concepts=B.toy_preserve_concepts(), uce_lambda=0.5,
    epochs=3, adv_lambda=0.1, rece_lambda=0.1, preserve_scale=0.1, val_prompts=None, val_n=64, val_sampler="model",
    sample_steps=U.TOY_SAMPLE_STEPS, guidance=4.0, batch_size=64, device=None,
    threads=1)  # the toy's: beside the other baselines on 2 cores (utils.use_threads)
# sd15: RECE's nudity run (scripts/nudity.sh), validated as its train.py does: every prompt of
# its CSV, LMS, 50 steps, guidance 7.5 (execs/generate_images.py)
U.PRESETS["sd15"]["rece"] = dict(
    U.PRESETS["toy"]["rece"], model="stable-diffusion-v1-5/stable-diffusion-v1-5", erase_concepts=["nudity"],
    preserve_concepts=[], val_n=None, val_sampler="lms", sample_steps=50, guidance=7.5, batch_size=8, threads=0)
U.TINY["rece"] = dict(epochs=1, val_n=4, sample_steps=3)


def build_parser():
    p = U.stage_parser("rece", "RECE: its UCE start, then adversarial embeddings erased epoch by epoch")
    p.add_argument("--model", help="the base model (default: the stage-0 model)")
    p.add_argument("--erase-concepts", nargs="+", help="the concepts to erase (as systems/baselines.py's uce)")
    p.add_argument("--preserve-concepts", nargs="*", help="the concepts whose keys and values must stay")
    p.add_argument("--uce-lambda", type=float, help="λ of RECE's UCE start (train_uce.py: 0.5)")
    p.add_argument("--epochs", type=int, help="adversarial epochs after the UCE start (RECE: 3 for nudity)")
    p.add_argument("--adv-lambda", type=float, help="λ of the adversarial embedding's closed form (RECE: 0.1)")
    p.add_argument("--rece-lambda", type=float, help="λ of each adversarial UCE edit (RECE: 0.1)")
    p.add_argument("--preserve-scale", type=float, help="weight of what those edits keep (RECE: 0.1)")
    p.add_argument("--val-prompts", help="the validation split of harmful prompts (default toy: the world's harmful "
                                         "training prompts; sd15: required, RECE's validation_inappropriate.csv)")
    p.add_argument("--val-n", type=int, help="validation prompts used, the first N (default sd15: all)")
    p.add_argument("--val-sampler", choices=("model", "lms"),
                   help="the validation images' sampler: the model's own, or RECE's LMS")
    p.add_argument("--sample-steps", type=int)
    p.add_argument("--guidance", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--device")
    return p


def build_main(args) -> None:
    B.one_process_base_model(args, "python -m systems.rece build")
    run_build(args)


COMMANDS = {"build": (build_parser, build_main)}

if __name__ == "__main__":
    U.run_commands(COMMANDS, __doc__)
