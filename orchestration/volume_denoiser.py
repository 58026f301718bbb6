"""Denoise a whole CT/MR volume slice by slice with a trained ConditionDDPM.

NIfTI file or DICOM series folder in, NIfTI out in the input's units (HU stays HU, MR
scanner units stay scanner units), with the input's shape, affine and header (a DICOM
series gets the affine of its geometry); a DICOM series in can also give a DICOM series out
(new UIDs, the input's geometry and stored representation; ``utils.dicom_writer``). Slices
are cut in the plane asked for (default the acquisition plane), scaled to [0,1] like the
training data (utils.intensity), denoised in batches from the matched start and mapped back.
Slices larger than ``tile`` pixels are cut into overlapping tiles whose outputs are blended
with linear ramps, so no seam shows.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from models.ddpm_conditioned import ConditionDDPM
from diffusion_modules.diffusion_utils.noise_level import estimate_noise_sigma
from utils.atomic import atomic_write
from utils.dicom_writer import check_output_folder, check_writable, write_dicom_series
from utils.intensity import check_modality, normalize, to_physical
from utils.planes import ACQUISITION, PLANE_AXES, PLANES, acquisition_plane, cut_plane
from utils.volume_io import from_ras_array, ras_array, read_dicom_series, read_image


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of ``tile`` pixels covering ``length`` with at least ``overlap``."""
    if length <= tile:
        return [0]
    step = tile - overlap
    starts = list(range(0, length - tile, step)) + [length - tile]
    return sorted(set(starts))


def ramp(size: int, overlap: int) -> np.ndarray:
    """1-D blending weights: linear ramps of ``overlap`` pixels at both ends, 1 inside."""
    w = np.ones(size, dtype=np.float64)
    if overlap > 0 and size > 2 * overlap:
        edge = (np.arange(overlap) + 0.5) / overlap
        w[:overlap], w[-overlap:] = edge, edge[::-1]
    return w


def denoise_slices(model: ConditionDDPM, slices01: np.ndarray, sigma: float, *, steps: int = 10,
                   n_samples: int = 1, eta: float = 0.0, batch_size: int = 8, tile: int = 256,
                   overlap: int = 32, generator: torch.Generator | None = None, progress: bool = True):
    """(mean01, std01) of (S, H, W) slices on the [0,1] scale, denoised from the matched start.

    Every slice is cut into tiles of at most ``tile`` x ``tile`` pixels overlapping by at
    least ``overlap``; all tiles share one shape, so they are batched across slices. A slice
    that fits in one tile is denoised in one pass."""
    if overlap < 0 or tile < 2 * overlap + 1:
        raise ValueError(f"tile={tile} must exceed twice overlap={overlap} >= 0")
    s, h, w = slices01.shape
    th, tw = min(tile, h), min(tile, w)
    tiles = [(z, r, c) for z in range(s) for r in tile_starts(h, th, overlap) for c in tile_starts(w, tw, overlap)]
    weight = np.outer(ramp(th, overlap if th < h else 0), ramp(tw, overlap if tw < w else 0))
    acc = np.zeros((s, h, w)), np.zeros((s, h, w)), np.zeros((s, h, w))  # sum w*mean, w*var, w
    bar = tqdm(total=len(tiles), desc="denoise", unit="tile", disable=not progress)
    for start in range(0, len(tiles), batch_size):
        chunk = tiles[start:start + batch_size]
        batch = np.stack([slices01[z, r:r + th, c:c + tw] for z, r, c in chunk])
        noisy = torch.from_numpy(2.0 * batch[:, None] - 1.0).float()
        mean, std = model.denoise(noisy, steps=steps, eta=eta, n_samples=n_samples, t_start="auto", sigma=sigma,
                                  return_std=True, batch_size=batch_size * n_samples, generator=generator)
        mean01 = ((mean[:, 0].double().cpu().numpy() + 1.0) / 2.0).clip(0.0, 1.0)
        var01 = (std[:, 0].double().cpu().numpy() / 2.0) ** 2
        for (z, r, c), m, v in zip(chunk, mean01, var01):
            acc[0][z, r:r + th, c:c + tw] += weight * m
            acc[1][z, r:r + th, c:c + tw] += weight * v
            acc[2][z, r:r + th, c:c + tw] += weight
        bar.update(len(chunk))
    bar.close()
    return (acc[0] / acc[2]).astype(np.float32), np.sqrt(acc[1] / acc[2]).astype(np.float32)


def _uncut_plane(slices: np.ndarray, plane: str) -> np.ndarray:
    """Inverse of utils.planes.cut_plane: (S, H, W) slices back to the (X, Y, Z) RAS array."""
    volume = np.ascontiguousarray(slices[:, ::-1, ::-1])
    return volume.transpose(np.argsort(PLANE_AXES[plane]))


def _write_like(reference, ras_values: np.ndarray, path: Path) -> Path:
    """Write RAS values as a float32 NIfTI with the reference image's shape, affine and header."""
    import nibabel as nib

    data = from_ras_array(reference, ras_values).astype(np.float32)
    header = reference.header.copy()
    header.set_data_dtype(np.float32)
    out = nib.Nifti1Image(data, reference.affine, header)
    out.header.set_slope_inter(1.0, 0.0)
    return atomic_write(path, lambda tmp: nib.save(out, tmp))


def check_dicom_output(input_path, output_dicom) -> None:
    """Refuse a DICOM series output before any work: the input must be a DICOM series
    folder, the output folder new or empty and not inside the input folder."""
    src, out = Path(input_path), Path(output_dicom)
    if not src.exists():
        raise FileNotFoundError(f"input path does not exist: {src}")
    if not src.is_dir():
        raise ValueError(f"a DICOM series output needs a DICOM series folder as input, {src} is a file "
                         "(write NIfTI output only)")
    if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
        raise ValueError(f"DICOM output folder {out} lies inside the input series folder {src}: choose another")
    check_output_folder(out)


def denoise_volume(model: ConditionDDPM, input_path, output_path, *, std_path=None, output_dicom=None,
                   modality: str | None = None, sigma="auto", steps: int = 10, n_samples: int = 1,
                   eta: float = 0.0, plane: str = ACQUISITION, batch_size: int = 8, tile: int = 256,
                   overlap: int = 32, seed: int = 0, progress: bool = True) -> dict:
    """Denoise a NIfTI file or DICOM series folder into ``output_path`` (and the per-voxel std
    of ``n_samples`` samples into ``std_path``), both in the input's units; with
    ``output_dicom`` (a DICOM series folder input only) also a DICOM series into that new or
    empty folder, one file per input slice (see ``utils.dicom_writer``).

    sigma: the noise std on the [0,1] scale of the training data, or "auto" to estimate it.
    Returns what was done: sigma ([0,1] and input units), t*, plane, slices, output paths, seconds.
    """
    start = time.time()
    for path in (output_path, std_path):  # checked before any work, so no output is left half done
        if path is not None and not Path(path).name.endswith((".nii", ".nii.gz")):
            raise ValueError(f"output {path} must end in .nii or .nii.gz")
    if output_dicom is not None:
        check_dicom_output(input_path, output_dicom)
    if not isinstance(model, ConditionDDPM):
        raise TypeError(f"the checkpoint holds a {type(model).__name__}, not a ConditionDDPM")
    if output_dicom is None:
        img, found = read_image(input_path)
    else:
        img, found, files = read_dicom_series(Path(input_path))
        check_writable(files)
    modality = check_modality(modality or found or "")
    ras, zooms = ras_array(img, input_path)
    plane = acquisition_plane(zooms) if plane == ACQUISITION else plane
    if plane not in PLANES:
        raise ValueError(f"plane {plane!r} unknown: expected one of {PLANES} or '{ACQUISITION}'")
    _, norm = normalize(ras, modality)
    # the model saw noisy inputs that were not clipped to [0,1]: scale without clipping
    ras01 = (ras - np.float32(norm["low"])) / np.float32(norm["high"] - norm["low"])
    slices01 = np.ascontiguousarray(cut_plane(ras01, zooms, plane)[0], dtype=np.float32)
    if sigma == "auto":
        sigma = estimate_noise_sigma(slices01, foreground=modality == "mr")  # MR magnitude: Rician
    sigma = float(sigma)
    if not np.isfinite(sigma) or sigma < 0:
        raise ValueError(f"sigma must be 'auto' or a finite number >= 0 on the [0, 1] scale, got {sigma}")
    t_star = model.start_timestep("auto", sigma)
    info = {"modality": modality, "plane": plane, "slices": int(slices01.shape[0]), "sigma01": sigma,
            "sigma_units": sigma * (norm["high"] - norm["low"]), "t_star": t_star}
    generator = torch.Generator(device=model.device).manual_seed(int(seed))
    mean01, std01 = denoise_slices(model, slices01, sigma, steps=steps, n_samples=n_samples, eta=eta,
                                   batch_size=batch_size, tile=tile, overlap=overlap, generator=generator,
                                   progress=progress)
    mean = to_physical(_uncut_plane(mean01, plane), norm)
    info["output"] = _write_like(img, mean, Path(output_path))
    if std_path is not None:
        std_units = _uncut_plane(std01, plane) * np.float32(norm["high"] - norm["low"])
        info["std"] = _write_like(img, std_units, Path(std_path))
    if output_dicom is not None:
        derivation = (f"denoised by CDM4MI (conditional diffusion model, DDIM from the matched start "
                      f"t*={t_star}): sigma {sigma:.4g} on the [0,1] scale, {min(steps, t_star + 1)} steps, "
                      f"{n_samples} sample(s), eta {eta}, {plane} slices")
        info["output_dicom"] = write_dicom_series(output_dicom, from_ras_array(img, mean), files, Path(input_path),
                                                  derivation)
    info["seconds"] = time.time() - start
    return info
