"""Training speed keys of the trainer section (fused_adamw, pin_memory, channels_last,
compile_unet): checked like Lightning's keys and kept from it; on the CPU the defaults change
nothing and each option does what it says; on a CUDA GPU (skipped without one) a short run
with all of them and bf16 trains and saves the usual checkpoint."""
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from orchestration.config_checks import check_run_config
from orchestration.training import apply_training_speed, build_trainer, train
from synthetic import tiny_model_cfg
from test_logging import tiny_run_cfg
from utils.initialize_configs import ConfigError, instantiate_from_configs
from utils.optim import FUSED_ADAMW, adamw_warmup_cosine, use_fused


class Loaders:
    """The loader methods of a data module."""

    def train_dataloader(self):
        return DataLoader(list(range(4)), batch_size=2)

    def val_dataloader(self):
        return DataLoader(list(range(4)), batch_size=2)


def tiny_model():
    return instantiate_from_configs(tiny_model_cfg(), "model")


def test_speed_keys_are_checked_and_kept_from_lightning(tmp_path):
    cfg = {"trainer": {"max_steps": 1, "accelerator": "cpu", "fused_adamw": None, "pin_memory": True,
                       "channels_last": True, "compile_unet": False}}
    check_run_config(cfg)
    for key, value, match in [("fused_adamw", "on", r"trainer\.fused_adamw: expected bool or null, got 'on'"),
                              ("compile_unet", None, r"trainer\.compile_unet: expected bool, got None"),
                              ("compile", True, r"trainer\.compile: unknown key")]:
        with pytest.raises(ConfigError, match=match):
            check_run_config({"trainer": {key: value}})
    trainer = build_trainer(OmegaConf.create({**cfg, "logging": {"logger": "csv"}}), tmp_path)  # Lightning
    assert trainer.max_steps == 1  # accepted the rest


def test_fused_adamw_is_automatic_on_a_gpu_only_follows_the_context_and_steps_like_adamw():
    torch.manual_seed(0)
    plain = [torch.nn.Parameter(torch.randn(8, 4)), torch.nn.Parameter(torch.randn(4))]
    assert not use_fused(plain) and use_fused(plain, True) and not use_fused([], None)
    opt = adamw_warmup_cosine(plain, 1e-2, 0.01, 0, 0.1, 10)["optimizer"]
    assert not opt.defaults["fused"]  # CPU default: torch's plain AdamW, as before
    fused_params = [torch.nn.Parameter(p.detach().clone()) for p in plain]
    token = FUSED_ADAMW.set(True)  # what orchestration.training sets from trainer.fused_adamw
    try:
        fused = adamw_warmup_cosine(fused_params, 1e-2, 0.01, 0, 0.1, 10)["optimizer"]
    finally:
        FUSED_ADAMW.reset(token)
    assert fused.defaults["fused"] is True and FUSED_ADAMW.get() is None
    for step in range(3):
        for params in (plain, fused_params):
            for i, p in enumerate(params):
                p.grad = torch.full_like(p, 0.1 * (i + 1) * (step + 1))
        opt.step()
        fused.step()
    for a, b in zip(plain, fused_params):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)  # the same update, one kernel


def test_the_defaults_change_nothing_on_cpu_and_turn_fused_and_pinned_on_for_a_gpu():
    model, data = tiny_model(), Loaders()
    methods = (data.train_dataloader, data.val_dataloader)
    speed = apply_training_speed(OmegaConf.create({"trainer": {}}), model, data, on_cuda=False)
    assert speed == {"fused_adamw": False, "pin_memory": False, "channels_last": False, "compile_unet": False}
    assert (data.train_dataloader, data.val_dataloader) == methods and not data.train_dataloader().pin_memory
    assert all(p.is_contiguous() for p in model.parameters())
    speed = apply_training_speed(OmegaConf.create({"trainer": {"pin_memory": None}}), model, data, on_cuda=True)
    assert speed == {"fused_adamw": True, "pin_memory": True, "channels_last": False, "compile_unet": False}
    assert data.train_dataloader().pin_memory and data.val_dataloader().pin_memory
    off = apply_training_speed(OmegaConf.create({"trainer": {"fused_adamw": False, "pin_memory": False}}),
                               tiny_model(), Loaders(), on_cuda=True)
    assert not off["fused_adamw"] and not off["pin_memory"]


def test_channels_last_and_compile_keep_the_checkpoint_keys():
    model = tiny_model()
    keys = list(model.state_dict())
    cfg = OmegaConf.create({"trainer": {"channels_last": True, "compile_unet": True}})
    apply_training_speed(cfg, model, Loaders(), on_cuda=False)
    convs = [p for p in model.parameters() if p.ndim == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert model.unet._compiled_call_impl is not None  # compiled in place (nn.Module.compile), lazily
    assert list(model.state_dict()) == keys  # no _orig_mod. prefix: checkpoints load as before


def train_and_check(cfg: dict, tmp_path, steps: int):
    """Train the run config ``cfg``; the model trained ``steps`` steps with fused AdamW, and
    its checkpoint holds finite weights with the usual keys and shapes."""
    cfg = OmegaConf.create(cfg)
    check_run_config(cfg)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    model, _, ckpt = train(cfg, run_dir)
    assert model.trainer.optimizers[0].defaults["fused"] is True and model.trainer.global_step == steps
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    tiny_model().load_state_dict(state)
    return model


def test_a_cpu_run_with_channels_last_and_fused_adamw_trains(tmp_path):
    cfg = tiny_run_cfg(tmp_path, "csv")
    cfg["trainer"].update(channels_last=True, fused_adamw=True, max_steps=2, val_check_interval=2)
    model = train_and_check(cfg, tmp_path, steps=2)
    assert model.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_run_with_every_speed_option_and_bf16_trains(tmp_path):
    cfg = tiny_run_cfg(tmp_path, "csv")
    cfg["trainer"].update(accelerator="gpu", devices=1, precision="bf16-mixed", channels_last=True,
                          compile_unet=True, max_steps=4)
    cfg["data"]["params"]["num_workers"] = 2  # persistent workers, pinned memory (automatic on CUDA)
    train_and_check(cfg, tmp_path, steps=4)
