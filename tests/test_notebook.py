"""The example notebook runs top to bottom, and docs/USAGE.md keeps up with the configs.

- ``run_scripts/dm4mi-conditional.ipynb`` is executed on CPU with nbclient in a ``python3``
  kernel of this interpreter (started from run_scripts/, as Jupyter would), and the PSNR
  line it prints must show the denoised slice above the noisy one.
- Every key of the shipped YAML configs (``run_scripts/configs/**/*.yaml``: the top level,
  and everything under ``model.params``, ``data.params``, ``trainer``, ``sampling``,
  ``logging``, ``evaluation``, list contents excluded) must appear in backticks in its
  section of docs/USAGE.md; and every key that the doc's key tables list must exist in the
  code that reads that section.
"""
from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "run_scripts" / "dm4mi-conditional.ipynb"
USAGE = ROOT / "docs" / "USAGE.md"
CONFIGS = sorted(p for p in (ROOT / "run_scripts" / "configs").rglob("*.yaml") if p.parent.name != "study")  # run configs
PSNR_LINE = re.compile(r"PSNR body: noisy ([-\d.]+) dB, denoised ([-\d.]+) dB")
VOLUME_LINE = re.compile(r"volume PSNR body: noisy ([-\d.]+) dB, denoised ([-\d.]+) dB")
#: config section -> the docs/USAGE.md heading ("## ...") that documents it
SECTIONS = {"top": "Config files: top level", "model": "`model` section", "data": "`data` section",
            "trainer": "`trainer` section", "sampling": "`sampling` section", "logging": "`logging` section",
            "evaluation": "`evaluation` section"}


# ----------------------------------------------------------------------------- the notebook
def _stream_text(nb) -> str:
    return "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                   for out in cell.get("outputs", []) if out.get("output_type") == "stream")


def test_notebook_is_saved_without_outputs():
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert nb.nbformat == 4
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)
    assert "pyproject.toml" in code[0].source and "sys.path" in code[0].source


def test_notebook_runs_and_denoises():
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # one extra cell, in memory only: which Python the kernel ran on
    nb.cells.append(nbformat.v4.new_code_cell('import sys\nprint("KERNEL_PREFIX", sys.prefix)'))
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()  # raises CellExecutionError naming the cell on any error

    errors = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
              if out.get("output_type") == "error"]
    assert errors == []
    text = _stream_text(nb)
    assert f"KERNEL_PREFIX {sys.prefix}" in text, "the notebook ran on another Python than this venv's"
    assert any("image/png" in out.get("data", {}) for cell in nb.cells if cell.cell_type == "code"
               for out in cell.get("outputs", [])), "the clean / noisy / denoised / std figure was not shown"

    found = PSNR_LINE.search(text)
    assert found, f"no 'PSNR body: noisy ... dB, denoised ... dB' line in the notebook output:\n{text}"
    noisy, denoised = float(found.group(1)), float(found.group(2))
    assert 19.0 < noisy < 21.0  # Gaussian sigma 0.1 on [0,1]: about -20 log10(0.1) = 20 dB
    assert denoised > noisy + 3.0, f"denoised {denoised} dB is not clearly above noisy {noisy} dB"

    found = VOLUME_LINE.search(text)
    assert found, f"no volume PSNR line in the notebook output:\n{text}"
    assert float(found.group(2)) > float(found.group(1)) + 3.0
    assert "t_star" in text and "mr_test_slab_denoised.nii.gz" in text  # denoise_volume's info was printed


# ----------------------------------------------------------------------------- the doc and the configs
def _doc_sections() -> dict[str, str]:
    """Text of each config section of docs/USAGE.md (from its '## ' heading to the next)."""
    text = USAGE.read_text()
    parts = re.split(r"^## (.+)$", text, flags=re.MULTILINE)
    by_heading = {parts[i].strip(): parts[i + 1] for i in range(1, len(parts) - 1, 2)}
    missing = [h for h in SECTIONS.values() if h not in by_heading]
    assert not missing, f"docs/USAGE.md lacks the heading(s) {missing}"
    return {section: by_heading[heading] for section, heading in SECTIONS.items()}


def _keys(node, prefix: str = ""):
    """Dotted paths of every mapping key in node, not descending into lists."""
    if isinstance(node, dict):
        for key, value in node.items():
            path = f"{prefix}{key}"
            yield path
            yield from _keys(value, path + ".")


def _config_keys() -> dict[str, set[tuple[str, str]]]:
    """section -> {(config file, dotted key)} of the shipped configs."""
    out = {section: set() for section in SECTIONS}
    for path in CONFIGS:
        cfg = yaml.safe_load(path.read_text()) or {}
        name = str(path.relative_to(ROOT))
        out["top"].update((name, key) for key in cfg)
        for section in ("model", "data"):
            out[section].update((name, key) for key in _keys((cfg.get(section) or {}).get("params") or {}))
        for section in ("trainer", "sampling", "logging", "evaluation"):
            out[section].update((name, key) for key in _keys(cfg.get(section) or {}))
    return out


def _documented(key: str, text: str) -> bool:
    """`key` (or a dotted `a.key`) in backticks."""
    return re.search(r"`(?:[\w.]+\.)?" + re.escape(key) + "`", text) is not None


def test_configs_are_found():
    assert len(CONFIGS) >= 6
    keys = _config_keys()
    assert ("run_scripts/configs/ddpm-cond/bundled_ct_mr.yaml", "unet_rosinality_config.params.channel") in keys["model"]
    assert ("run_scripts/configs/ddpm-cond/bundled_ct_mr.yaml", "split.gap") in keys["data"]
    assert not any(key.startswith("methods.") for _, key in keys["evaluation"])  # list contents left out


def test_every_config_key_is_in_usage_md():
    sections = _doc_sections()
    missing = sorted(f"{section}: {name}: {key}" for section, keys in _config_keys().items()
                     for name, key in keys if not _documented(key.split(".")[-1], sections[section]))
    assert missing == [], "config keys not documented in their section of docs/USAGE.md:\n" + "\n".join(missing)


def _parameters(*functions) -> set[str]:
    return {name for f in functions for name, p in inspect.signature(f).parameters.items()
            if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def _known_keys() -> dict[str, set[str]]:
    """section -> every key name the code reading that section accepts."""
    import lightning.pytorch as pl

    from diffusion_modules.diffusion_utils.augment import KEYS as AUGMENT_KEYS
    from diffusion_modules.diffusion_utils.datamodule import DenoisingDataModule
    from diffusion_modules.diffusion_utils.splits import DEFAULT_SPLIT
    from diffusion_modules.diffusion_utils.noise import NOISE_TYPES
    from diffusion_modules.unet_arch.unet_rosinality import UNet
    from models.ddpm_conditioned import ConditionDDPM
    from models.ddpm_st_diffusion import DDPM
    from models.supervised_unet import SupervisedUNet
    from orchestration.config_checks import EVALUATION, LOGGING, METHOD, TRAINER_SPEED
    from orchestration.evaluation_job import TEST_VOLUME_KEYS
    from utils.initialize_configs import RUN_SECTIONS

    return {
        "top": set(RUN_SECTIONS) | {"base"},
        "model": _parameters(DDPM.__init__, ConditionDDPM.__init__, SupervisedUNet.__init__, UNet.__init__),
        "data": (_parameters(DenoisingDataModule.__init__, *(cls.__init__ for cls in NOISE_TYPES.values()))
                 | {"type"} | set(DEFAULT_SPLIT) | set(AUGMENT_KEYS) | {"path", "modality", "name"}),
        "trainer": (_parameters(pl.Trainer.__init__) - {"logger", "callbacks", "default_root_dir"}) | set(TRAINER_SPEED),
        "sampling": _parameters(ConditionDDPM.denoise) - {"noisy", "generator"},
        "logging": set(LOGGING),
        "evaluation": set(EVALUATION) | set(METHOD) | set(TEST_VOLUME_KEYS),
    }


def _table_keys(text: str) -> set[str]:
    """The backticked names in the first column of the tables whose first header is 'key'."""
    keys, in_key_table = set(), False
    for line in text.splitlines():
        if not line.startswith("|"):
            in_key_table = False
            continue
        first = line.split("|")[1].strip()
        if first == "key":
            in_key_table = True
        elif in_key_table and not set(first) <= set("- "):
            keys.update(re.findall(r"`([^`]+)`", first))
    return keys


def test_every_documented_key_exists():
    sections, known = _doc_sections(), _known_keys()
    wrong = []
    for section, text in sections.items():
        listed = _table_keys(text)
        assert listed, f"no key table in the {section} section of docs/USAGE.md"
        wrong += [f"{section}: `{key}`" for key in sorted(listed)
                  if not set(key.split(".")) <= known[section]]
    assert wrong == [], "docs/USAGE.md documents keys that nothing reads:\n" + "\n".join(wrong)
