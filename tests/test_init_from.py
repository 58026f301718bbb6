"""``init_from:``: a run starts from the network weights of another checkpoint (the way the
shipped models were fine-tuned with augmentation), EMA copy included; wrong class or UNet
shape and a missing file fail with errors naming the file, before a run folder is made."""
import pytest
import torch

from models.ddpm_conditioned import ConditionDDPM
from models.supervised_unet import SupervisedUNet
from orchestration.checkpoints import CheckpointError, export_inference_checkpoint
from orchestration.training import init_weights

UNET = "diffusion_modules.unet_arch.unet_rosinality.UNet"


def unet(in_channel, channel=8):
    return {"target": UNET, "params": {"in_channel": in_channel, "channel": channel, "out_channel": 1,
                                       "channel_multiplier": [1, 2], "n_res_blocks": 1, "attn_strides": []}}


def saved(model, path):
    """A full Lightning-style checkpoint of ``model`` at ``path``."""
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, path)
    return path


def test_full_checkpoint_starts_both_unet_and_ema_from_its_ema_weights(tmp_path):
    torch.manual_seed(0)
    source = ConditionDDPM(unet_rosinality_config=unet(2), image_size=16, timesteps=50)
    with torch.no_grad():
        for p in source.unet_ema.parameters():
            p.add_(1.0)  # EMA weights differ from the raw ones, so the test sees which were taken
    target = ConditionDDPM(unet_rosinality_config=unet(2), image_size=16, timesteps=50)
    init_weights(target, saved(source, tmp_path / "full.ckpt"))
    for ours, ema, theirs in zip(target.unet.parameters(), target.unet_ema.parameters(),
                                 source.unet_ema.parameters()):
        assert torch.equal(ours, theirs) and torch.equal(ema, theirs)
    assert int(target.ema_updates) == 0  # the EMA warm-up starts afresh


def test_exported_fp16_checkpoint_gives_its_weights_in_float32(tmp_path):
    torch.manual_seed(1)
    source = SupervisedUNet(unet_rosinality_config=unet(1))
    exported = export_inference_checkpoint(saved(source, tmp_path / "full.ckpt"), tmp_path / "small.ckpt")
    target = SupervisedUNet(unet_rosinality_config=unet(1))
    init_weights(target, exported)
    for ours, theirs in zip(target.unet.parameters(), source.unet.parameters()):
        assert ours.dtype == torch.float32
        assert torch.equal(ours, theirs.half().float())


def test_wrong_class_or_shape_names_the_file(tmp_path):
    ddpm = ConditionDDPM(unet_rosinality_config=unet(2), image_size=16, timesteps=50)
    path = saved(SupervisedUNet(unet_rosinality_config=unet(1)), tmp_path / "unet.ckpt")
    with pytest.raises(CheckpointError, match=r"unet\.ckpt holds a SupervisedUNet.*trains a ConditionDDPM"):
        init_weights(ddpm, path)
    wider = saved(ConditionDDPM(unet_rosinality_config=unet(2, channel=16), image_size=16, timesteps=50),
                  tmp_path / "wider.ckpt")
    with pytest.raises(CheckpointError, match=r"wider\.ckpt does not fit the configured UNet"):
        init_weights(ddpm, wider)
    with pytest.raises(FileNotFoundError, match="no_such.ckpt"):
        init_weights(ddpm, tmp_path / "no_such.ckpt")


def test_missing_init_from_fails_before_a_run_folder_is_made(tmp_path):
    from orchestration.run_job import run_job
    from utils.initialize_configs import load_config

    cfg = load_config("run_scripts/configs/ddpm-cond/bundled_ct_mr.yaml",
                      [f"init_from={tmp_path / 'missing.ckpt'}", f"logging.save_dir={tmp_path / 'runs'}"])
    with pytest.raises(FileNotFoundError, match="init_from: checkpoint not found: .*missing.ckpt"):
        run_job(cfg)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("cls, base_in", [(ConditionDDPM, 2), (SupervisedUNet, 1)])
def test_a_k0_checkpoint_starts_a_2p5d_model_that_ignores_its_neighbours_at_first(tmp_path, cls, base_in):
    """Fine-tuning a 2.5D model from a single-slice one: the added condition channels start
    at zero weight, so the widened network gives the narrow one's output whatever the
    neighbours hold; the trained channels keep their weights."""
    kw = {"image_size": 16, "timesteps": 50} if cls is ConditionDDPM else {}
    torch.manual_seed(2)
    narrow = cls(unet_rosinality_config=unet(base_in), **kw)
    path = saved(narrow, tmp_path / "k0.ckpt")
    wide = cls(unet_rosinality_config=unet(base_in + 4), context_slices=2, **kw)
    init_weights(wide, path)
    x = torch.randn(2, base_in, 16, 16)
    t = torch.tensor([3, 40])
    neighbours = torch.randn(2, 4, 16, 16) * 5
    with torch.no_grad():
        ref = (narrow.unet_ema if cls is ConditionDDPM else narrow.unet)(x, t)
        out = wide.unet(torch.cat([x, neighbours], 1), t)
    assert torch.allclose(out, ref, atol=1e-6)
    assert wide.unet.conv_in.weight[:, base_in:].abs().max() == 0
    # a 2.5D checkpoint does not start a narrower model
    with pytest.raises(CheckpointError, match=r"k2\.ckpt.*does not fit"):
        init_weights(cls(unet_rosinality_config=unet(base_in), **kw), saved(wide, tmp_path / "k2.ckpt"))
    # a narrower checkpoint of another width cannot be widened: the error names the file
    other = saved(cls(unet_rosinality_config=unet(base_in, channel=16), **kw), tmp_path / "k0_wide.ckpt")
    with pytest.raises(CheckpointError, match=r"k0_wide\.ckpt, a 0-neighbour checkpoint, cannot start a 2-neighbour"):
        init_weights(cls(unet_rosinality_config=unet(base_in + 4), context_slices=2, **kw), other)
