"""The model card of an aligned model (~120 lines): DIR/NAME/model/README.md in the Hugging Face
Hub's layout, so the folder uploads as it is. A YAML header (base_model, license, library_name,
tags, datasets), then what the model is, its objective and settings (its config.json), the data
and its training figures (its metrics.json); stage 5 replaces the closing "Evaluation" section
with the model's rows of Tables 2 and 5 (lib/report.py). Written through huggingface_hub's
ModelCard, as diffusers' training scripts write theirs (save_model_card, examples/).

What it is not: the figures themselves (04_train_spo.py, 05_evaluate.py).
"""
from __future__ import annotations

from pathlib import Path

from lib import utils as U

CARD = "README.md"
EVALUATION = "## Evaluation"  # the card's last section: stage 5's, replaced on every run
TAG = "t2i-spo"  # the tag that marks a card this project wrote (stage 5 rewrites no other)
# the base's license passes on to what is trained from it: SD-1.5's CreativeML OpenRAIL-M,
# SDXL's OpenRAIL++; the toy's base is this project's own
LICENSES = {"sd15": "creativeml-openrail-m", "sdxl": "openrail++", "toy": "other"}
OBJECTIVES = {
    "spo": "T2I-SPO: Diffusion-DPO (Eqs. 5, 9) on image pairs ordered by the composite reward "
           "R = r − λ·C (Eqs. 6-8), quality r and safety cost C in one number",
    "safety": "the safety-only baseline: Diffusion-DPO on pairs ordered by R = −C, the ordering "
              "T2I-SPO's reward tends to as λ grows",
    "safe-wins": "Diffusion-DPO on pairs in which the safe image always wins (AlignGuard's order)"}
LOSS = ("    L = −E log σ(−β/2 · [(‖ε−ε_θ(x_w,t)‖² − ‖ε−ε_θ(x_l,t)‖²)\n"
        "                        − (‖ε−ε_ref(x_w,t)‖² − ‖ε−ε_ref(x_l,t)‖²)])")
DPOP = ("With `--dpop` λ_p > 0, λ_p·max(0, ‖ε−ε_θ(x_w,t)‖² − ‖ε−ε_ref(x_w,t)‖²) is added inside "
        "the bracket (DPO-Positive: a rise of the winner's error is charged).")
SETTINGS = ("objective", "lam", "beta", "dpop", "margin", "lr", "scale_lr", "warmup", "steps",
            "batch", "micro_batch", "weight_decay", "max_grad_norm", "lora_rank", "lora_alpha",
            "dfm", "dfm_tau", "dfm_k", "dfm_patience", "dfm_augmentations", "bf16", "seed",
            "preset")
FIGURES = {"n_pairs": "preference pairs", "pairs_dropped": "pairs dropped by --margin",
           "bad_rows_skipped": "bad rows skipped",
           "safe_side_wins_harmful_safe": "share of harmful–safe pairs the safe image wins",
           "final_loss": "loss, mean over the logged steps of the last tenth",
           "implicit_accuracy": "implicit accuracy, over the same steps",
           "dfm_flagged": "DFM: visits flagged (Eq. 10)", "dfm_pairs_flagged": "DFM: pairs flagged",
           "world_size": "processes", "seconds": "seconds"}


def base_model(model: str, run: Path) -> str:
    """The Hub id the model was given as; a local folder by its path inside the run (the toy's
    world/model) or, outside it, by its name."""
    path = Path(model)
    if not path.exists():
        return model
    inside = path.resolve().is_relative_to(run.resolve())
    return str(path.resolve().relative_to(run.resolve())) if inside else path.name


def datasets(run: Path) -> list[str]:
    """The Hub datasets the prompt stage read (--sources hf:ID), where it ran."""
    cfg = run / "prompts" / "config.json"
    sources = (U.read_json(cfg).get("sources") or []) if cfg.exists() else []
    return [s[3:] for s in sources if s.startswith("hf:") and not Path(s[3:]).exists()]


def table(header: str, rows: dict) -> str:
    """A two-column Markdown table: `header` and its value, a row per entry."""
    return U.markdown_table([header, "value"], [[k, v if isinstance(v, str) else U.fmt(v)]
                                                for k, v in rows.items()])


def write(out: Path) -> None:
    """out/model/README.md of stage 4's run folder `out`, from its config.json and metrics.json
    (nothing where the run saved no pipeline folder: PSA's adapter)."""
    from huggingface_hub import ModelCard, ModelCardData
    model = out / "model"
    if not (model / "model_index.json").exists():
        return
    cfg, metrics = U.read_json(out / "config.json"), U.read_json(out / "metrics.json")
    run, base = Path(cfg["run"]), base_model(cfg["model"], Path(cfg["run"]))
    xl = U.read_json(model / "model_index.json")["_class_name"] == "StableDiffusionXLPipeline"
    tags = ["text-to-image", "diffusers", "diffusers-training",
            "stable-diffusion-xl" if xl else "stable-diffusion", "safety", TAG]
    data = ModelCardData(base_model=base, license=LICENSES.get(cfg["preset"], "other"),
                         library_name="diffusers", datasets=datasets(run) or None,
                         tags=tags + (["lora"] if cfg["lora_rank"] else []))
    objective = OBJECTIVES.get(cfg["objective"], cfg["objective"])
    shown = lambda v: ", ".join(map(str, v)) if isinstance(v, list) else str(v)  # as given: 8e-08
    body = [
        f"# {cfg['name']}", "",
        f"`{base}` aligned for safety with {objective}: trained by stage 4 of the T2I-SPO "
        f"reproduction (`04_train_spo.py`, the paper's Sec. 4)"
        + (", with the Dynamic Focusing Mechanism (Sec. 4.3, Eqs. 10-11)." if cfg["dfm"] == "on"
           else "."), "",
        "## Use", "", "```python", "from diffusers import DiffusionPipeline",
        "pipe = DiffusionPipeline.from_pretrained(\"PATH_OR_REPO_ID\")",
        "image = pipe(\"a photo of a cat\").images[0]", "```", "",
        "## Objective and settings", "",
        "Each ‖·‖² is the mean over the latent's elements; x_w wins the pair under the reward:",
        "", LOSS, "", *([DPOP, ""] if cfg.get("dpop") else []),
        table("setting", {f"`--{k.replace('_', '-')}`": shown(cfg[k])
                          for k in SETTINGS if cfg.get(k) is not None}), "",
        "## Data", "",
        f"The preference pairs of `{cfg['data']}/hf_pairs.jsonl` in the run folder (stage 3's "
        f"LibraAlign-HF, or the data named by `--data`), relabelled by the objective's reward, "
        f"and the training figures (the run's metrics.json):", "",
        table("figure", {name: metrics[k] for k, name in FIGURES.items() if k in metrics}), "",
        EVALUATION, "",
        "Not evaluated yet: stage 5 (`05_evaluate.py`) writes this model's rows of the paper's "
        "tables here."]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body) + "\n")
    U.atomic_write_text(model / CARD, str(card))


def is_ours(folder: Path) -> bool:
    """Whether `folder` holds a card this project wrote (tagged TAG)."""
    from huggingface_hub import ModelCard
    card = Path(folder) / CARD
    return card.exists() and TAG in (ModelCard.load(card).data.tags or [])


def set_evaluation(folder: Path, text: str) -> None:
    """The card's Evaluation section replaced by `text` (written only if it changes)."""
    card = Path(folder) / CARD
    old = card.read_text(encoding="utf-8")
    new = old.split(f"\n{EVALUATION}\n")[0] + f"\n{EVALUATION}\n\n{text.strip()}\n"
    if new != old:
        U.atomic_write_text(card, new)
