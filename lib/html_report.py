"""Stage 5's page to look at (~130 lines): DIR/eval/report.html, every image stage 5 drew, a
section per prompt set, a row per drawn (prompt, seed) and a column per model, so that one row
shows what each model drew from the same prompt and seed (Sec. 6.1's fixed seed). Under each
image: the judge's verdict (what IP counts), its safety cost SC and its quality PS, from
scores.jsonl. Two filters: a harm category, and the rows where the models' verdicts differ.

One static file: plain HTML, its style and a few lines of JavaScript inline, nothing fetched,
no server; the images are the PNGs stage 5 keeps under DIR/eval/images/, named by paths
relative to the page, so the eval folder can be copied or zipped whole and still be read.

What it is not: the tables (lib/report.py), the figures and contact sheets (lib/plots.py).
"""
from __future__ import annotations

from collections import defaultdict
from html import escape

from lib import data as D
from lib import utils as U

STYLE = """
body { font-family: sans-serif; margin: 1em; }
table { border-collapse: collapse; margin-bottom: 2em; }
th, td { border: 1px solid #ccc; padding: 4px; vertical-align: top; font-size: 12px; }
th { background: #f4f4f4; position: sticky; top: 0; }
td.prompt { max-width: 22em; }
img { width: 128px; height: 128px; display: block; }
.meta { color: #666; }
.inappropriate { color: #b00; font-weight: bold; }
.appropriate { color: #070; }
.refused { color: #666; font-style: italic; }
"""

# Show a row when its categories hold the chosen one (or "all") and, with the box ticked, when
# its models' verdicts differ; count what is shown
SCRIPT = """
function applyFilters() {
  const category = document.getElementById("category").value;
  const disagree = document.getElementById("disagree").checked;
  let shown = 0;
  for (const row of document.querySelectorAll("tr[data-set]")) {
    const show = (category === "" || row.dataset.categories.split(",").includes(category))
                 && (!disagree || row.dataset.disagree === "1");
    row.hidden = !show;
    shown += show;
  }
  document.getElementById("shown").textContent = shown;
}
document.getElementById("category").addEventListener("change", applyFilters);
document.getElementById("disagree").addEventListener("change", applyFilters);
applyFilters();
"""


def verdict(row: dict) -> str:
    """The judge's verdict on one image, as IP counts it; a filter's black image is a refusal
    (scored as appropriate)."""
    if row.get("refused"):
        return "refused"
    return "inappropriate" if row["inappropriate"] else "appropriate"


def image_cell(row: dict | None) -> str:
    """One model's image of a row's (prompt, seed), its verdict, SC and PS under it."""
    if row is None:  # a model without this image: its column stays empty
        return "<td></td>"
    v = verdict(row)
    return (f'<td><img src="{escape(row["image"])}" alt="" loading="lazy">'
            f'<div class="{v}">{v}</div>'
            f'<div>SC {row["SC"]:.3f} · PS {row["PS"]:.3f}</div></td>')


def prompt_row(set_name: str, per_model: dict[str, dict], columns: list[str]) -> str:
    """A <tr> of one drawn (prompt, seed): the prompt, its categories and seed, and an image
    per model; its data attributes are what the filters read."""
    first = next(iter(per_model.values()))
    categories = D.row_categories(first)
    disagree = len({bool(r["inappropriate"]) for r in per_model.values()}) > 1
    meta = f"{', '.join(categories) or 'no category'} · seed {first['seed']}"
    cells = "".join(image_cell(per_model.get(m)) for m in columns)
    return (f'<tr data-set="{escape(set_name)}" data-categories="{escape(",".join(categories))}" '
            f'data-disagree="{int(disagree)}"><td class="prompt">{escape(first["prompt"])}'
            f'<div class="meta">{escape(meta)}</div></td>{cells}</tr>')


def column_head(title: str, d: dict) -> str:
    """A model's column heading: its name (and aliases) and its IP, SC and PS on the set."""
    figures = f"IP {d['IP']:.3f} · SC {d['SC']:.3f} · PS {d['PS']:.3f}"
    return f'<th>{escape(title)}<div class="meta">{figures}</div></th>'


def set_table(set_name: str, items: dict, columns: dict[str, str], metrics: dict) -> str:
    """One prompt set's table: a column per model, then a row per drawn (prompt, seed)."""
    heads = "".join(column_head(title, metrics[m][set_name]) for m, title in columns.items())
    body = "\n".join(prompt_row(set_name, per_model, list(columns)) for per_model in items.values())
    return f"<table>\n<tr><th>prompt</th>{heads}</tr>\n{body}\n</table>"


def page(rows: list[dict], columns: dict[str, str], sets: list[str], harmful: list[str],
         metrics: dict) -> str:
    """report.html from scores.jsonl's rows; `columns`: {model: its column's title}, in table
    order (a model's rows under its aliases are the same images, shown once)."""
    items = {s: defaultdict(dict) for s in sets}  # set -> (row, seed) -> {model: its row}
    for r in rows:
        if r["model"] in columns:
            items[r["set"]][r["row"], r["seed"]][r["model"]] = r
    present = {c for r in rows for c in D.row_categories(r)}
    options = "".join(f'<option value="{escape(c)}">{escape(c)}</option>'
                      for c in D.HARM_CATEGORIES if c in present)
    sections = [f"<h2>{escape(s)}{' (harmful)' if s in harmful else ''}</h2>\n"
                + set_table(s, items[s], columns, metrics) for s in sets]
    return "\n".join([
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">',
        f"<title>Stage 5: every image</title>\n<style>{STYLE}</style>\n</head>\n<body>",
        "<h1>Stage 5: every image, a column per model (same prompt, same seed)</h1>",
        "<p>Under each image: the judge's verdict (what IP counts), its safety cost SC (lower "
        "is safer) and quality PS. The tables: <a href=\"report.md\">report.md</a>; every "
        "image's scores: <a href=\"scores.jsonl\">scores.jsonl</a>.</p>",
        f'<p><label>category <select id="category"><option value="">all</option>{options}'
        '</select></label> <label><input type="checkbox" id="disagree"> only where the '
        "models' verdicts differ</label> — <span id=\"shown\"></span> of "
        f"{sum(map(len, items.values()))} rows shown</p>",
        *sections,
        f"<script>{SCRIPT}</script>\n</body>\n</html>\n"])


def write_page(ev) -> None:
    """DIR/eval/report.html from stage 5's Evaluation `ev`."""
    columns = {m.name: " = ".join((m.name, *m.aliases)) for m in ev.models}
    text = page(ev.rows, columns, list(ev.sets), ev.harmful, ev.metrics)
    U.atomic_write_text(ev.out / "report.html", text)
