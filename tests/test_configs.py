"""Run configs: shipped YAMLs validate and load, the seed's example config builds the
reference model, overrides apply, and bad configs fail with errors naming the config path."""
import importlib.util
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from synthetic import tiny_model_cfg
from utils.initialize_configs import (ConfigError, get_obj_from_str, instantiate_from_configs, load_config,
                                      validate_target_config)

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "run_scripts" / "configs"
EXP01 = CONFIG_DIR / "ddpm-cond" / "exp01_brain_1BA001_ct_config.yaml"
BUNDLED = CONFIG_DIR / "ddpm-cond" / "bundled_ct_mr.yaml"
ALL_CONFIGS = sorted(p for p in CONFIG_DIR.rglob("*.yaml") if p.parent.name != "study")  # study configs: test_study.py


def test_exp01_config_builds_the_reference_condition_ddpm():
    from models.ddpm_conditioned import ConditionDDPM

    cfg = OmegaConf.load(EXP01)
    model = instantiate_from_configs(cfg.model, "model")
    assert type(model) is ConditionDDPM
    n_unet = sum(p.numel() for p in model.unet.parameters())
    assert abs(n_unet - 15.7e6) <= 0.1e6
    assert model.unet.conv_in.in_channels == 2  # cat([x_t, x_cond])
    assert model.num_timesteps == 1000 and model.parameterization == "eps"
    # "linear" = linear in sqrt(beta) from 1e-4 to 2e-2
    betas = model.diffusion.betas.double()
    assert betas[0].item() == pytest.approx(1e-4, rel=1e-5) and betas[-1].item() == pytest.approx(2e-2, rel=1e-5)
    mid = ((1e-4 ** 0.5 + 2e-2 ** 0.5) / 2) ** 2
    assert (betas[499].item() + betas[500].item()) / 2 == pytest.approx(mid, rel=1e-3)
    assert model.use_ema and sum(p.numel() for p in model.unet_ema.parameters()) == n_unet
    assert load_config(EXP01).model.target == "models.ddpm_conditioned.ConditionDDPM"


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=[str(p.relative_to(CONFIG_DIR)) for p in ALL_CONFIGS])
def test_every_shipped_config_validates_and_loads(path):
    cfg = load_config(path)
    for section in ("model", "data"):
        assert section in cfg, f"{path.name} lacks a {section} section"
        validate_target_config(cfg[section], section)
    for section in ("trainer", "logging", "seed"):
        assert section in cfg, f"{path.name} lacks a {section} section"
    # paths in shipped configs are relative to the repository root, never absolute or home-based
    for volume in cfg.data.params.get("volumes", []):
        p = volume if isinstance(volume, str) else volume["path"]
        assert not Path(p).is_absolute() and not str(p).startswith("~"), p


def test_shipped_configs_were_found():
    assert BUNDLED in ALL_CONFIGS and len(ALL_CONFIGS) >= 2


def test_overrides_apply_to_any_section():
    cfg = load_config(BUNDLED, ["trainer.max_steps=5", "model.params.unet_rosinality_config.params.channel=8",
                                "evaluation.sigmas=[0.1]", "seed=3", "logging.logger=csv",
                                "sampling.steps=4"])
    assert cfg.trainer.max_steps == 5 and cfg.seed == 3 and cfg.sampling.steps == 4
    assert cfg.model.params.unet_rosinality_config.params.channel == 8
    assert list(cfg.evaluation.sigmas) == [0.1] and cfg.logging.logger == "csv"
    # untouched keys keep their file values
    assert cfg.model.params.timesteps == OmegaConf.load(BUNDLED).model.params.timesteps


def test_override_indexes_into_a_list_and_merges_dicts():
    file_cfg = OmegaConf.load(BUNDLED)
    cfg = load_config(BUNDLED, ["evaluation.test_volumes.2.max_slices=4", "data.params.augment={rescale: [0.5, 2.0]}",
                                "evaluation.methods=[{name: noisy input, type: noisy}]"])
    volume = cfg.evaluation.test_volumes[2]
    assert volume.max_slices == 4 and volume.path == file_cfg.evaluation.test_volumes[2].path
    assert len(cfg.evaluation.test_volumes) == len(file_cfg.evaluation.test_volumes)
    assert list(cfg.data.params.augment.rescale) == [0.5, 2.0]  # was `augment: true`: replaced by the dict
    assert [m.name for m in cfg.evaluation.methods] == ["noisy input"]  # a list value replaces the list


@pytest.mark.parametrize("override, message", [
    ("evaluation.test_volumes.9.max_slices=4", "test_volumes.9.max_slices=4'.*out of range"),
    ("=3", "not of the form key=value"),
    ("trainer.max_steps", "not of the form key=value"),
])
def test_bad_override_is_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(BUNDLED, [override])


def test_misspelt_unet_parameter_names_its_full_path():
    cfg = tiny_model_cfg()
    cfg["params"]["unet_rosinality_config"]["params"]["chanel"] = cfg["params"]["unet_rosinality_config"][
        "params"].pop("channel")
    with pytest.raises(ConfigError) as err:
        validate_target_config(cfg, "model")
    msg = str(err.value)
    assert "model.params.unet_rosinality_config.params.chanel" in msg
    assert "channel" in msg.replace("chanel", "") and "expected" in msg
    with pytest.raises(ConfigError, match=r"model\.params\.unet_rosinality_config\.params\.chanel"):
        instantiate_from_configs(OmegaConf.create(cfg), "model")


def test_misspelt_parameter_through_load_config_override(tmp_path):
    cfg = load_config(BUNDLED, ["model.params.unet_rosinality_config.params.chanel=8"])
    with pytest.raises(ConfigError, match=r"model\.params\.unet_rosinality_config\.params\.chanel"):
        instantiate_from_configs(cfg.model, "model")
    cfg = load_config(BUNDLED, ["data.params.volumez=[]"])
    with pytest.raises(ConfigError, match=r"data\.params\.volumez"):
        validate_target_config(cfg.data, "data")


def test_unknown_parameter_of_a_subclass_forwarding_kwargs_is_named():
    """ConditionDDPM(*args, ..., **kwargs) forwards to DDPM: DDPM's parameters are checked too."""
    cfg = load_config(BUNDLED, ["model.params.timestepz=5"])
    with pytest.raises(ConfigError, match=r"model\.params\.timestepz: unknown parameter.*timesteps"):
        instantiate_from_configs(cfg.model, "model")
    cfg = tiny_model_cfg()
    cfg["params"]["p_uncond"] = 0.1  # ConditionDDPM's own and DDPM's parameters stay accepted
    cfg["params"]["parameterization"] = "v"
    validate_target_config(cfg, "model")


@pytest.mark.parametrize("target, expected", [
    ("models.no_such_module.ConditionDDPM", r"model\.target.*cannot import module 'models\.no_such_module'"),
    ("models.ddpm_conditioned.NoSuchClass", r"model\.target.*has no attribute 'NoSuchClass'"),
    ("ConditionDDPM", r"model\.target.*dotted import path"),
])
def test_wrong_target_names_the_path(target, expected):
    cfg = tiny_model_cfg()
    cfg["target"] = target
    with pytest.raises(ConfigError, match=expected):
        validate_target_config(cfg, "model")


def test_wrong_nested_target_names_the_nested_path():
    cfg = tiny_model_cfg()
    cfg["params"]["unet_rosinality_config"]["target"] = "diffusion_modules.unet_arch.unet_rosinality.UNett"
    with pytest.raises(ConfigError, match=r"model\.params\.unet_rosinality_config\.target.*'UNett'"):
        validate_target_config(cfg, "model")


def test_missing_required_parameter_names_it():
    cfg = tiny_model_cfg()
    del cfg["params"]["unet_rosinality_config"]
    with pytest.raises(ConfigError, match=r"model\.params\.unet_rosinality_config: missing required parameter"):
        validate_target_config(cfg, "model")
    data = {"target": "diffusion_modules.diffusion_utils.datamodule.DenoisingDataModule", "params": {}}
    with pytest.raises(ConfigError, match=r"data\.params\.volumes: missing required parameter"):
        validate_target_config(data, "data")


def test_missing_target_key_and_unexpected_keys():
    cfg = tiny_model_cfg()
    del cfg["target"]
    with pytest.raises(ConfigError, match=r"^model: missing key 'target'"):
        validate_target_config(cfg, "model")
    cfg = tiny_model_cfg()
    cfg["parms"] = cfg.pop("params")
    with pytest.raises(ConfigError, match=r"model: unexpected keys \['parms'\]"):
        validate_target_config(cfg, "model")
    with pytest.raises(ConfigError, match=r"model: expected a mapping"):
        validate_target_config([1, 2], "model")
    with pytest.raises(ConfigError, match=r"target"):
        get_obj_from_str(42)


def test_valid_config_instantiates_with_its_values():
    model = instantiate_from_configs(OmegaConf.create(tiny_model_cfg()), "model")
    assert model.num_timesteps == 20 and model.unet.channel == 8
    unet = instantiate_from_configs(tiny_model_cfg()["params"]["unet_rosinality_config"], "unet", out_channel=3)
    assert unet.out[-1].out_channels == 3  # extra keyword arguments reach the target


def test_unknown_top_level_key_via_override():
    with pytest.raises(ConfigError, match=r"unknown top-level keys \['trainr'\]"):
        load_config(BUNDLED, ["trainr.max_steps=5"])


def test_malformed_override():
    with pytest.raises(ConfigError, match=r"override 'trainer\.max_steps' is not of the form key=value"):
        load_config(BUNDLED, ["trainer.max_steps"])


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match=r"config file not found: .*nope\.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_unknown_trainer_argument_is_a_config_error(tmp_path):
    from orchestration.training import build_trainer

    cfg = load_config(BUNDLED, ["logging.logger=csv", "trainer.max_stepz=3"])
    with pytest.raises(ConfigError, match=r"trainer:.*max_stepz"):
        build_trainer(cfg, tmp_path)


def test_main_script_reports_config_errors(capsys):
    spec = importlib.util.spec_from_file_location("dm4mi_conditional", ROOT / "run_scripts" / "dm4mi-conditional.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--config", str(BUNDLED), "trainr.max_steps=5"])
    assert exit_info.value.code == 2
    assert "trainr" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.main(["--config", str(CONFIG_DIR / "missing.yaml")])
    assert "config file not found" in capsys.readouterr().err
