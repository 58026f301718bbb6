"""The layer rule of docs/ARCHITECTURE.md, checked on the source: imports run one way.

utils <- diffusion_modules <- models <- metrics <- evaluation <- orchestration <- run_scripts. A module
may import its own layer and the layers below it, never one above, not even inside a
function. Every source file stays under 400 lines.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("utils", "diffusion_modules", "models", "metrics", "evaluation", "orchestration", "run_scripts")
MAX_LINES = 400


def project_sources():
    return sorted(p for layer in LAYERS for p in (ROOT / layer).rglob("*.py"))


def imported_layers(path: Path):
    """(line, imported top-level package) of every project import in a file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if top in LAYERS:
                yield node.lineno, top


def upward_imports(paths):
    bad = []
    for path in paths:
        own = LAYERS.index(path.relative_to(ROOT).parts[0])
        for line, top in imported_layers(path):
            if LAYERS.index(top) > own:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {top}")
    return bad


def test_imports_run_one_way():
    assert len(project_sources()) > 20
    assert upward_imports(project_sources()) == []


def test_the_check_catches_an_upward_import(tmp_path, monkeypatch):
    fake = tmp_path / "utils" / "bad.py"
    fake.parent.mkdir()
    fake.write_text("def f():\n    from models.ddpm_conditioned import ConditionDDPM\n    import metrics.image_metrics\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    assert upward_imports([fake]) == ["utils/bad.py:2 imports models", "utils/bad.py:3 imports metrics"]


@pytest.mark.parametrize("path", project_sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_source_files_stay_small(path):
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(ROOT)} has {n} lines (limit {MAX_LINES})"
