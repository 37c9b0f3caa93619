"""Stage 5's report (~200 lines): the paper's tables as Markdown — Table 2 (harmful prompts),
Table 3 (NudeNet's exposed parts), Table 5 (benign prompts), Appendix C (IP per harm category),
Appendix D (image quality) — and DIR/eval/report.md, which gathers them with the settings,
the bootstrap intervals, the spread over training seeds, the figures and the other systems'
sections; DIR/eval/report.html, every image under its scores (lib/html_report.py); each
stage-4 model's rows in its model card (lib/model_card.py); and DIR/eval/config.json.

What it is not: the numbers in the tables (05_evaluate.py; the intervals: lib/stats.py), the
figures (lib/plots.py), the sections themselves (registry.SECTIONS).
"""
from __future__ import annotations

from pathlib import Path

from lib import html_report
from lib import model_card
from lib import registry as R
from lib import scorers as S
from lib import stats
from lib import utils as U

# ---------------------------------------------------------------------------------------
# 1. The paper's tables: a row per model, columns per prompt set, each arrow pointing to
#    the better value
# ---------------------------------------------------------------------------------------

def metric_table(metrics, models, sets, keys, labels=None) -> str:
    """The paper's kind of table: a row per model; per prompt set, a column per (figure, arrow),
    headed by the figure's name or its entry in `labels`."""
    labels = labels or {}
    header = ["model"] + [f"{s} {labels.get(k, k)}{arrow}" for s in sets for k, arrow in keys]
    rows = [[m] + [metrics[m][s][k] for s in sets for k, _ in keys] for m in models]
    return U.markdown_table(header, rows)


def table2(metrics, models, harmful) -> str:
    """Table 2: harmful sets; per set IP↓ SC↓ PS↑ UAS↑."""
    keys = [("IP", "↓"), ("SC", "↓"), ("PS", "↑"), ("UAS", "↑")]
    return metric_table(metrics, models, harmful, keys)


def table3(metrics, models, harmful) -> str:
    """Table 3: NudeNet's exposed-part counts per harmful set, and their total."""
    parts = [*S.NUDENET_PARTS, "total"]
    header = ["model"] + [f"{s} {p}↓" for s in harmful for p in parts]
    rows = [[m] + [metrics[m][s]["NudeNet"][p] for s in harmful for p in parts] for m in models]
    return U.markdown_table(header, rows)


def table5(metrics, models, benign, labels=None) -> str:
    """Table 5: benign sets, where R&A-2 asks whether safety cost the model its general
    capabilities; PS↑, each of HPS, ImageReward, AES, CLIPScore↑ that was measured, and IP↓
    (an aligned model should not flag benign prompts more than the base does). `labels`:
    headers by column, as score_labels gives them."""
    extra = [(col, "↑") for col in R.EXTRA_SCORES if col in metrics[models[0]][benign[0]]]
    return metric_table(metrics, models, benign, [("PS", "↑"), *extra, ("IP", "↓")], labels)


def score_labels(scorers) -> dict[str, str]:
    """Table 5's headers that say more than the column's name: a scorer's `label` (HPS names
    its version and scale, "HPSv2.1 × 100")."""
    return {col: s.label for col, s in scorers.extra.items() if hasattr(s, "label")}


def appendix_d(metrics, models, sets) -> str:
    """Appendix D: image quality on the sets with FID's reference images (COCO-30K; the toy's
    benign sets): CLIPScore↑ where it was measured, and FID↓."""
    measured = metrics[models[0]][sets[0]]
    keys = [(k, arrow) for k, arrow in (("CLIPScore", "↑"), ("FID", "↓")) if k in measured]
    return metric_table(metrics, models, sets, keys)


def category_table(metrics, models, harmful_set: str, categories) -> str:
    """Appendix C: IP per harm category on one harmful set ("—": no prompt of that category)."""
    rows = []
    for m in models:
        ip = metrics[m][harmful_set]["IP_by_category"]
        rows.append([m] + [ip[c] if ip[c] is not None else "—" for c in categories])
    return U.markdown_table(["model"] + [f"{c} IP↓" for c in categories], rows)


# ---------------------------------------------------------------------------------------
# 2. DIR/eval/report.md and config.json
# ---------------------------------------------------------------------------------------

def section(title: str, *paragraphs: str) -> list[str]:
    """The lines of a "## title" section of report.md, a blank line before each paragraph."""
    lines = ["", f"## {title}"]
    for paragraph in paragraphs:
        lines += ["", paragraph]
    return lines


def settings(ev, scm_path: Path) -> list[str]:
    """The report's opening: what was drawn from which models and prompts, and what each
    column of Table 2 means in this run."""
    args = ev.args
    if args.ua_center:
        centre = (f"fixed at μ_PS = {args.ua_center[0]:g}, μ_SC = {args.ua_center[1]:g} "
                  "(--ua-center)")
    else:
        centre = ("the base model's mean PS and SC on the same prompt set, so the base scores 0.5 "
                  "by construction")
    if args.quality == "pickscore":
        quality = "PickScore"
    else:
        quality = "the toy quality reward, on a PickScore-like 15-25 scale"
    models = [f"- `{m.name}`: {m.path}" + (f" + LoRA {m.lora}" if m.lora else "")
              for m in ev.models]
    sets = [f"`{s}` ({len(rows)} prompts{', harmful' if s in ev.harmful else ''})"
            for s, rows in ev.sets.items()]
    return [
        "# Stage 5 — evaluation (paper Sec. 5 and Sec. 6.2)", "",
        f"Preset `{args.preset}`; {args.seeds_per_prompt} image(s) per prompt; "
        f"{args.sample_steps} sampling steps; guidance {args.guidance:g} unless a prompt row "
        f"gives its own; seed {args.seed}.", "",
        "Models:", *models, "",
        "Prompt sets: " + ", ".join(sets), "",
        f"- **IP**: share of images judged inappropriate — {ev.scorers.ip_definition()}.",
        f"- **SC**: mean Safety Cost Model cost ({scm_path}); lower is safer.",
        f"- **PS**: mean quality reward ({quality}).",
        f"- **UAS**: Eq. 12 on the row's mean PS and SC, centres {centre}."]


def how_sure(ev) -> list[str]:
    """The paired bootstrap intervals of the claims, and the spread over training seeds."""
    lines = []
    if ev.metrics["intervals"]:
        lines += section(
            f"How sure: paired bootstrap 95% intervals ({ev.args.bootstrap} resamples of "
            "prompts, and of images within a prompt)",
            "\"holds\": the first model is better with the whole interval on that side; "
            "\"fails\": worse; \"not separable\": the interval reaches 0.",
            stats.interval_table(ev.metrics["intervals"]))
    if ev.metrics["seeds"]:
        lines += section("Training seeds: the same data, other seeds of stage 4",
                         stats.seed_table(ev.metrics["seeds"]))
    return lines


def write_report(ev, scm_path: Path, figures: list[str], sections: list[dict]) -> str:
    """report.md and report.html, from stage 5's Evaluation `ev`; returns the tables for the
    console (Tables 2 and 5, Appendix D's, then the sections')."""
    metrics, names = ev.metrics, ev.names
    lines, console = settings(ev, scm_path), []
    if ev.harmful:
        console.append(ev.table2(names, ev.harmful))
        lines += section("Harmful prompts (paper Table 2)", console[-1])
        lines += section("NudeNet exposed parts on harmful prompts (paper Table 3; images with the "
                         f"part, score ≥ {ev.args.nudenet_threshold:g})",
                         table3(metrics, names, ev.harmful))
        for h in (h for h in ev.harmful if "IP_by_category" in metrics["base"][h]):
            lines += section(f"IP per harm category on `{h}` (paper Appendix C)",
                             ev.category_table(names, h))
    if ev.benign:
        console.append(ev.table5(names, ev.benign))
        lines += section("Benign prompts (paper Table 5)", console[-1])
    fid_sets = [s for s in ev.sets if "FID" in metrics["base"][s]]
    if fid_sets:
        console.append(appendix_d(metrics, names, fid_sets))
        lines += section("Image quality (paper Appendix D)", ev.scorers.set_definitions(fid_sets),
                         console[-1])
    lines += how_sure(ev)
    if sections:
        links = [f"- [{s['title']}]({s['name']}.md)" for s in sections]
        lines += section("Other systems", "\n".join(links))
        console += [s["console"] for s in sections if s.get("console")]
    lines += section("Figures", "\n".join(f"- ![{f}]({f})" for f in figures),
                     "Every image under its prompt and scores, a column per model: "
                     "[report.html](report.html); per-image scores: `scores.jsonl`; every "
                     "number above: `metrics.json`.")
    U.atomic_write_text(ev.out / "report.md", "\n".join(lines) + "\n")
    html_report.write_page(ev)
    write_model_cards(ev)
    return "\n\n".join(console)


def write_model_cards(ev) -> None:
    """Each model card stage 4 wrote (model/README.md) gets its model's rows of Tables 2 and 5
    beside the base model's, in place of its last Evaluation section (a LoRA drawn on top of a
    folder is another model than the folder's card describes)."""
    base, args = ev.models[0].name, ev.args
    for m in (m for m in ev.models[1:] if not m.lora and model_card.is_ours(m.path)):
        tables = ([f"Harmful prompts (Table 2):\n\n{ev.table2([base, m.name], ev.harmful)}"]
                  if ev.harmful else [])
        tables += ([f"Benign prompts (Table 5):\n\n{ev.table5([base, m.name], ev.benign)}"]
                   if ev.benign else [])
        model_card.set_evaluation(m.path, "\n\n".join([
            f"Stage 5 (`05_evaluate.py`, preset `{args.preset}`): {args.seeds_per_prompt} image(s) "
            f"per prompt, {args.sample_steps} sampling steps, beside the base model. IP: share "
            "judged inappropriate; SC: mean safety cost; PS: mean quality; UAS: Eq. 12. Every "
            "image: the run folder's `eval/report.html`; every table: `eval/report.md`.",
            *tables]))


def write_config(args, out: Path, models, sets: dict, harmful: list[str], dtype,
                 processes: int) -> None:
    """config.json: the settings, and what they resolved to. check=False: the image cache is
    keyed by model fingerprint, prompt, seed and sampler, so a re-run with other models or
    settings adds to it and never mixes results."""
    resolved = {m.name: [str(m.path), m.lora and str(m.lora)] for m in models}
    U.save_config(args, out, check=False, resolved_models=resolved,
                  resolved_prompt_sets={s: len(rows) for s, rows in sets.items()},
                  resolved_harmful_sets=harmful, sample_dtype=str(dtype), processes=processes)
