"""The registries (~75 lines): what stage 5 can draw from, measure and report, each entry a
"module:function" found when needed. A new model family, per-image metric or system report
is one line here; stage 5 itself names none of them.

What it is not: the code of any entry (each lives in its system's file).
"""
import importlib

from lib import utils

# How to draw images from each kind of model folder (model.json's "kind"): the function takes
# (ModelSpec, device, dtype, sampler steps) and returns (pipeline, extra call arguments).
LOADERS = {
    "pipeline": "lib.models:pipeline_sampler",         # a stock pipeline folder, or base + LoRA
    "sld": "systems.baselines:sld_sampler",       # Safe Latent Diffusion's recipe on the base model
    "filter": "systems.baselines:filter_sampler",    # the base model behind SD's safety checker
}

# Per-image scores beyond SC, PS and IP, in Table 5's order: column -> (the stage-5 flag naming
# its weights, which turns it on; the scorer's class, built as cls.from_args(args, device) and
# called as scorer(images, prompts) -> [N]). Each is averaged per prompt set into metrics.json.
EXTRA_SCORES = {
    "HPS": ("hps_model", "lib.quality_metrics:HPSv2"),
    "ImageReward": ("imagereward_model", "lib.quality_metrics:ImageReward"),
    "AES": ("aes_model", "lib.quality_metrics:Aesthetic"),
    "CLIPScore": ("clip_model", "lib.scorers:ClipScore"),
}

# Scores of a model's whole image set on a prompt set: column -> (flag, class built the same
# way, with covers(set, rows, benign) -> bool and measure(set, rows, {model: items}, DIR/eval)
# -> {model: value}). Shown in Appendix D's table.
SET_SCORES = {
    "FID": ("fid_reference", "lib.quality_metrics:Fid"),
}

# The report's sections by other systems, in the report's order: each function takes stage 5's
# Evaluation and returns a Section (its Markdown, its figures for DIR/eval/<name>.json, a table
# for the console) or None when its models are not in the run.
SECTIONS = (
    "systems.alignguard:section",      # AlignGuard: IP per category, its experts, its merges, its claims
    "systems.baselines:section",       # the paper's Table 2 comparison, and the attacks (Fig. 4B)
    "systems.psa_eval:section",        # PSA: safety per user
    "systems.dfm_study:section",       # Fig. 5 where descent rates can show (make dfm)
)


def resolve(ref: str):
    """"module:function" -> the function."""
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


def add_module_flags(parser) -> None:
    """Stage 5's flags that belong to a section or a scorer (which of PSA's users to evaluate,
    HPSv2's weights, ...): each such module's add_flags(parser), with its EVAL_PRESETS merged
    into stage 5's presets."""
    refs = [*SECTIONS, *(cls for _, cls in (*EXTRA_SCORES.values(), *SET_SCORES.values()))]
    for name in dict.fromkeys(ref.split(":")[0] for ref in refs):
        module = importlib.import_module(name)
        if hasattr(module, "add_flags"):
            module.add_flags(parser)
            for preset, values in module.EVAL_PRESETS.items():
                (utils.TINY.setdefault("eval", {}) if preset == "tiny" else utils.PRESETS[preset]["eval"]).update(values)


def write_sections(ev) -> list[dict]:
    """Each system of registry.SECTIONS whose models were evaluated writes DIR/eval/<name>.md
    and <name>.json; returns the sections written (name, title, console table)."""
    written = []
    for ref in SECTIONS:
        sec = resolve(ref)(ev)
        if sec is None:
            continue
        utils.atomic_write_text(ev.out / f"{sec['name']}.md", "\n".join([f"# {sec['title']}", "", *sec["lines"]]) + "\n")
        utils.atomic_write_json(ev.out / f"{sec['name']}.json", sec["metrics"])
        written.append(sec)
    return written
