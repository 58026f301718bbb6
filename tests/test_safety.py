"""Safe by construction: neither a run config nor a checkpoint can run code.

Each attack's payload would create a marker file in tmp_path; every test asserts that the
load is refused with an error naming the file / config path AND that the marker does not
exist. Also: ``allow_targets`` admits a user's own classes (also where a constructor
instantiates a nested config), only while that config is built; real training and
shipped checkpoints still load with ``torch.load(weights_only=True)``.
"""
import copy
import importlib.util
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from models.ddpm_conditioned import ConditionDDPM
from orchestration.checkpoints import CheckpointError, export_inference_checkpoint, load_checkpoint
from synthetic import UNET, tiny_model_cfg
from utils.initialize_configs import (RUN_SECTIONS, ConfigError, _EXTRA_ALLOWED, allowed_targets, get_obj_from_str,
                                      instantiate_from_configs, load_config, validate_target_config)

ROOT = Path(__file__).resolve().parents[1]
DATAMODULE = "diffusion_modules.diffusion_utils.datamodule.DenoisingDataModule"


def payload(target: str, marker: Path) -> dict:
    """A target node that creates ``marker`` if it is ever built."""
    if target == "subprocess.Popen":
        return {"target": target, "params": {"args": ["touch", str(marker)]}}
    return {"target": target, "params": {"command": f"touch {marker}"}}


def run_config(marker: Path, target: str, where: str) -> dict:
    cfg = {"seed": 0, "model": tiny_model_cfg(),
           "data": {"target": DATAMODULE, "params": {"volumes": [], "image_size": 16}},
           "trainer": {"max_steps": 1, "accelerator": "cpu"}, "logging": {"logger": "csv"},
           "evaluation": {"sigmas": [0.1], "methods": []}}
    evil = payload(target, marker)
    if where == "top":
        cfg["model"] = evil
    elif where == "data":
        cfg["data"] = evil
    elif where == "unet":
        cfg["model"]["params"]["unet_rosinality_config"] = evil
    elif where == "data_list":  # a target node nested in a list of params
        cfg["data"]["params"]["volumes"] = [evil]
    return cfg


ATTACK_TARGETS = ["os.system", "posix.system", "subprocess.Popen"]
WHERE = {"top": r"^model\.target", "data": r"^data\.target",
         "unet": r"^model\.params\.unet_rosinality_config\.target",
         "data_list": r"^data\.params\.volumes\[0\]\.target"}


# ----------------------------------------------------------------------------- configs


@pytest.mark.parametrize("where", list(WHERE))
@pytest.mark.parametrize("target", ATTACK_TARGETS)
def test_yaml_config_cannot_run_a_command(tmp_path, target, where):
    from orchestration.evaluation_job import run_evaluation
    from orchestration.training import train

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.yaml"
    OmegaConf.save(OmegaConf.create(run_config(marker, target, where)), path)
    cfg = load_config(path)
    section = "model" if where in ("top", "unet") else "data"
    expected = WHERE[where] + rf": '{target}' is not an allowed target .*add its package to allow_targets"
    with pytest.raises(ConfigError, match=expected):
        validate_target_config(cfg[section], section)
    with pytest.raises(ConfigError, match=expected):
        instantiate_from_configs(cfg[section], section)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with pytest.raises(ConfigError, match=expected):
        train(cfg, run_dir)  # the training entry point refuses it before writing anything
    assert not list(run_dir.iterdir())
    if section == "data":
        with pytest.raises(ConfigError, match=expected):
            run_evaluation(cfg, {}, out_dir=tmp_path / "eval")
    assert not marker.exists()


def write_module(root: Path, body: str) -> str:
    """A fresh importable package under ``root`` (put on sys.path by the caller)."""
    name = f"cdm_user_ext_{uuid.uuid4().hex[:10]}"
    (root / name).mkdir()
    (root / name / "__init__.py").write_text(body)
    return name


def test_target_string_is_refused_before_its_module_is_imported(tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    name = write_module(tmp_path, f"open({str(marker)!r}, 'w').close()\nclass Net:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = tiny_model_cfg()
    cfg["params"]["unet_rosinality_config"] = {"target": f"{name}.Net", "params": {}}
    with pytest.raises(ConfigError, match=rf"model\.params\.unet_rosinality_config\.target: '{name}\.Net' is not"):
        validate_target_config(cfg, "model")
    assert name not in sys.modules and not marker.exists()


@pytest.mark.parametrize("target", ["torch.load", "torch.hub.load", "torch.Tensor", "torch.utils.data.DataLoader",
                                    "utils.atomic.atomic_write", "models.ddpm_st_diffusion.torch",
                                    "builtins.eval", "torchx.nn.Conv2d", "modelsx.ddpm_conditioned.ConditionDDPM",
                                    "os.path.join"])
def test_functions_and_foreign_objects_are_refused(target):
    with pytest.raises(ConfigError, match=rf"^model\.target: '{target}'.* not an allowed target"):
        get_obj_from_str(target, "model.target")
    with pytest.raises(ConfigError, match=r"model\.params\.unet_rosinality_config\.target"):
        cfg = tiny_model_cfg()
        cfg["params"]["unet_rosinality_config"]["target"] = target
        validate_target_config(cfg, "model")


@pytest.mark.parametrize("target", ["torch.nn.Conv2d", "torch.optim.AdamW", "torch.optim.lr_scheduler.LambdaLR",
                                    "torch.utils.data.TensorDataset", "lightning.pytorch.callbacks.ModelCheckpoint",
                                    "models.ddpm_conditioned.ConditionDDPM", UNET, DATAMODULE])
def test_project_and_framework_classes_are_allowed(target):
    assert isinstance(get_obj_from_str(target, "model.target"), type)


def test_a_class_imported_into_a_project_module_is_judged_by_where_it_is_defined(monkeypatch):
    import models.ddpm_st_diffusion as mod

    monkeypatch.setattr(mod, "Popen", subprocess.Popen, raising=False)
    with pytest.raises(ConfigError, match=r"defined as 'subprocess\.Popen'"):
        get_obj_from_str("models.ddpm_st_diffusion.Popen", "model.target")


USER_MODULE = f"""
from {UNET.rsplit('.', 1)[0]} import UNet

class MyUNet(UNet):
    '''A user's UNet variant.'''

def make_unet(**params):
    return MyUNet(**params)
"""


def user_model_cfg(name: str, target: str = "MyUNet") -> dict:
    cfg = tiny_model_cfg()
    cfg["params"]["unet_rosinality_config"]["target"] = f"{name}.{target}"
    return cfg


def test_allow_targets_admits_a_users_own_class_also_inside_constructors(tmp_path, monkeypatch):
    name = write_module(tmp_path, USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = user_model_cfg(name)
    refused = rf"model\.params\.unet_rosinality_config\.target: '{name}\.MyUNet' is not an allowed target"
    with pytest.raises(ConfigError, match=refused):
        validate_target_config(cfg, "model")
    with pytest.raises(ConfigError, match=refused):
        instantiate_from_configs(cfg, "model")
    # a prefix must match whole dotted components
    with pytest.raises(ConfigError, match=refused):
        instantiate_from_configs(cfg, "model", allow_targets=[name[:-2]])
    # DDPM.__init__ instantiates the UNet config itself: the run config's allow_targets reaches it
    validate_target_config(cfg, "model", allow_targets=[name])
    model = instantiate_from_configs(cfg, "model", allow_targets=[name])
    assert type(model.unet).__name__ == "MyUNet" and type(model) is ConditionDDPM
    # a class path, or anything callable under an allowed prefix
    validate_target_config(cfg, "model", allow_targets=[f"{name}.MyUNet"])
    assert type(instantiate_from_configs(user_model_cfg(name, "make_unet"), "model", allow_targets=[name]).unet
                ).__name__ == "MyUNet"
    # only while it is built: afterwards (and after an error) the default list holds again
    assert _EXTRA_ALLOWED.get() == ()
    with pytest.raises(ConfigError), allowed_targets([name]):
        instantiate_from_configs(tiny_model_cfg() | {"target": "os.system"}, "model")
    assert _EXTRA_ALLOWED.get() == ()
    with pytest.raises(ConfigError, match=refused):
        validate_target_config(cfg, "model")
    # a checkpoint's hyper-parameters get the default list only: a run config's allow_targets
    # does not reach them (tests/test_security_checkpoint_targets.py)
    ckpt = tmp_path / "user.ckpt"
    torch.save(lightning_dict(model), ckpt)
    for allow in (None, [name]):
        with pytest.raises(ConfigError, match=rf"{re.escape(str(ckpt))}: hyper_parameters\.unet_rosinality_config\."
                                              r"target: .* allow_targets does not reach them"):
            load_checkpoint(ConditionDDPM, ckpt, allow_targets=allow)


def test_allow_targets_in_a_run_config(tmp_path, monkeypatch):
    name = write_module(tmp_path, USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "allow_targets" in RUN_SECTIONS
    path = tmp_path / "user.yaml"
    OmegaConf.save(OmegaConf.create({"allow_targets": [name], "model": user_model_cfg(name)}), path)
    cfg = load_config(path)
    model = instantiate_from_configs(cfg.model, "model", allow_targets=cfg.get("allow_targets"))
    assert type(model.unet).__name__ == "MyUNet"
    cfg = load_config(path, ["allow_targets=[]"])
    with pytest.raises(ConfigError, match=r"unet_rosinality_config\.target.*allow_targets"):
        instantiate_from_configs(cfg.model, "model", allow_targets=cfg.get("allow_targets"))
    for bad in ("allow_targets=[os.]", "allow_targets=[1]", "allow_targets=['a b']"):
        with pytest.raises(ConfigError, match=r"^allow_targets\[0\]: expected a dotted name"):
            load_config(path, [bad])
    OmegaConf.save(OmegaConf.create({"allow_targets": {"a": "b"}, "model": user_model_cfg(name)}), path)
    with pytest.raises(ConfigError, match=r"^allow_targets: expected a list"):
        load_config(path)


# ------------------------------------------------------------------------- checkpoints


def lightning_dict(model: pl.LightningModule) -> dict:
    return {"state_dict": model.state_dict(), "hyper_parameters": copy.deepcopy(dict(model.hparams)),
            "pytorch-lightning_version": pl.__version__, "global_step": 0, "epoch": 0}


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = instantiate_from_configs(tiny_model_cfg(), "model").eval()
    path = tmp_path_factory.mktemp("ckpt") / "tiny.ckpt"
    torch.save(lightning_dict(model), path)
    return model, path


def evil_hparams_ckpt(tiny_ckpt, tmp_path, target="os.system") -> tuple[Path, Path]:
    _, src = tiny_ckpt
    marker = tmp_path / "pwned"
    ckpt = torch.load(src, map_location="cpu", weights_only=True)
    ckpt["hyper_parameters"]["unet_rosinality_config"] = payload(target, marker)
    path = tmp_path / "evil.ckpt"
    torch.save(ckpt, path)
    return path, marker


def test_clean_checkpoint_loads(tiny_ckpt):
    model, path = tiny_ckpt
    loaded = load_checkpoint(ConditionDDPM, path)
    assert not loaded.training
    for (k, v), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


@pytest.mark.parametrize("target", ATTACK_TARGETS)
def test_checkpoint_hparams_cannot_run_a_command(tiny_ckpt, tmp_path, target):
    path, marker = evil_hparams_ckpt(tiny_ckpt, tmp_path, target)
    expected = rf"unet_rosinality_config\.target: '{target}' is not an allowed target"
    with pytest.raises(ConfigError, match=expected):
        ConditionDDPM.load_from_checkpoint(str(path), map_location="cpu")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: hyper_parameters\.{expected}"):
        load_checkpoint(ConditionDDPM, path)
    assert not marker.exists()


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name.replace("-", "_"), ROOT / "run_scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_evaluate_script_refuses_an_evil_checkpoint(tiny_ckpt, tmp_path):
    path, marker = evil_hparams_ckpt(tiny_ckpt, tmp_path)
    evaluate = load_script("evaluate")
    config = ROOT / "run_scripts" / "configs" / "ddpm-cond" / "bundled_ct_mr.yaml"
    with pytest.raises(SystemExit, match=rf"{re.escape(str(path))}: hyper_parameters\.unet_rosinality_config\.target: 'os\.system'"):
        evaluate.main(["--config", str(config), "--ckpt", str(path), "--out", str(tmp_path / "out"),
                       "evaluation.pretrained_ddpm=null", "evaluation.unet_ckpt=null"])
    assert not marker.exists() and not (tmp_path / "out").exists()


class Payload:
    """Unpickling this object runs ``touch marker`` (with torch.load(weights_only=False))."""

    def __init__(self, marker: Path, how: str):
        self.marker, self.how = str(marker), how

    def __reduce__(self):
        if self.how == "subprocess":
            return subprocess.call, (["touch", self.marker],)
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(params=["os.system", "subprocess"])
def evil_pickle(request, tiny_ckpt, tmp_path):
    model, _ = tiny_ckpt
    marker = tmp_path / "pwned"
    ckpt = lightning_dict(model)
    ckpt["hyper_parameters"]["note"] = Payload(marker, request.param)
    path = tmp_path / "evil_pickle.ckpt"
    torch.save(ckpt, path)
    assert not marker.exists()
    return path, marker


def test_export_refuses_a_malicious_pickle(evil_pickle, tmp_path, capsys):
    path, marker = evil_pickle
    dst = tmp_path / "out.ckpt"
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(path))}: cannot be read .*weights_only=True.*GLOBAL"):
        export_inference_checkpoint(path, dst)
    with pytest.raises(SystemExit) as exit_info:  # the script: one line on stderr, exit status 2
        load_script("export_pretrained").main([str(path), str(dst)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith(f"export_pretrained.py: {path}: cannot be read")
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(path))}: "):
        load_checkpoint(ConditionDDPM, path)
    assert not marker.exists() and not dst.exists()
    assert not list(tmp_path.glob(".tmp-*"))


@pytest.mark.parametrize("kind", ["empty", "truncated", "garbage"])
def test_unreadable_checkpoint_names_the_file(tiny_ckpt, tmp_path, kind):
    _, src = tiny_ckpt
    path = tmp_path / f"{kind}.ckpt"
    data = {"empty": b"", "truncated": src.read_bytes()[: src.stat().st_size // 2], "garbage": b"\x00not a ckpt" * 9}
    path.write_bytes(data[kind])
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(path))}: cannot be read as a checkpoint"):
        load_checkpoint(ConditionDDPM, path)
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(path))}: cannot be read as a checkpoint"):
        export_inference_checkpoint(path, tmp_path / "out.ckpt")
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        load_checkpoint(ConditionDDPM, tmp_path / "nope.ckpt")


def test_a_real_training_checkpoint_loads_with_weights_only(tmp_path):
    """A checkpoint written by this project's Trainer (ModelCheckpoint, LR monitor, image
    logger, CSV logger, optimizer and scheduler states) holds only weights-only types."""
    from orchestration.training import build_trainer

    torch.manual_seed(0)
    cfg = tiny_model_cfg()
    cfg["params"].update(use_ema=True, warmup_steps=1)
    model = instantiate_from_configs(cfg, "model")
    run = OmegaConf.create({"trainer": {"max_steps": 2, "accelerator": "cpu", "limit_val_batches": 0,
                                        "enable_progress_bar": False, "enable_model_summary": False,
                                        "log_every_n_steps": 1},
                            "logging": {"logger": "csv", "checkpoint_every_n_steps": 1}})
    trainer = build_trainer(run, tmp_path)
    x = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    trainer.fit(model, train_dataloaders=DataLoader([{"x_prior": v, "x_cond": v} for v in x], batch_size=4))
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert last.is_file()
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert {"optimizer_states", "lr_schedulers", "callbacks", "loops"} <= set(ckpt)
    full = load_checkpoint(ConditionDDPM, last)
    small = load_checkpoint(ConditionDDPM, export_inference_checkpoint(last, tmp_path / "small.ckpt", half=False))
    for (k, v), (k2, v2) in zip(full.unet_ema.state_dict().items(), small.unet.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


@pytest.mark.parametrize("name, cls", [("cdm4mi_bundled_ct_mr.ckpt", "ConditionDDPM"),
                                       ("unet_bundled_ct_mr.ckpt", "SupervisedUNet")])
def test_shipped_checkpoints_load_weights_only(name, cls):
    from models.supervised_unet import SupervisedUNet

    path = ROOT / "pretrained" / name
    if not path.is_file():
        pytest.skip(f"{path} is not there")
    torch.load(path, map_location="cpu", weights_only=True)
    model = load_checkpoint({"ConditionDDPM": ConditionDDPM, "SupervisedUNet": SupervisedUNet}[cls], path)
    assert type(model).__name__ == cls


def test_no_unsafe_torch_load_outside_tests():
    offenders = []
    for folder in ("utils", "diffusion_modules", "models", "metrics", "evaluation", "orchestration", "run_scripts"):
        for file in (ROOT / folder).rglob("*.py"):
            if "weights_only=False" in file.read_text():
                offenders.append(str(file.relative_to(ROOT)))
    assert not offenders
