"""Names from a config never leave their folder, and unreadable files are named.

``logging.name`` (the run folder), a volume's ``name`` in ``data.params.volumes`` and
``evaluation.test_volumes`` (HDF5 cache and prediction file names) and ``datasetname`` of
``save_as_hdf5`` are refused, naming the key, when they hold ``/``, ``\\``, ``..`` or start
with ``.``, before any folder or file is made. An empty or truncated checkpoint given to
``--resume`` or ``init_from`` fails with an error naming the file, before a run folder is made.
"""
import importlib.util
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from orchestration.config_checks import check_run_config
from synthetic import make_volume, tiny_model_cfg
from utils.initialize_configs import ConfigError
from utils.paths import check_name

ROOT = Path(__file__).resolve().parents[1]
DATAMODULE = "diffusion_modules.diffusion_utils.datamodule.DenoisingDataModule"
BAD = ["../escape", "a/b", "/abs", "a\\b", "..", "a..b", ".hidden", "nul\0byte"]


def run_cfg(tmp_path: Path) -> dict:
    """A run config whose names are all fine (nothing is trained with it)."""
    return {"seed": 0, "model": tiny_model_cfg(),
            "data": {"target": DATAMODULE, "params": {
                "volumes": [{"path": str(tmp_path / "a_ct.nii.gz"), "modality": "ct", "name": "a"}],
                "cache_dir": str(tmp_path / "cache"), "image_size": 16}},
            "trainer": {"max_steps": 1, "accelerator": "cpu"},
            "logging": {"logger": "csv", "save_dir": str(tmp_path / "runs"), "name": "ok"},
            "evaluation": {"sigmas": [0.1], "methods": [{"type": "noisy"}],
                           "test_volumes": [{"path": str(tmp_path / "b_mr.nii.gz"), "name": "b"}]}}


@pytest.mark.parametrize("name", ["run", "bundled_ct_mr", "ct-01", "my run 2", "a.b", "UNet_v2.1"])
def test_plain_names_pass(name):
    assert check_name(name, "logging.name") == name


@pytest.mark.parametrize("name", BAD + ["", None, 3])
def test_unsafe_names_are_refused_naming_the_key(name):
    with pytest.raises(ConfigError, match=r"^logging\.name: ") as info:
        check_name(name, "logging.name")
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("name", BAD)
def test_config_check_refuses_each_name_key(tmp_path, name):
    for where, key in ((("logging",), "logging.name"), (("data", "params", "volumes", 0), "data.params.volumes[0].name"),
                       (("evaluation", "test_volumes", 0), "evaluation.test_volumes[0].name")):
        cfg = run_cfg(tmp_path)
        node = cfg
        for part in where:
            node = node[part]
        node["name"] = name
        with pytest.raises(ConfigError, match="^" + re.escape(f"{key}: {name!r}")):
            check_run_config(cfg)
    assert list(tmp_path.iterdir()) == []


def test_the_cli_refuses_a_traversing_run_name_before_any_folder(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("main_script", ROOT / "run_scripts" / "dm4mi-conditional.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    save_dir = tmp_path / "runs"
    with pytest.raises(SystemExit) as info:
        script.main(["--config", str(ROOT / "run_scripts/configs/ddpm-cond/bundled_ct_mr.yaml"),
                     f"logging.save_dir={save_dir}", "logging.name=../escape"])
    assert info.value.code == 2
    assert "logging.name: '../escape' contains" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_make_run_dir_refuses_a_traversing_name(tmp_path):
    from orchestration.training import make_run_dir

    cfg = OmegaConf.create({"logging": {"save_dir": str(tmp_path / "runs"), "name": "../escape"}})
    with pytest.raises(ConfigError, match=r"^logging\.name: "):
        make_run_dir(cfg)
    assert list(tmp_path.iterdir()) == []
    cfg.logging.name = "fine"
    assert make_run_dir(cfg).parent == tmp_path / "runs"


def test_datamodule_refuses_a_traversing_volume_name(tmp_path):
    from diffusion_modules.diffusion_utils.datamodule import DenoisingDataModule

    volume = make_volume(tmp_path / "v_ct.nii.gz", "ct")
    cache = tmp_path / "deep" / "cache"
    with pytest.raises(ConfigError, match=r"^volumes\[1\]\.name: '\.\./\.\./escape' contains '/'"):
        DenoisingDataModule(volumes=[{"path": str(volume), "name": "fine"},
                                     {"path": str(volume), "name": "../../escape"}], cache_dir=str(cache))
    assert not (tmp_path / "deep").exists() and not list(tmp_path.glob("escape*"))
    # an empty name keeps meaning "the file name"
    dm = DenoisingDataModule(volumes=[{"path": str(volume), "name": ""}], cache_dir=str(cache))
    assert dm.volumes[0]["name"] == "v_ct"


def test_test_volume_names_are_checked_where_they_are_read(tmp_path):
    from orchestration.evaluation_job import parse_test_volumes

    volume = make_volume(tmp_path / "t_mr.nii.gz", "mr")
    with pytest.raises(ConfigError, match=r"^evaluation\.test_volumes\[1\]\.name: '\.hidden' starts with '\.'"):
        parse_test_volumes([str(volume), {"path": str(volume), "name": ".hidden"}], None)
    assert [t["name"] for t in parse_test_volumes([{"path": str(volume), "name": "ok"}], None)] == ["ok"]


@pytest.mark.parametrize("name", ["../escape", "sub/escape", "..\\escape", ".escape"])
def test_save_as_hdf5_refuses_a_traversing_datasetname(tmp_path, name):
    from utils.create_training_images import save_as_hdf5

    volume = make_volume(tmp_path / "v_ct.nii.gz", "ct")
    out = tmp_path / "out" / "hdf5"
    with pytest.raises(ValueError, match=r"^datasetname: "):
        save_as_hdf5(inputpath=volume, datasetname=name, targetdir=out, image_size=16, stride=16, modality="ct",
                     progress=False)
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v_ct.nii.gz"]


# ----------------------------------------------------------------------------- checkpoints named
@pytest.mark.parametrize("kind", ["empty", "truncated"])
def test_resume_and_init_from_name_an_unreadable_checkpoint(tmp_path, kind):
    import torch

    from models.ddpm_conditioned import ConditionDDPM
    from orchestration.checkpoints import CheckpointError
    from orchestration.run_job import run_job
    from orchestration.training import init_weights

    model = ConditionDDPM(**tiny_model_cfg()["params"])
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, good)
    bad = tmp_path / f"{kind}.ckpt"
    bad.write_bytes(b"" if kind == "empty" else good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(bad))}: cannot be read as a checkpoint"):
        init_weights(model, bad)
    cfg = run_cfg(tmp_path)
    del cfg["evaluation"]
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(bad))}: cannot be read as a checkpoint"):
        run_job(OmegaConf.create(cfg), resume=bad)
    assert not (tmp_path / "runs").exists()  # no run folder for a run that cannot start
