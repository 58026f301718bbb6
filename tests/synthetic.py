"""Synthetic NIfTI volumes and a tiny model config shared by the tests."""
import nibabel as nib
import numpy as np


def make_volume(path, modality, n_slices=20, seed=0):
    """(X=40, Y=36, Z) volume: CT in HU or MR in scanner units, tissue in the middle."""
    rng = np.random.default_rng(seed)
    if modality == "ct":
        data = np.full((40, 36, n_slices), -1024, dtype=np.int16)
        data[4:36, 4:32, :] = rng.integers(-100, 1500, size=(32, 28, n_slices))
    else:
        data = np.zeros((40, 36, n_slices), dtype=np.uint8)
        data[4:36, 4:32, :] = rng.integers(20, 250, size=(32, 28, n_slices))
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    return path


UNET = "diffusion_modules.unet_arch.unet_rosinality.UNet"


def tiny_model_cfg() -> dict:
    """A ConditionDDPM config small enough to build in milliseconds (T=20, 8 channels)."""
    return {"target": "models.ddpm_conditioned.ConditionDDPM",
            "params": {"image_size": 16, "timesteps": 20,
                       "unet_rosinality_config": {"target": UNET, "params": {
                           "in_channel": 2, "channel": 8, "channel_multiplier": [1, 2], "n_res_blocks": 1,
                           "attn_strides": [], "dropout": 0.0}}}}
