"""Helpers shared by the tests: synthetic volumes and DICOM slices, a tiny model config, run_scripts loading."""
import importlib.util
from pathlib import Path

import h5py
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


def write_dicom_slice(path, series_uid, position, orientation=(1, 0, 0, 0, 1, 0), pixels=None,
                      spacing=(0.7, 0.6), intercept=-1024):
    """One CT DICOM file (int16 pixels, HU = pixels + intercept) of a series."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    pixels = np.full((20, 24), 1024, dtype=np.int16) if pixels is None else np.asarray(pixels, dtype=np.int16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.SeriesInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, series_uid
    ds.Modality = "CT"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelSpacing = list(spacing)
    ds.ImageOrientationPatient = list(orientation)
    ds.ImagePositionPatient = list(position)
    ds.RescaleSlope, ds.RescaleIntercept = 1, intercept
    ds.PixelData = pixels.tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return path


def load_script(filename: str):
    """A script of run_scripts/ (file names with dashes included) as a module."""
    path = Path(__file__).resolve().parents[1] / "run_scripts" / filename
    spec = importlib.util.spec_from_file_location(path.stem.replace("-", "_"), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_h5(path, volume01, size=32, stride=16):
    """A minimal HDF5 patch file (the layout of save_as_hdf5) of a (Z, H, W) [0,1] volume,
    patches of ``size`` every ``stride`` pixels of every slice."""
    vol = np.round(np.asarray(volume01) * 65535.0).astype(np.uint16)
    rows = [(z, r, c) for z in range(vol.shape[0]) for r in range(0, vol.shape[1] - size + 1, stride)
            for c in range(0, vol.shape[2] - size + 1, stride)]
    with h5py.File(path, "w") as f:
        f["volume"] = vol
        f["patches"] = np.stack([vol[z, r : r + size, c : c + size] for z, r, c in rows])
        f["slice_index"] = np.array([z for z, _, _ in rows], dtype=np.int32)
        f["origin"] = np.array([(r, c) for _, r, c in rows], dtype=np.int32)
        f.attrs.update(modality="mr", norm_low=0.0, norm_high=1.0, spacing=[1.0, 1.0, 1.0], source=path.name)
    return path
