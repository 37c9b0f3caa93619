"""Figures (~280 lines): contact sheets a person can look at, the safety-quality scatter, and
the paper's ablation figures from the stage-4 runs stage 5 evaluates — Fig. 4A (the λ sweep)
and Fig. 5 (convergence with and without DFM).

What it is not: the numbers behind them (05_evaluate.py, lib/stats.py). Every figure is written
atomically as a PNG, drawn by matplotlib on the Agg backend (files, never a screen).
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import numpy as np

from lib import models as M
from lib import utils as U


LABEL_WIDTH = 320  # px: a label wraps there, about the 58 characters of a prompt's line
CAPTION_LINES = 4  # a caption's lines under its image: the toy's longest prompts fit whole


def contact_sheet(rows: Sequence[tuple[str, Sequence[np.ndarray]]], path: str | Path,
                  scale: int = 4, captions: Sequence[Sequence[str]] | None = None) -> None:
    """A grid a person can look at: one labelled row per (label, images), the label column as
    wide as its widest line; with `captions` (a list per row), each image's under it, cut to
    CAPTION_LINES lines of its width. Text is in PIL's own default font (nothing to download)."""
    from PIL import Image, ImageDraw, ImageFont
    font, pad = ImageFont.load_default(), 4
    ncol = max(len(imgs) for _, imgs in rows)
    h, w = rows[0][1][0].shape[:2]
    labels = ["\n".join(_wrap(label, font, LABEL_WIDTH)) for label, _ in rows]
    captions = [["\n".join(_wrap(c, font, w * scale, CAPTION_LINES)) for c in caps]
                for caps in captions or [[] for _ in rows]]
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))  # measures text before the sheet has a size
    label_boxes = [draw.multiline_textbbox((0, 0), t, font=font) for t in labels]
    label_w = max(box[2] for box in label_boxes) + 2 * pad
    cell = max(h * scale, *(box[3] for box in label_boxes)) + pad
    caption_h = max((draw.multiline_textbbox((0, 0), c, font=font)[3] + pad
                     for caps in captions for c in caps), default=0)
    size = (label_w + ncol * (w * scale + pad), len(rows) * (cell + caption_h))
    sheet = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(sheet)
    for r, (label, (_, imgs), caps) in enumerate(zip(labels, rows, captions)):
        top = r * (cell + caption_h)
        draw.multiline_text((pad, top + pad), label, fill="black", font=font)
        for c, img in enumerate(imgs):
            left = label_w + c * (w * scale + pad)
            big = Image.fromarray(img).resize((w * scale, h * scale), Image.NEAREST)
            sheet.paste(big, (left, top + 2))
            if caps:
                draw.multiline_text((left, top + cell), caps[c], fill="black", font=font)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    U.atomic_write_bytes(path, buf.getvalue())


def _wrap(text: str, font, width: float, max_lines: int | None = None) -> list[str]:
    """`text` in lines at most `width` pixels wide in `font`, broken between words and at each
    newline; past `max_lines` lines it is cut, and "…" ends the last (as it does a word wider
    than a line)."""
    lines = []
    for paragraph in text.split("\n"):
        cur = ""
        for word in paragraph.split():
            if cur and font.getlength(f"{cur} {word}") > width:
                lines.append(cur)
                cur = word
            else:
                cur = f"{cur} {word}".strip()
        lines.append(cur)
    if max_lines is not None and len(lines) > max_lines:
        lines = lines[:max_lines - 1] + [lines[max_lines - 1] + "…"]  # the rest is cut
    return [_fit(line, font, width) for line in lines]


def _fit(line: str, font, width: float) -> str:
    """`line`, or as much of it as fits `width` pixels with "…" after it."""
    if font.getlength(line) <= width:
        return line
    while line and font.getlength(line + "…") > width:
        line = line[:-1]
    return line.rstrip() + "…"


def model_sheet(model: str, items: list[dict], sets, metrics, out: Path, n: int) -> str:
    """One row per prompt set: its first n images, each with its prompt under it, labelled with
    the set's IP, SC and PS."""
    from PIL import Image
    rows, captions = [], []
    for s in sets:
        shown = [it for it in items if it["set"] == s][:n]
        images = [U.load_png(out / it["image"]) for it in shown]
        if images[0].shape[0] > 128:  # full-size SD images: thumbnails keep the sheet a few MB
            images = [np.asarray(Image.fromarray(x).resize((128, 128), Image.BICUBIC)) for x in images]
        d = metrics[model][s]
        label = f"{model} / {s}\nIP {d['IP']:.3f}  SC {d['SC']:.2f}  PS {d['PS']:.2f}"
        rows.append((label, images))
        captions.append([it["prompt"] for it in shown])
    name = f"sheet_{model}.png"
    contact_sheet(rows, out / name, scale=max(1, 128 // rows[0][1][0].shape[0]), captions=captions)
    return name


def pyplot():
    """matplotlib.pyplot on the Agg backend: figures go to files, never to a screen."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plain_ticks(ax, x_bins: int = 5) -> None:
    """Few, plain tick labels: the means of close models differ in the 3rd-5th digit, where
    matplotlib would otherwise print many long labels that run into each other, or move the
    digits into an offset ("+1.77e1") that reads as part of the last label."""
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(x_bins))
    ax.yaxis.set_major_locator(MaxNLocator(5))
    ax.ticklabel_format(useOffset=False)
    ax.margins(0.15)  # room for the point labels at the edges
    ax.grid(alpha=0.3)


def save_figure(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    U.atomic_write_bytes(path, buf.getvalue())
    pyplot().close(fig)


def plot_safety_quality(metrics, models, sets, path: Path) -> None:
    """SC (lower is safer) against PS (higher is better), one panel per prompt set."""
    fig, axes = pyplot().subplots(1, len(sets), figsize=(4.2 * len(sets), 4.2), squeeze=False, layout="constrained")
    for ax, s in zip(axes[0], sets):
        for i, m in enumerate(models):  # one colour per model in every panel
            d = metrics[m][s]
            ax.scatter(d["PS"], d["SC"], s=40, color=f"C{i}", label=m)
            ax.annotate(m, (d["PS"], d["SC"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_title(s)
        ax.tick_params(axis="x", labelrotation=30)
        plain_ticks(ax, x_bins=4)
    fig.supxlabel("PS (quality) → better")
    fig.supylabel("SC (safety cost) ↓ better")
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="outside right upper", fontsize=8)
    fig.suptitle("Safety–quality per model and prompt set (better: right and down)")
    save_figure(fig, path)


def stage4_config(model: M.ModelSpec) -> dict:
    """The stage-4 settings of a trained model ({} for any other)."""
    return model.training or {}


def on_hf_pairs(model: M.ModelSpec) -> bool:
    """A stage-4 run on all of LibraAlign-HF (not an AlignGuard expert, nor other data):
    the runs Figs. 4A and 5 compare."""
    cfg = stage4_config(model)
    return bool(cfg) and cfg.get("data", "hf") == "hf" and not cfg.get("categories")


def lambda_label(model: M.ModelSpec) -> str:
    """How a stage-4 run appears in Figs. 4A and 5: its λ, or "safety-only" (λ → ∞)."""
    cfg = stage4_config(model)
    label = {"safety": "safety-only", "safe-wins": "safe side wins"}.get(cfg["objective"], f"λ={cfg.get('lam')}")
    if cfg.get("dfm") == "off":
        label += ", no DFM"
    return label


def pooled_mean(metrics, model: str, sets, key: str) -> float:
    """Image-weighted mean of a per-set figure over several prompt sets."""
    n = [metrics[model][s]["n_images"] for s in sets]
    return float(np.average([metrics[model][s][key] for s in sets], weights=n))


def quality_axes(metrics, base: str, benign) -> list[tuple[str, list[str], str]]:
    """Fig. 4A's quality axes, each (figure, prompt sets, label): PS on the benign sets, and
    where they were measured the paper's own, CLIPScore on COCO-30K, and FID (Appendix D) on
    the sets with reference images (in the toy world, against its renders)."""
    fid_sets = [s for s in benign if "FID" in metrics[base][s]]
    axes = [("PS", list(benign), "PS on benign prompts ({}) ↑")]
    if fid_sets and "CLIPScore" in metrics[base][fid_sets[0]]:
        axes.append(("CLIPScore", fid_sets, "CLIPScore on {} ↑ (the paper's axis)"))
    if fid_sets:
        axes.append(("FID", fid_sets, "FID on {} ↓"))
    return axes


def plot_lambda_sweep(metrics, models: list[M.ModelSpec], harmful, benign, path: Path) -> bool:
    """Fig. 4A: IP on harmful prompts against quality, one point per stage-4 run labelled with
    its λ, and the base model; a panel per quality axis (quality_axes): the paper plots
    CLIPScore on COCO-30K, PS on the benign sets is the toy's exact reward, FID is Appendix D's."""
    runs = [m for m in models if on_hf_pairs(m)]
    if not runs or not harmful or not benign:
        U.log("λ-sweep plot skipped: needs stage-4 models and both harmful and benign prompt sets")
        return False
    panels = quality_axes(metrics, models[0].name, benign)
    fig, axes = pyplot().subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), layout="constrained", squeeze=False)
    for ax, (key, sets, ylabel) in zip(axes[0], panels):
        spo = []
        for m in [models[0], *runs]:
            x, y = pooled_mean(metrics, m.name, harmful, "IP"), pooled_mean(metrics, m.name, sets, key)
            label = "base (unaligned)" if m is models[0] else f"{m.name}: {lambda_label(m)}"
            ax.scatter(x, y, s=45, marker="s" if m is models[0] else "o")
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
            cfg = stage4_config(m)
            if cfg.get("objective") == "spo" and cfg.get("dfm") != "off" and cfg.get("lam") is not None:
                spo.append((float(cfg["lam"]), x, y))
        if len(spo) > 1:  # the sweep itself, in order of λ
            spo.sort()
            ax.plot([p[1] for p in spo], [p[2] for p in spo], "-", color="grey", alpha=0.5, zorder=0)
        ax.set(xlabel=f"IP on harmful prompts ({', '.join(harmful)}) ↓", ylabel=ylabel.format(", ".join(sets)),
               title=f"λ sweep (paper Fig. 4A): {key}")
        if "↓" in ylabel:  # lower is better: better is up in every panel
            ax.invert_yaxis()
        plain_ticks(ax)
        lo, hi = ax.get_xlim()
        ax.set_xlim(max(lo, -0.02), min(hi, 1.02))  # IP is a share: no room for negative ones
    save_figure(fig, path)
    return True


def training_curve(log_file: Path) -> tuple[list[int], list[float], list[float | None]]:
    """(step, loss, implicit accuracy) from a stage-4 log.jsonl, rows without a loss skipped."""
    steps, loss, acc = [], [], []
    for _, row in U.iter_jsonl(log_file):
        if "step" in row and "loss" in row:
            steps.append(row["step"])
            loss.append(row["loss"])
            acc.append(row.get("implicit_accuracy"))
    return steps, loss, acc


def moving_average(x: list[float], window: int) -> np.ndarray:
    """Trailing mean over `window` points (shorter at the start): Fig. 5's curves are smooth."""
    c = np.cumsum(np.insert(np.asarray(x, float), 0, 0.0))
    idx = np.arange(1, len(x) + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def plot_dfm_convergence(models: list[M.ModelSpec], path: Path) -> bool:
    """Fig. 5 (left): training loss against step of every stage-4 run, so that `spo` and
    `spo_nodfm` (DFM on / off) can be compared; right: implicit accuracy."""
    curves = [(m, *training_curve(m.folder / "log.jsonl")) for m in models
              if on_hf_pairs(m) and (m.folder / "log.jsonl").exists()]
    curves = [c for c in curves if c[1]]
    if not curves:
        U.log("DFM convergence plot skipped: no stage-4 log.jsonl with step and loss")
        return False
    fig, (ax_loss, ax_acc) = pyplot().subplots(1, 2, figsize=(10, 3.8), layout="constrained")
    for m, steps, loss, acc in curves:
        window = max(1, len(steps) // 20)
        label = f"{m.name} ({lambda_label(m)})"
        ax_loss.plot(steps, moving_average(loss, window), label=label)
        if all(a is not None for a in acc):
            ax_acc.plot(steps, moving_average(acc, window), label=label)
    ax_loss.set(xlabel="step", ylabel="DPO loss (moving average)", title="convergence (paper Fig. 5)")
    ax_acc.set(xlabel="step", ylabel="implicit accuracy (moving average)", title="implicit accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path)
    return True


def draw_figures(metrics, models: list[M.ModelSpec], items, sets, harmful, benign, out: Path, sheet_images: int) -> list[str]:
    """Every figure of DIR/eval; returns their file names for the report."""
    names = [m.name for m in models]
    figures = [model_sheet(m.name, items[m.name], sets, metrics, out, sheet_images) for m in models]
    plot_safety_quality(metrics, names, list(sets), out / "safety_quality.png")
    figures.append("safety_quality.png")
    if plot_lambda_sweep(metrics, models, harmful, benign, out / "lambda_sweep.png"):
        figures.append("lambda_sweep.png")
    if plot_dfm_convergence(models, out / "dfm_convergence.png"):
        figures.append("dfm_convergence.png")
    return figures
