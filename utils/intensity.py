"""Intensity normalization between physical units (HU, scanner units) and [0,1].

CT: a fixed HU window (default -1024..3071 HU) maps linearly to [0,1].
MR: the 0.5 and 99.5 percentiles of the nonzero voxels map to 0 and 1.
Values outside the window are clipped. The returned ``norm`` dict
{"modality": "ct"|"mr", "low": float, "high": float} (physical units) is stored
with the data so that predictions can be mapped back with :func:`to_physical`.
"""

import numpy as np

MODALITIES = ("ct", "mr")
CT_WINDOW_HU = (-1024.0, 3071.0)
MR_PERCENTILES = (0.5, 99.5)


def check_modality(modality: str) -> str:
    """Return the modality in lower case, or raise ValueError if it is not ct/mr."""
    if not isinstance(modality, str) or modality.lower() not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}: expected one of {MODALITIES}")
    return modality.lower()


def normalize(
    volume: np.ndarray,
    modality: str,
    ct_window: tuple[float, float] = CT_WINDOW_HU,
    mr_percentiles: tuple[float, float] = MR_PERCENTILES,
) -> tuple[np.ndarray, dict]:
    """Map a volume in physical units to float32 [0,1]; return (x01, norm).

    ct_window: (low, high) in HU for CT. mr_percentiles: percentiles (in %) of the
    nonzero voxels that become 0 and 1 for MR.
    """
    modality = check_modality(modality)
    volume = np.asarray(volume, dtype=np.float32)
    if modality == "ct":
        low, high = float(ct_window[0]), float(ct_window[1])
    else:
        nonzero = volume[volume != 0]
        if nonzero.size == 0:
            raise ValueError("MR volume has no nonzero voxel: cannot choose a percentile window")
        low, high = (float(v) for v in np.percentile(nonzero, mr_percentiles))
    if not high > low:
        raise ValueError(f"{modality} intensity window is empty: low={low}, high={high}")
    x01 = np.clip((volume - low) / (high - low), 0.0, 1.0).astype(np.float32)
    return x01, {"modality": modality, "low": low, "high": high}


def to_physical(x01: np.ndarray, norm: dict) -> np.ndarray:
    """Map [0,1] values back to physical units (HU for CT): low + x01 * (high - low),
    computed in float64, returned as float32."""
    low, high = float(norm["low"]), float(norm["high"])
    return (low + np.asarray(x01, dtype=np.float64) * (high - low)).astype(np.float32)
