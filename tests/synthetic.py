"""Synthetic NIfTI volumes shared by the tests."""
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
