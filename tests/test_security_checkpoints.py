"""Issue 16, checkpoints: no pickle runs code on any load path (even with
TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1), a run config's allow_targets does not reach a
checkpoint's hyper-parameters, and export_pretrained.py neither copies a forbidden target
nor overwrites its input. Each payload would create a marker file; every test asserts it
does not exist."""
import copy
import hashlib
import io
import os
import re
import sys
import uuid
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from models.ddpm_conditioned import ConditionDDPM
from models.ddpm_st_diffusion import DDPM
from models.supervised_unet import SupervisedUNet
from orchestration.checkpoints import (CheckpointError, check_hyper_parameters, export_inference_checkpoint,
                                       load_checkpoint, pretrained_models, read_checkpoint)
from orchestration.resume import AtomicCheckpointIO
from synthetic import load_script, tiny_model_cfg
from utils.initialize_configs import ConfigError, allowed_targets, instantiate_from_configs


def lightning_dict(model: pl.LightningModule) -> dict:
    return {"state_dict": model.state_dict(), "hyper_parameters": copy.deepcopy(dict(model.hparams)),
            "pytorch-lightning_version": pl.__version__, "global_step": 0, "epoch": 0}


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return instantiate_from_configs(tiny_model_cfg(), "model").eval()


class Payload:
    """Unpickling this object runs ``touch marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def planted(tiny_model, tmp_path):
    marker = tmp_path / "pwned"
    ckpt = lightning_dict(tiny_model)
    ckpt["hyper_parameters"]["note"] = Payload(marker)
    path = tmp_path / "planted.ckpt"
    torch.save(ckpt, path)
    return path, marker


def test_the_planted_payload_runs_under_an_unqualified_torch_load(planted, monkeypatch):
    """The threat is real: with the variable set, torch.load without weights_only (what
    ConditionDDPM.load_from_checkpoint reached before) runs the payload."""
    path, marker = planted
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.warns(UserWarning, match="TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"):
        torch.load(path, map_location="cpu")
    assert marker.exists()


@pytest.mark.parametrize("how", ["str", "path", "file object"])
def test_load_from_checkpoint_refuses_a_planted_pickle_even_when_torch_is_told_not_to(planted, monkeypatch, how):
    path, marker = planted
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    source = {"str": str(path), "path": path, "file object": io.BytesIO(path.read_bytes())}[how]
    with pytest.raises(ValueError, match=r"cannot be read as a checkpoint with torch\.load\(weights_only=True\).*GLOBAL"):
        ConditionDDPM.load_from_checkpoint(source, map_location="cpu")
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(path))}: cannot be read"):
        load_checkpoint(ConditionDDPM, path)
    with pytest.raises(Exception, match="GLOBAL"):  # Lightning's resume path (Trainer.fit(ckpt_path=...))
        AtomicCheckpointIO().load_checkpoint(str(path))
    with pytest.raises(CheckpointError):
        export_inference_checkpoint(path, path.with_name("out.ckpt"))
    assert not marker.exists() and not path.with_name("out.ckpt").exists()


@pytest.mark.parametrize("cls", [DDPM, SupervisedUNet])
def test_every_model_class_refuses_a_planted_pickle(planted, monkeypatch, cls):
    """The unconditional DDPM and the U-Net share ConditionDDPM's loader (models/safe_loading.py);
    with Lightning's own, DDPM.load_from_checkpoint ran the payload."""
    path, marker = planted
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(ValueError, match=r"weights_only=True.*GLOBAL"):
        cls.load_from_checkpoint(str(path), map_location="cpu")
    with pytest.raises(ValueError, match=r"weights_only=True only"):
        cls.load_from_checkpoint(str(path), weights_only=False)
    assert not marker.exists()


def test_load_from_checkpoint_refuses_weights_only_false(planted):
    path, marker = planted
    for call in (lambda: ConditionDDPM.load_from_checkpoint(str(path), weights_only=False),
                 lambda: AtomicCheckpointIO().load_checkpoint(str(path), weights_only=False)):
        with pytest.raises(ValueError, match=r"weights_only=True only"):
            call()
    assert not marker.exists()


def test_clean_checkpoint_loads_the_same_from_a_path_and_with_the_variable_set(tiny_model, tmp_path, monkeypatch):
    path = tmp_path / "clean.ckpt"
    torch.save(lightning_dict(tiny_model), path)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    loaded = ConditionDDPM.load_from_checkpoint(path, map_location="cpu")
    for (k, v), (k2, v2) in zip(tiny_model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    assert AtomicCheckpointIO().load_checkpoint(str(path))["hyper_parameters"]["timesteps"] == 20


# ------------------------------------------------- allow_targets does not reach checkpoints

USER_MODULE = """
import pathlib

from diffusion_modules.unet_arch.unet_rosinality import UNet


def run(marker):
    pathlib.Path(marker).touch()


class Net(UNet):
    def __init__(self, marker, **params):
        pathlib.Path(marker).touch()
        super().__init__(**params)
"""


@pytest.fixture
def user_package(tmp_path, monkeypatch):
    name = f"cdm_user_pkg_{uuid.uuid4().hex[:10]}"
    (tmp_path / name).mkdir()
    (tmp_path / name / "__init__.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_a_run_configs_allow_targets_does_not_reach_a_checkpoint(tiny_model, tmp_path, user_package):
    """A run config that allows its own package (``allow_targets: [pkg]``) let any checkpoint
    loaded in that run call anything in the package; the hyper-parameters of a checkpoint now
    get the project's allowlist only, on every load path."""
    marker = tmp_path / "called"
    ckpt = lightning_dict(tiny_model)
    ckpt["hyper_parameters"]["unet_rosinality_config"] = {"target": f"{user_package}.run",
                                                          "params": {"marker": str(marker)}}
    path = tmp_path / "user.ckpt"
    torch.save(ckpt, path)
    refused = rf"unet_rosinality_config\.target: '{user_package}\.run' is not an allowed target .*does not reach"
    allow = [user_package]
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: hyper_parameters\.{refused}"):
        check_hyper_parameters(read_checkpoint(path, path), path, allow)
    with pytest.raises(ConfigError, match=refused):
        load_checkpoint(ConditionDDPM, path, allow_targets=allow)
    with pytest.raises(ConfigError, match=refused):
        pretrained_models({"pretrained_ddpm": str(path)}, allow_targets=allow)
    with allowed_targets(allow):  # nor do the extras in force where a loader is called
        with pytest.raises(ConfigError, match=refused):
            load_checkpoint(ConditionDDPM, path)
        with pytest.raises(ConfigError, match=refused):
            ConditionDDPM.load_from_checkpoint(str(path), map_location="cpu")
    assert not marker.exists()
    # the run's own model, built from its config, still gets the config's allow_targets
    cfg = tiny_model_cfg()
    unet = cfg["params"]["unet_rosinality_config"]
    unet.update(target=f"{user_package}.Net", params={**unet["params"], "marker": str(marker)})
    assert type(instantiate_from_configs(cfg, "model", allow_targets=allow).unet).__name__ == "Net"
    assert marker.exists()


def test_a_checkpoint_may_not_call_resolvers(tiny_model, tmp_path):
    ckpt = lightning_dict(tiny_model)
    ckpt["hyper_parameters"]["unet_rosinality_config"]["params"]["dropout"] = "${oc.env:HOME}"
    path = tmp_path / "env.ckpt"
    torch.save(ckpt, path)
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: hyper_parameters\.unet_rosinality_config"
                                          r"\.params\.dropout: calls the resolver 'oc\.env'"):
        load_checkpoint(ConditionDDPM, path)


# ------------------------------------------------------------------------ export_pretrained


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_export(capsys, *argv) -> str:
    """export_pretrained.py's main; its exit status must be 2, returns its stderr line."""
    with pytest.raises(SystemExit) as exit_info:
        load_script("export_pretrained.py").main([str(a) for a in argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("export_pretrained.py: ")
    return err


@pytest.mark.parametrize("target", ["os.system", "user"])
def test_export_refuses_a_forbidden_target(tiny_model, tmp_path, capsys, target, user_package):
    marker = tmp_path / "pwned"
    ckpt = lightning_dict(tiny_model)
    name = "os.system" if target == "os.system" else f"{user_package}.run"
    params = {"command": f"touch {marker}"} if target == "os.system" else {"marker": str(marker)}
    ckpt["hyper_parameters"]["unet_rosinality_config"] = {"target": name, "params": params}
    src, dst = tmp_path / "evil.ckpt", tmp_path / "exported.ckpt"
    torch.save(ckpt, src)
    before = digest(src)
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(src))}: hyper_parameters\.unet_rosinality_config\.target: "
                                          rf"'{re.escape(name)}' is not an allowed target"):
        export_inference_checkpoint(src, dst)
    assert re.search(rf"{re.escape(str(src))}: .*'{re.escape(name)}' is not an allowed target", run_export(capsys, src, dst))
    assert not dst.exists() and not list(tmp_path.glob(".tmp-*")) and not marker.exists()
    assert digest(src) == before


def test_export_refuses_to_overwrite_its_input(tiny_model, tmp_path, capsys, monkeypatch):
    src = tmp_path / "runs" / "last.ckpt"
    src.parent.mkdir()
    torch.save(lightning_dict(tiny_model), src)
    before = digest(src)
    (tmp_path / "link.ckpt").symlink_to(src)
    os.link(src, tmp_path / "hard.ckpt")
    monkeypatch.chdir(tmp_path)
    for dst in (src, "runs/last.ckpt", tmp_path / "runs" / ".." / "runs" / "last.ckpt", tmp_path / "link.ckpt",
                tmp_path / "hard.ckpt"):
        with pytest.raises(ValueError, match=r"is the input checkpoint .* itself; .*name another output file"):
            export_inference_checkpoint(src, dst)
        assert "is the input checkpoint" in run_export(capsys, src, dst)
        assert digest(src) == before and (tmp_path / "link.ckpt").is_symlink()
    assert not list(tmp_path.rglob(".tmp-*"))
    # another output is fine, and loads
    out = export_inference_checkpoint(src, tmp_path / "small.ckpt")
    assert load_checkpoint(ConditionDDPM, out).hparams.timesteps == 20 and digest(src) == before
