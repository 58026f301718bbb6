"""Intensity normalization between physical units (HU, scanner units) and [0,1].

CT: a fixed HU window (default -1024..3071 HU) maps linearly to [0,1].
MR: the 0.5 and 99.5 percentiles of the foreground voxels map to 0 and 1 (see
:func:`mr_foreground`: the nonzero voxels less the background, so the window does not
depend on how much noisy, nonzero background a scan has).
Values outside the window are clipped (:func:`normalize`; :func:`window_weight` is how
``denoise.py`` passes them through instead). The returned ``norm`` dict
{"modality": "ct"|"mr", "low": float, "high": float} (physical units) is stored
with the data so that predictions can be mapped back with :func:`to_physical`.
"""

import numpy as np
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu

MODALITIES = ("ct", "mr")
CT_WINDOW_HU = (-1024.0, 3071.0)
MR_PERCENTILES = (0.5, 99.5)
#: Telling CT from MR by intensity (:func:`modality_from_intensities`): HU of air, the share
#: of voxels there that means CT, and how far below 0 (times the maximum) MR may reach
AIR_HU = (-1100.0, -900.0)
MIN_AIR_SHARE = 0.02
MR_NEGATIVE_TOLERANCE = 0.01


def check_modality(modality: str) -> str:
    """Return the modality in lower case, or raise ValueError if it is not ct/mr."""
    if not isinstance(modality, str) or modality.lower() not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}: expected one of {MODALITIES}")
    return modality.lower()


def modality_from_intensities(volume: np.ndarray) -> tuple[str | None, str]:
    """Tell CT from MR by the values of a volume in physical units: ("ct" | "mr" | None, why).

    CT: at least 2 % of the finite voxels lie in -1100..-900, air in HU (a head CT has
    30-60 %; the minimum may be -1024 or a padding value such as -3024). MR: otherwise, no
    value below -1 % of the maximum (magnitude images are non-negative; interpolation may
    leave small negatives). Anything else (e.g. a CT without air, or values stored without
    their HU intercept that look negative but not like air) is None: it cannot be told.
    """
    v = np.asarray(volume, dtype=np.float32)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return None, "the volume has no finite voxel"
    lo, hi = float(v.min()), float(v.max())
    air = float(np.mean((v >= AIR_HU[0]) & (v <= AIR_HU[1])))
    if air >= MIN_AIR_SHARE:
        return "ct", (f"{100 * air:.0f} % of the voxels lie in {AIR_HU[0]:g}..{AIR_HU[1]:g}, air in HU "
                      f"(values {lo:g} .. {hi:g})")
    if lo >= 0 or (hi > 0 and lo >= -MR_NEGATIVE_TOLERANCE * hi):
        return "mr", (f"no air in HU ({100 * air:.1f} % of the voxels in {AIR_HU[0]:g}..{AIR_HU[1]:g}) and no "
                      f"negative values (values {lo:g} .. {hi:g}): an MR magnitude image")
    return None, (f"values {lo:g} .. {hi:g}: negative, yet only {100 * air:.1f} % of the voxels in "
                  f"{AIR_HU[0]:g}..{AIR_HU[1]:g} (air in HU)")


def window_weight(x01: np.ndarray, inner: float, outer: float) -> np.ndarray:
    """Per-voxel weight of a denoised value against the input, from the input on the [0,1]
    scale of its intensity window and its distance d outside [0, 1]: 1 for d <= ``inner``,
    0 for d >= ``outer``, linear in between, so that a blend is continuous in the input
    (``outer`` 0: 1 inside the window, 0 outside). float32."""
    if not 0 <= inner <= outer:
        raise ValueError(f"window_weight needs 0 <= inner <= outer, got inner={inner}, outer={outer}")
    x = np.asarray(x01, dtype=np.float32)
    outside = np.maximum(np.maximum(-x, x - 1.0), 0.0)  # distance outside the window
    if outer == inner:
        return (outside <= inner).astype(np.float32)
    return np.clip((np.float32(outer) - outside) / np.float32(outer - inner), 0.0, 1.0).astype(np.float32)


def intensity_window(volume: np.ndarray, modality: str, ct_window: tuple[float, float] = CT_WINDOW_HU,
                     mr_percentiles: tuple[float, float] = MR_PERCENTILES) -> tuple[float, float]:
    """(low, high) in physical units that :func:`normalize` maps to 0 and 1; may be empty
    (low >= high: an MR volume of one foreground intensity; (0, 0) without a nonzero voxel)."""
    modality = check_modality(modality)
    if modality == "ct":
        return float(ct_window[0]), float(ct_window[1])
    volume = np.asarray(volume, dtype=np.float32)
    if not np.any(volume != 0):
        return 0.0, 0.0
    foreground = volume[mr_foreground(volume)]
    low, high = (float(v) for v in np.percentile(foreground, mr_percentiles))
    return low, high


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
    if modality == "mr" and not np.any(volume != 0):
        raise ValueError("MR volume has no nonzero voxel: cannot choose a percentile window")
    low, high = intensity_window(volume, modality, ct_window, mr_percentiles)
    if not high > low:
        raise ValueError(f"{modality} intensity window is empty: low={low}, high={high}")
    return to_unit_range(volume, low, high), {"modality": modality, "low": low, "high": high}


def to_unit_range(volume: np.ndarray, low: float, high: float, clip: bool = True) -> np.ndarray:
    """Physical units to the [0,1] scale of the window (low, high): (v - low) / (high - low)
    in float32, clipped to [0, 1] unless ``clip`` is False (denoising feeds the model noisy
    values beyond the window, as it saw them in training)."""
    x = (np.asarray(volume, dtype=np.float32) - np.float32(low)) / np.float32(high - low)
    return np.clip(x, 0.0, 1.0) if clip else x


def to_physical(x01: np.ndarray, norm: dict) -> np.ndarray:
    """Map [0,1] values back to physical units (HU for CT): low + x01 * (high - low),
    computed in float64, returned as float32."""
    low, high = float(norm["low"]), float(norm["high"])
    return (low + np.asarray(x01, dtype=np.float64) * (high - low)).astype(np.float32)


def to_model_units(x01):
    """[0,1] image values (numpy array or torch tensor) to the models' [-1,1]: 2 x - 1."""
    return 2.0 * x01 - 1.0


def from_model_units(x):
    """The models' [-1,1] back to the [0,1] scale: (x + 1) / 2 (not clipped)."""
    return (x + 1.0) / 2.0
