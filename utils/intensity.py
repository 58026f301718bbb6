"""Intensity normalization between physical units (HU, scanner units) and [0,1].

CT: a fixed HU window (default -1024..3071 HU) maps linearly to [0,1].
MR: the 0.5 and 99.5 percentiles of the foreground voxels map to 0 and 1 (see
:func:`mr_foreground`: the nonzero voxels less the background, so the window does not
depend on how much noisy, nonzero background a scan has).
Values outside the window are clipped. The returned ``norm`` dict
{"modality": "ct"|"mr", "low": float, "high": float} (physical units) is stored
with the data so that predictions can be mapped back with :func:`to_physical`.
"""

import numpy as np
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu

MODALITIES = ("ct", "mr")
CT_WINDOW_HU = (-1024.0, 3071.0)
MR_PERCENTILES = (0.5, 99.5)


def check_modality(modality: str) -> str:
    """Return the modality in lower case, or raise ValueError if it is not ct/mr."""
    if not isinstance(modality, str) or modality.lower() not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}: expected one of {MODALITIES}")
    return modality.lower()


def _border_connected(mask: np.ndarray) -> np.ndarray:
    """The parts of a 2-D mask connected (4-neighbourhood) to the image border."""
    labels, _ = ndi.label(mask)
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    return np.isin(labels, edge[edge > 0])


def mr_foreground(volume: np.ndarray) -> np.ndarray:
    """Boolean foreground mask of an MR image (2-D) or volume (3-D, any axis order).

    t = Otsu threshold of the nonzero voxels. A "dark" voxel is nonzero and <= t. The
    background is every dark voxel connected, through dark voxels (4-neighbourhood), to
    the border of its 2-D slice, in the slices along every axis of a volume (so a slab
    cut through the head, open at its cut faces, keeps the dark tissue that the slices
    of another axis enclose): the noise floor around the head. The foreground is the
    remaining nonzero voxels. Dark tissue inside the head (CSF, bone) is enclosed by
    brighter tissue and stays; a background already set to zero is never crossed, so
    such volumes keep the window of the plain nonzero rule (exactly, unless the head
    touches the image border). Falls back to all nonzero voxels if nothing would remain.
    """
    volume = np.asarray(volume, dtype=np.float32)
    nonzero = volume != 0
    if not nonzero.any():
        return nonzero
    t = threshold_otsu(volume[nonzero])
    dark = nonzero & (volume <= t)
    if volume.ndim == 2:
        background = _border_connected(dark)
    elif volume.ndim == 3:
        background = dark
        for axis in range(3):
            slices = np.moveaxis(dark, axis, 0)
            background = background & np.moveaxis(np.stack([_border_connected(d) for d in slices]), 0, axis)
    else:
        raise ValueError(f"MR foreground needs a 2-D or 3-D array, got shape {volume.shape}")
    foreground = nonzero & ~background
    return foreground if foreground.any() else nonzero


def normalize(
    volume: np.ndarray,
    modality: str,
    ct_window: tuple[float, float] = CT_WINDOW_HU,
    mr_percentiles: tuple[float, float] = MR_PERCENTILES,
) -> tuple[np.ndarray, dict]:
    """Map a volume in physical units to float32 [0,1]; return (x01, norm).

    ct_window: (low, high) in HU for CT. mr_percentiles: percentiles (in %) of the
    foreground voxels (:func:`mr_foreground`) that become 0 and 1 for MR.
    """
    modality = check_modality(modality)
    volume = np.asarray(volume, dtype=np.float32)
    if modality == "ct":
        low, high = float(ct_window[0]), float(ct_window[1])
    else:
        if not np.any(volume != 0):
            raise ValueError("MR volume has no nonzero voxel: cannot choose a percentile window")
        foreground = volume[mr_foreground(volume)]
        low, high = (float(v) for v in np.percentile(foreground, mr_percentiles))
    if not high > low:
        raise ValueError(f"{modality} intensity window is empty: low={low}, high={high}")
    x01 = np.clip((volume - low) / (high - low), 0.0, 1.0).astype(np.float32)
    return x01, {"modality": modality, "low": low, "high": high}


def to_physical(x01: np.ndarray, norm: dict) -> np.ndarray:
    """Map [0,1] values back to physical units (HU for CT): low + x01 * (high - low),
    computed in float64, returned as float32."""
    low, high = float(norm["low"]), float(norm["high"])
    return (low + np.asarray(x01, dtype=np.float64) * (high - low)).astype(np.float32)
