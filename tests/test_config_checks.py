"""Every key of a run config is checked before anything is written: misspelt keys name the
close matches, wrong types name the key and the type."""
import importlib.util
from pathlib import Path

import pytest

from orchestration.config_checks import check_run_config
from utils.initialize_configs import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "run_scripts" / "configs" / "ddpm-cond" / "bundled_ct_mr.yaml"


@pytest.mark.parametrize("path", sorted(p for p in (ROOT / "run_scripts" / "configs").rglob("*.yaml") if p.parent.name != "study") + sorted((ROOT / "pretrained").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_configs_pass(path):
    check_run_config(load_config(path))


@pytest.mark.parametrize("override, match", [
    ("logging.loger=csv", r"logging\.loger: unknown key; did you mean 'logger'"),
    ("evaluation.enabeld=false", r"evaluation\.enabeld: unknown key; did you mean 'enabled'"),
    ("sampling.stepz=3", r"sampling\.stepz: unknown key; did you mean 'steps'"),
    ("trainer.max_stepz=3", r"trainer\.max_stepz: unknown key; did you mean 'max_steps'"),
    ("trainer.max_steps=abc", r"trainer\.max_steps: expected int, got 'abc'"),
    ("sampling.eta=high", r"sampling\.eta: expected int or float or null, got 'high'"),
    ("logging.wandb_sync=maybe", r"logging\.wandb_sync: expected bool, got 'maybe'"),
    ("evaluation.noise_seed=1.5", r"evaluation\.noise_seed: expected int, got 1\.5"),
    ("seed=zero", r"seed: expected int"),
    ("sampling.eta=1.5", r"sampling: eta must lie in \[0, 1\]"),
    ("sampling.t_start=matched", r"sampling: t_start must be null, an int or 'auto'"),
    ("sampling.return_std=true", r"sampling\.return_std: unknown key"),  # per call, not an option
    # a method's params make one SamplingOptions with the run's sampling section
    ("evaluation.methods.6.params.eta=2.0", r"evaluation\.methods\[6\]\.params: eta must lie in \[0, 1\]"),
    ("sampling.sampler=ddpm", r"sampling: sampler='ddpm' runs every timestep and takes no steps, eta"),
])
def test_bad_keys_and_types_are_named(override, match):
    with pytest.raises(ConfigError, match=match):
        check_run_config(load_config(BUNDLED, [override]))


def test_the_cli_refuses_before_making_a_run_folder(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("main_script", ROOT / "run_scripts" / "dm4mi-conditional.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--config", str(BUNDLED), f"logging.save_dir={tmp_path / 'runs'}", "sampling.stepz=3"])
    assert exit_info.value.code == 2
    assert "sampling.stepz: unknown key" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
