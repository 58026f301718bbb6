"""Issue 16, resume: a checkpoint continues a run only if the run's model keeps every
hyper-parameter the weights depend on (model class, UNet config, timesteps, beta schedule,
parameterization, channels...); optimisation settings (RESUME_MAY_DIFFER) may change. The
refusal names each differing key with both values, and comes before any state is restored."""
import copy
import re

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from orchestration.checkpoints import RESUME_MAY_DIFFER, CheckpointError, check_resume_hparams, resume_mismatches
from orchestration.training import build_trainer
from synthetic import tiny_model_cfg
from utils.initialize_configs import instantiate_from_configs


def model_with(**params):
    cfg = tiny_model_cfg()
    unet = params.pop("unet", {})
    cfg["params"].update(params)
    cfg["params"]["unet_rosinality_config"]["params"].update(unet)
    return instantiate_from_configs(cfg, "model")


@pytest.fixture(scope="module")
def hparams():
    return copy.deepcopy(dict(model_with().hparams))  # T = 20, 8 UNet channels


def test_the_same_model_matches_and_optimisation_settings_may_differ(hparams):
    assert resume_mismatches(model_with(), hparams) == []
    changed = model_with(learning_rate=3e-3, weight_decay=0.1, warmup_steps=5, min_lr_ratio=0.5, ema_decay=0.99,
                         loss_type="l1", max_train_timestep=10, p_uncond=0.1, p_matched_start=0.5, clip_denoised=False)
    assert resume_mismatches(changed, hparams) == []
    assert {"learning_rate", "weight_decay", "loss_type", "p_uncond"} <= RESUME_MAY_DIFFER


@pytest.mark.parametrize("params, expected", [
    ({"timesteps": 10}, ["model.params.timesteps: checkpoint 20, config 10"]),
    ({"beta_schedule": "cosine"}, ["model.params.beta_schedule: checkpoint 'linear', config 'cosine'"]),
    ({"linear_end": 0.03}, ["model.params.linear_end: checkpoint 0.02, config 0.03"]),
    ({"parameterization": "v"}, ["model.params.parameterization: checkpoint 'eps', config 'v'"]),
    ({"image_size": 32}, ["model.params.image_size: checkpoint 16, config 32"]),
    ({"use_ema": False}, ["model.params.use_ema: checkpoint True, config False"]),
    ({"unet": {"channel": 16}}, ["model.params.unet_rosinality_config.params.channel: checkpoint 8, config 16"]),
    ({"timesteps": 10, "unet": {"n_res_blocks": 2}},
     ["model.params.timesteps: checkpoint 20, config 10",
      "model.params.unet_rosinality_config.params.n_res_blocks: checkpoint 1, config 2"]),
])
def test_what_the_weights_depend_on_must_match(hparams, params, expected):
    model = model_with(**params)
    assert resume_mismatches(model, hparams) == expected
    with pytest.raises(CheckpointError, match=rf"^run\.ckpt: cannot resume this run from it: .*"
                                              rf"{re.escape('; '.join(expected))} \(only .*learning_rate.* may change"):
        check_resume_hparams(model, {"hyper_parameters": hparams}, "run.ckpt")


def test_defaults_written_out_or_left_out_are_the_same(hparams):
    older = {k: v for k, v in copy.deepcopy(hparams).items() if k not in ("min_snr_gamma", "betas")}
    older["val_denoise_steps"] = 10  # a retired hyper-parameter of an earlier version
    written = model_with(unet={"attn_heads": 1, "out_channel": 1, "fold": 1})  # the UNet's defaults
    assert resume_mismatches(written, older) == []
    older["unet_rosinality_config"]["params"]["channel_multiplier"] = (1, 2)  # a tuple is the list
    assert resume_mismatches(model_with(unet={"attn_heads": 2, "use_checkpoint": True, "dropout": 0.3}), older) == [
        "model.params.unet_rosinality_config.params.attn_heads: checkpoint 1, config 2"]


def test_another_model_class_is_named(hparams):
    unet_cfg = tiny_model_cfg()["params"]["unet_rosinality_config"]
    unet_cfg["params"]["in_channel"] = 1
    supervised = instantiate_from_configs({"target": "models.supervised_unet.SupervisedUNet",
                                           "params": {"unet_rosinality_config": unet_cfg}}, "model")
    assert resume_mismatches(supervised, hparams) == [
        "model.target: checkpoint holds a ConditionDDPM, config builds a SupervisedUNet"]


def fit(model, run_dir, ckpt_path=None, steps=2):
    run = OmegaConf.create({"trainer": {"max_steps": steps, "accelerator": "cpu", "limit_val_batches": 0,
                                        "enable_progress_bar": False, "enable_model_summary": False},
                            "logging": {"logger": "csv", "checkpoint_every_n_steps": 1}})
    trainer = build_trainer(run, run_dir)
    x = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    trainer.fit(model, train_dataloaders=DataLoader([{"x_prior": v, "x_cond": v} for v in x], batch_size=4),
                ckpt_path=ckpt_path)
    return trainer


def test_trainer_resume_refuses_other_timesteps_before_restoring_anything(tmp_path):
    torch.manual_seed(0)
    fit(model_with(), tmp_path / "first")
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    assert last.is_file()
    model = model_with(timesteps=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(last))}: cannot resume this run from it: .*"
                                              r"model\.params\.timesteps: checkpoint 20, config 10 \(only"):
        fit(model, tmp_path / "second", ckpt_path=str(last), steps=3)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing restored
    # another learning rate resumes (and continues the step count)
    trainer = fit(model_with(learning_rate=5e-4), tmp_path / "third", ckpt_path=str(last), steps=3)
    assert trainer.global_step == 3
