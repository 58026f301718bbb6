"""Every third-party package the code imports is declared in pyproject.toml: the library
packages' imports as dependencies (``pywt``, imported by the noise-level estimate, once came
only through bm3d's own requirements and was missing on a GPU image), the scripts' as
dependencies or optional ones (diffusers: the benchmark's peer)."""
import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ("utils", "diffusion_modules", "models", "metrics", "evaluation", "orchestration")


def imported_roots(folders) -> dict:
    """{top-level module: first file importing it} of the non-standard, non-project imports
    (a script's sibling module, ``build_bundled_data`` next to the data builders, is ours)."""
    found = {}
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
                for name in names:
                    top = name.split(".")[0]
                    sibling = (path.parent / f"{top}.py").is_file()
                    if top not in sys.stdlib_module_names and top not in LIBRARY and not sibling:
                        found.setdefault(top, str(path.relative_to(ROOT)))
    return found


def declared(*groups) -> set:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = list(project["dependencies"]) if "main" in groups else []
    for group in groups:
        specs += project.get("optional-dependencies", {}).get(group, [])
    return {re.split(r"[<>=!~ \[;]", s, maxsplit=1)[0].lower().replace("_", "-") for s in specs}


def undeclared(imports: dict, names: set) -> list:
    dists = importlib.metadata.packages_distributions()
    missing = []
    for module, where in imports.items():
        owners = {d.lower().replace("_", "-") for d in dists.get(module, [module])}
        if not owners & names:
            missing.append(f"{module} ({where}; distribution {sorted(owners)})")
    return missing


def test_library_imports_are_dependencies():
    imports = imported_roots(LIBRARY)
    assert "pywt" in imports and "torch" in imports  # the walk sees the imports
    assert undeclared(imports, declared("main")) == []


def test_script_imports_are_declared():
    assert undeclared(imported_roots(["run_scripts"]), declared("main", "test")) == []


def test_the_check_finds_an_undeclared_import():
    assert undeclared({"pywt": "x.py"}, {"bm3d", "numpy"}) == ["pywt (x.py; distribution ['pywavelets'])"]
