"""The promises of the layout: each stage script within its line budget (450) and its lines,
and common.py's, within 100 characters; the three layers of imports (the stages and common.py
import lib/ alone; lib/ imports nothing above it; systems/ may import both); every file's size
as its docstring and the README's file map promise it."""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = sorted(ROOT.glob("0[0-5]_*.py"))
MODULES = sorted([*ROOT.glob("*.py"), *ROOT.glob("lib/*.py"), *ROOT.glob("systems/*.py")])


def imported(path: Path) -> set[str]:
    """The top-level names a file imports: `lib`, `systems`, `common`, third-party packages."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    return names | {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}


@pytest.mark.parametrize("script", [*STAGES, ROOT / "common.py"], ids=lambda p: p.name)
def test_stage_scripts_keep_their_budget(script):
    lines = script.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 450 or script.name == "common.py", f"{script.name}: {len(lines)} lines"
    long = [i for i, line in enumerate(lines, 1) if len(line) > 100]
    assert not long, f"{script.name}: lines over 100 characters: {long}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_form_three_layers(path):
    """Stages and common.py: no system; lib/: no stage, no common.py, no system."""
    names, where = imported(path), path.parent.name
    if where == "lib":
        assert not names & {"common", "systems"}, f"{path.name} imports {sorted(names & {'common', 'systems'})}"
    elif where != "systems":
        assert "systems" not in names, f"{path.name} imports a system"


def test_the_layer_test_catches_an_upward_import(tmp_path):
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "x.py").write_text("import common as C\nfrom systems import psa as P\n")
    assert imported(tmp_path / "lib" / "x.py") == {"common", "systems"}


def test_files_keep_the_size_they_promise():
    """A module's "~N lines" and the README's file map are within 10% of its length."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for path in MODULES:
        if path.name == "__init__.py":
            continue
        rel = str(path.relative_to(ROOT))
        text = path.read_text(encoding="utf-8")
        n = len(text.splitlines())
        head = "\n".join(text.splitlines()[:6])
        row = re.search(r"^\| ([^|]*`%s`[^|]*)\| ([^|]*)\|" % re.escape(rel), readme, re.M)
        assert row, f"README's file map has no row for {rel}"
        promised = [int(m) for m in re.findall(r"~(\d+) lines", head)]
        names, sizes = re.findall(r"`([^`]+)`", row.group(1)), re.findall(r"~(\d+)", row.group(2))
        row_n = int(sizes[names.index(rel)])  # systems/psa.py and systems/psa_eval.py share a row
        for claim in [*promised, row_n]:
            assert abs(claim - n) <= 0.1 * n, f"{rel}: promises ~{claim} lines, has {n}"
