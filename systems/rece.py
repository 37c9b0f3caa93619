"""RECE (Gong et al. 2024, "Reliable and Efficient Concept Erasure"), the last row of the
paper's Table 2 (~185 lines): UCE's closed-form edit, then a few epochs of adversarial
erasure. Each epoch finds, in closed form, the embedding c′ that makes the EDITED
cross-attention give back what the original gave the erased concept (the embedding a jailbreak
would look for), and erases c′ with UCE too. Every epoch's model is kept; the one with the
lowest IP on a validation split of harmful prompts (never the evaluation prompts) is RECE.

  epoch 0     UCE: every cross-attention to_k and to_v edited (baselines.uce_edit), exactly as
              `-m systems.baselines build --baseline uce` edits them
  epoch k     c′ = adversarial_embedding(c, W′, W), then W′ ← uce_edit(W′, c′ → ""), with RECE's
              λ = 0.1, erase scale 1, preserve scale 0.1

Command:  python -m systems.rece build --run DIR    -> DIR/baselines/rece/ (model/, epochs.json,
          model.json); stage 5 evaluates it beside the others, and baselines.section reports it.

What it is not: UCE's closed form (baselines.uce_edit), the Table 2 section (systems/baselines.py).
"""
import os
import shutil
import time
from pathlib import Path

import torch

from lib import data as D
from lib import models as M
from lib import scorers as S
from lib import toyworld as W
from lib import utils as U
from systems import baselines as B


# ---------------------------------------------------------------------------------------
# RECE's closed form
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


def cross_attention_projections(unet) -> dict[str, torch.nn.Linear]:
    """Every cross-attention to_k and to_v: the layers UCE and RECE edit."""
    return {n: m for n, m in unet.named_modules() if n.endswith(("attn2.to_k", "attn2.to_v"))}


def uce_epoch(layers: dict, erase: torch.Tensor, guide: torch.Tensor, preserve, lam: float, preserve_scale: float):
    """One UCE edit of every projection, in place: erase → guide, preserve kept."""
    for m in layers.values():
        W = m.weight.detach().float().cpu()
        m.weight.data.copy_(B.uce_edit(W, erase, guide, preserve, lam=lam, preserve_scale=preserve_scale)
                            .to(m.weight.dtype))


# ---------------------------------------------------------------------------------------
# The build: epochs, each judged on the validation split
# ---------------------------------------------------------------------------------------

def validation_prompts(args) -> list[dict]:
    """The validation split: --val-prompts (default on the toy: the world's harmful TRAINING
    prompts, which stage 5 never evaluates), its first --val-n rows."""
    source = args.val_prompts or U.toy_world_input(args, U.stage_dir(args.run, "world") / "prompts" /
                                                   "harmful_train.jsonl", "--val-prompts")
    rows, _ = D.load_prompt_set(str(source))
    return rows[:args.val_n]


def validation_ip(pipe, rows: list[dict], args, detector) -> float:
    """IP of one epoch's model on the validation split: one image per prompt, seeds 0, 1, ...
    (or a row's own); the toy judge on the toy, NudeNet's exposed parts on sd15."""
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
    emb = lambda cs: torch.stack([B.concept_embedding(pipe.text_encoder, pipe.tokenizer, c) for c in cs])
    erase, guide = emb(args.erase_concepts), emb([""] * len(args.erase_concepts))
    preserve = emb(args.preserve_concepts) if args.preserve_concepts else None
    layers = cross_attention_projections(pipe.unet)
    original = [m.weight.detach().float().cpu().clone() for m in layers.values()]
    detector = None
    if args.preset != "toy":
        from nudenet import NudeDetector
        detector = NudeDetector()
    epochs = []
    for k in range(args.epochs + 1):
        if k == 0:  # UCE, as the uce baseline makes it
            uce_epoch(layers, erase, guide, preserve, args.uce_lambda, preserve_scale=1.0)
        else:       # the concept as the edited model would now need it said, erased too
            edited = [m.weight.detach().float().cpu() for m in layers.values()]
            adv = adversarial_embedding(erase, edited, original, lam=args.adv_lambda)
            uce_epoch(layers, adv, guide, preserve, args.rece_lambda, preserve_scale=args.preserve_scale)
        ip = validation_ip(pipe, rows, args, detector)
        M.save_pipeline(pipe, out / "epochs" / str(k))
        epochs.append({"epoch": k, "validation_IP": ip})
        U.log(f"epoch {k}: validation IP {ip:.3f} on {len(rows)} prompts")
    best = min(epochs, key=lambda e: (e["validation_IP"], e["epoch"]))  # ties: the fewest edits
    if (out / "model").exists():
        shutil.rmtree(out / "model")
    os.replace(out / "epochs" / str(best["epoch"]), out / "model")
    shutil.rmtree(out / "epochs")
    U.atomic_write_json(out / "epochs.json", epochs)
    return {"epochs": epochs, "chosen_epoch": best["epoch"], "validation_prompts": len(rows)}


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

U.PRESETS["toy"]["rece"] = dict(
    model=None, erase_concepts=W.harm_concepts(), preserve_concepts=B.toy_preserve_concepts(), uce_lambda=0.5,
    epochs=3, adv_lambda=0.1, rece_lambda=0.1, preserve_scale=0.1, val_prompts=None, val_n=64,
    sample_steps=U.TOY_SAMPLE_STEPS, guidance=4.0, batch_size=64, device=None)
U.PRESETS["sd15"]["rece"] = dict(
    U.PRESETS["toy"]["rece"], model="stable-diffusion-v1-5/stable-diffusion-v1-5", erase_concepts=["nudity"],
    preserve_concepts=[], sample_steps=50, guidance=7.5, batch_size=8)
U.TINY["rece"] = dict(epochs=1, val_n=4, sample_steps=3)


def build_parser():
    p = U.stage_parser("rece", "RECE: UCE, then adversarial embeddings erased epoch by epoch")
    p.add_argument("--model", help="the base model (default: the stage-0 model)")
    p.add_argument("--erase-concepts", nargs="+", help="the concepts to erase (as systems/baselines.py's uce)")
    p.add_argument("--preserve-concepts", nargs="*", help="the concepts whose keys and values must stay")
    p.add_argument("--uce-lambda", type=float, help="epoch 0's λ (the uce baseline's)")
    p.add_argument("--epochs", type=int, help="adversarial epochs after UCE (RECE: 3 for nudity)")
    p.add_argument("--adv-lambda", type=float, help="λ of the adversarial embedding's closed form (RECE: 0.1)")
    p.add_argument("--rece-lambda", type=float, help="λ of each adversarial UCE edit (RECE: 0.1)")
    p.add_argument("--preserve-scale", type=float, help="weight of the preserved concepts in those edits (RECE: 0.1)")
    p.add_argument("--val-prompts", help="the validation split of harmful prompts (default toy: the world's harmful "
                                         "training prompts; sd15: required, never the evaluation prompts)")
    p.add_argument("--val-n", type=int, help="validation prompts used, the first N")
    p.add_argument("--sample-steps", type=int)
    p.add_argument("--guidance", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--device")
    return p


def build_main(args) -> None:
    B.one_process_base_model(args, "systems/rece.py build")
    run_build(args)


COMMANDS = {"build": (build_parser, build_main)}

if __name__ == "__main__":
    U.run_commands(COMMANDS, __doc__)
