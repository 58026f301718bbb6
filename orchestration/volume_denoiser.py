"""Denoise a whole CT/MR volume slice by slice with a trained ConditionDDPM.

NIfTI file or DICOM series folder in, NIfTI out in the input's units (HU stays HU, MR
scanner units stay scanner units), with the input's shape, affine and header (a DICOM
series gets the affine of its geometry); a DICOM series in can also give a DICOM series out
(new UIDs, the input's geometry and stored representation; ``utils.dicom_writer``). Slices
are cut in the plane asked for (default the acquisition plane), scaled to [0,1] like the
training data (utils.intensity), denoised in batches from the matched start and mapped back.
Slices larger than ``tile`` pixels are cut into overlapping tiles whose outputs are blended
with linear ramps, so no seam shows. A 2.5D model (``context_slices`` k > 0) gets each slice
with its k noisy neighbours on each side from the scan itself (diffusion_utils.context order,
reflected at the first and last slice), every tile cut at the same place through the stack.

Only the intensity window (CT -1024..3071 HU, MR the foreground's 0.5-99.5 percentiles) is
denoised: the output is the input + w (denoised - input), w = ``window_weight`` of the
input on the window's [0,1] scale: 1 inside the window and up to 2 sigma outside it (noise
moves a voxel of the window that far out; Gaussian noise beyond 2 sigma 2.3 % of the
time), falling linearly to 0 at 4 sigma outside (EDGE_BAND_SIGMAS), so the output has no
step, and 0 beyond, where the input is kept exactly; MR voxels exactly 0 (zero-filled
background) are kept too. The model sees such kept voxels clipped to the window, as its
training data were (a far-out value, e.g. MR background at -0.6, would disturb the
tissue around it). A sigma below ``negligible_sigma`` of the model (no measurable noise) or an
MR volume of one intensity is no noise: the input is written unchanged.
"""
from __future__ import annotations

import math
import numbers
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from diffusion_modules.diffusion_utils.context import context_indices
from diffusion_modules.diffusion_utils.sampling import capped_steps
from models.ddpm_conditioned import ConditionDDPM
from orchestration.cli import check_writable_folder
from diffusion_modules.diffusion_utils.noise_level import estimate_noise_sigma, negligible_sigma
from utils.atomic import atomic_write
from utils.dicom_writer import check_output_folder, check_writable, write_dicom_series
from utils.intensity import (MODALITIES, check_modality, from_model_units, intensity_window, modality_from_intensities,
                             to_model_units, to_physical, to_unit_range, window_weight)
from utils.planes import ACQUISITION, PLANE_AXES, PLANES, acquisition_plane, cut_plane
from utils.volume_io import from_ras_array, ras_array, read_dicom_series, read_image


#: outside the intensity window, in units of the noise sigma: fully denoised up to the
#: first, passed through from the second, linear in between
EDGE_BAND_SIGMAS = (2.0, 4.0)
#: mm: slices further apart than this get a warning with a 2.5D model, whose training neighbours
#: were 1-1.5 mm apart (docs/RESULTS.md, "Neighbouring slices": it loses to k = 0 from 3 mm on)
THICK_CONTEXT_MM = 2.0


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
                   overlap: int = 32, generator: torch.Generator | None = None, progress: bool = True,
                   inference=None):
    """(mean01, std01) of (S, H, W) slices on the [0,1] scale, denoised from the matched start.

    Every slice is cut into tiles of at most ``tile`` x ``tile`` pixels overlapping by at
    least ``overlap``; all tiles share one shape, so they are batched across slices. A slice
    that fits in one tile is denoised in one pass. A model with ``context_slices`` k > 0
    gets each tile as the (1+2k)-channel stack of the slice and its neighbours in
    ``context_indices`` order (reflected at the ends), cut at the same rows and columns."""
    if overlap < 0 or tile < 2 * overlap + 1:
        raise ValueError(f"tile={tile} must exceed twice overlap={overlap} >= 0")
    s, h, w = slices01.shape
    k = int(getattr(model, "context_slices", 0) or 0)
    stacks = [context_indices(z, k, s) for z in range(s)]  # [z] when k = 0
    th, tw = min(tile, h), min(tile, w)
    tiles = [(z, r, c) for z in range(s) for r in tile_starts(h, th, overlap) for c in tile_starts(w, tw, overlap)]
    weight = np.outer(ramp(th, overlap if th < h else 0), ramp(tw, overlap if tw < w else 0))
    acc = np.zeros((s, h, w)), np.zeros((s, h, w)), np.zeros((s, h, w))  # sum w*mean, w*var, w
    bar = tqdm(total=len(tiles), desc="denoise", unit="tile", disable=not progress)
    for start in range(0, len(tiles), batch_size):
        chunk = tiles[start:start + batch_size]
        batch = np.stack([slices01[stacks[z], r:r + th, c:c + tw] for z, r, c in chunk])  # (B, 1+2k, th, tw)
        noisy = torch.from_numpy(to_model_units(batch)).float()
        mean, std = model.denoise(noisy, steps=steps, eta=eta, n_samples=n_samples, t_start="auto", sigma=sigma,
                                  return_std=True, batch_size=batch_size * n_samples, generator=generator,
                                  inference=inference)
        mean01 = from_model_units(mean[:, 0].double().cpu().numpy()).clip(0.0, 1.0)
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


def check_settings(sigma="auto", steps: int = 10, n_samples: int = 1, eta: float = 0.0, batch_size: int = 8,
                   tile: int = 256, overlap: int = 32) -> None:
    """Refuse bad sampling settings before anything is read; the messages name the flags."""
    def integer(value) -> bool:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)

    for flag, value in (("--steps", steps), ("--samples", n_samples), ("--batch-size", batch_size)):
        if not integer(value) or value < 1:
            raise ValueError(f"{flag} must be an integer >= 1, got {value!r}")
    if not integer(overlap) or overlap < 0:
        raise ValueError(f"--overlap must be an integer >= 0, got {overlap!r}")
    if not integer(tile) or tile < 8 or tile <= 2 * overlap:
        raise ValueError(f"--tile must be an integer >= 8 and larger than twice --overlap ({overlap}), got {tile!r}")
    if not (isinstance(eta, numbers.Real) and 0.0 <= eta <= 1.0):
        raise ValueError(f"--eta must lie in [0, 1], got {eta!r}")
    if sigma != "auto" and not (isinstance(sigma, numbers.Real) and math.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"--sigma must be 'auto' or a finite number >= 0 on the [0, 1] scale, got {sigma!r}")


def _same_path(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)  # a hard link or another mount
    except OSError:
        return False


def check_output_paths(input_path, output_path, std_path=None, output_dicom=None) -> None:
    """Refuse, before any work, outputs that would destroy the input or each other or could
    not be written: a NIfTI output must end in .nii/.nii.gz and not be a folder; no output may
    be the input (compared resolved, and as the same file) or lie inside a DICOM input folder,
    no two outputs may be the same path, and no NIfTI output may lie inside the DICOM output
    folder; each output's folder must be writable (``orchestration.cli.check_writable_folder``:
    a missing one is fine where it can be made; the writers make it). The DICOM output folder is checked by ``check_dicom_output``."""
    src = Path(input_path)
    if not src.exists():
        raise FileNotFoundError(f"input path does not exist: {src}")
    if output_dicom is not None:
        check_dicom_output(src, output_dicom)  # the DICOM folder against the input
    named = [(flag, Path(path)) for flag, path in (("--output", output_path), ("--std", std_path),
                                                   ("--output-dicom", output_dicom)) if path is not None]
    for i, (flag, path) in enumerate(named):
        if flag != "--output-dicom":
            if not path.name.endswith((".nii", ".nii.gz")):
                raise ValueError(f"{flag} {path} must end in .nii or .nii.gz")
            if path.is_dir():
                raise ValueError(f"{flag} {path} is a folder: give a .nii or .nii.gz file name")
        if flag != "--output-dicom" and _same_path(path, src):
            raise ValueError(f"{flag} {path} is the input {src}: it would overwrite the scan, choose another path")
        if flag != "--output-dicom" and src.is_dir() and src.resolve() in path.resolve().parents:
            raise ValueError(f"{flag} {path} lies inside the input DICOM folder {src}: choose another path")
        for other_flag, other in named[:i]:
            if _same_path(path, other):
                raise ValueError(f"{flag} {path} is the same path as {other_flag} {other}: one would replace "
                                 "the other, give two paths")
            if other_flag == "--output-dicom" or flag == "--output-dicom":
                folder, inner = (other, path) if other_flag == "--output-dicom" else (path, other)
                if folder.resolve() in inner.resolve().parents:
                    raise ValueError(f"{inner} lies inside the --output-dicom folder {folder}, which must stay "
                                     "new or empty: choose another path")
        check_writable_folder(path.resolve().parent, flag)  # probed with a file; folders made for it removed


def resolve_modality(modality: str | None, found: str | None, ras: np.ndarray) -> tuple[str, str]:
    """(modality, where it came from): the one given (``--modality``), else the DICOM
    Modality tag, else inferred from the intensities (``modality_from_intensities``)."""
    if modality:
        return check_modality(modality), "given with --modality"
    if found:
        if found.lower() not in MODALITIES:
            raise ValueError(f"the DICOM Modality tag is {found!r}, not CT or MR: give --modality ct or --modality mr "
                             "to denoise it anyway")
        return found.lower(), "the DICOM Modality tag"
    inferred, why = modality_from_intensities(ras)
    if inferred is None:
        raise ValueError(f"cannot tell CT from MR ({why}): give --modality ct or --modality mr")
    return inferred, f"inferred: {why}"


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
                   overlap: int = 32, seed: int = 0, progress: bool = True, inference=None) -> dict:
    """Denoise a NIfTI file or DICOM series folder into ``output_path`` (and the per-voxel std
    of ``n_samples`` samples into ``std_path``), both in the input's units; with
    ``output_dicom`` (a DICOM series folder input only) also a DICOM series into that new or
    empty folder, one file per input slice (see ``utils.dicom_writer``).

    sigma: the noise std on the [0,1] scale of the training data, or "auto" to estimate it.
    inference: how the network runs (bf16, channels_last, compile: ``InferenceOptions`` or a mapping).
    modality: "ct" | "mr"; None: the DICOM Modality tag, else inferred from the intensities.
    Returns what was done: modality and ``modality_source`` (how it was chosen), sigma ([0,1]
    and input units), t* (None when nothing was denoised), plane, slices, ``context_slices``
    (the model's neighbours on each side, 0 for a 2-D model), ``slice_spacing`` (mm between the
    denoised slices) and ``context_warning`` (None, or why a 2.5D model may do worse on slices
    this far apart: above THICK_CONTEXT_MM), the intensity ``window`` (low,
    high), ``unchanged`` (None, or why the input was written unchanged), output paths, seconds.
    """
    start = time.time()
    check_settings(sigma, steps, n_samples, eta, batch_size, tile, overlap)  # before any work, so no
    check_output_paths(input_path, output_path, std_path, output_dicom)     # output is left half done
    if not isinstance(model, ConditionDDPM):
        raise ValueError(f"the checkpoint holds a {type(model).__name__}, not a ConditionDDPM")
    if plane != ACQUISITION and plane not in PLANES:
        raise ValueError(f"plane {plane!r} unknown: expected one of {PLANES} or '{ACQUISITION}'")
    if output_dicom is None:
        img, found = read_image(input_path)
    else:
        img, found, files = read_dicom_series(Path(input_path))
        check_writable(files)
    ras, zooms = ras_array(img, input_path)
    modality, modality_source = resolve_modality(modality, found, ras)
    plane = acquisition_plane(zooms) if plane == ACQUISITION else plane
    low, high = intensity_window(ras, modality)
    info = {"modality": modality, "modality_source": modality_source, "plane": plane,
            "slices": int(ras.shape[PLANE_AXES[plane][0]]), "window": (low, high), "t_star": None,
            "context_slices": int(getattr(model, "context_slices", 0) or 0),
            "slice_spacing": float(zooms[PLANE_AXES[plane][0]]), "context_warning": None,
            "sigma01": 0.0 if sigma == "auto" else float(sigma), "sigma_units": 0.0, "unchanged": None}
    if info["context_slices"] and info["slice_spacing"] > THICK_CONTEXT_MM:
        info["context_warning"] = (
            f"this 2.5D model's neighbouring slices were 1-1.5 mm apart in training; these {plane} slices are "
            f"{info['slice_spacing']:g} mm apart, where the 2.5D models denoised worse than single-slice ones "
            "(docs/RESULTS.md, 'Neighbouring slices'): prefer a plane with thinner slices (--plane) or a "
            "single-slice checkpoint")
        warnings.warn(info["context_warning"])
    out, std_units = ras, None
    if not high > low:
        info["unchanged"] = (f"no noise to remove: the {modality} intensity window is empty (one foreground "
                             f"intensity, {low:g})")
    else:
        ras01 = to_unit_range(ras, low, high, clip=False)  # the model saw noisy inputs beyond [0, 1]
        slices01 = np.ascontiguousarray(cut_plane(ras01, zooms, plane)[0], dtype=np.float32)
        if sigma == "auto":
            sigma = estimate_noise_sigma(slices01, foreground=modality == "mr")  # MR magnitude: Rician
        sigma, floor = float(sigma), negligible_sigma(model.diffusion)
        info.update(sigma01=sigma, sigma_units=sigma * (high - low))
        if sigma < floor:
            info["unchanged"] = (f"no noise to remove: sigma {sigma:.3g} is below {floor:.3g}, half the noise of "
                                 "the model's smallest timestep (none measurable)")
        else:
            info["t_star"] = t_star = model.start_timestep("auto", sigma)
            weight = window_weight(ras01, EDGE_BAND_SIGMAS[0] * sigma, EDGE_BAND_SIGMAS[1] * sigma)
            if modality == "mr":
                weight[ras == 0] = 0.0  # zero-filled background: no signal to denoise
            kept = weight == 0
            if kept.any():  # the model's input: kept voxels clipped to the window, like its training data
                model01 = np.where(kept, np.clip(ras01, 0.0, 1.0), ras01)
                slices01 = np.ascontiguousarray(cut_plane(model01, zooms, plane)[0], dtype=np.float32)
                del model01
            generator = torch.Generator(device=model.device).manual_seed(int(seed))
            mean01, std01 = denoise_slices(model, slices01, sigma, steps=steps, n_samples=n_samples, eta=eta,
                                           batch_size=batch_size, tile=tile, overlap=overlap,
                                           generator=generator, progress=progress, inference=inference)
            del slices01
            mean = to_physical(_uncut_plane(mean01, plane), {"low": low, "high": high})
            out = np.where(weight == 1, mean, np.where(weight == 0, ras, ras + weight * (mean - ras)))
            std_units = _uncut_plane(std01, plane) * np.float32(high - low) * weight
    if info["unchanged"]:
        warnings.warn(f"{info['unchanged']}; the input is written unchanged")
    info["output"] = _write_like(img, out, Path(output_path))
    if std_path is not None:
        info["std"] = _write_like(img, np.zeros_like(ras) if std_units is None else std_units, Path(std_path))
    if output_dicom is not None and info["unchanged"]:
        derivation = f"not denoised by CDM4MI (no matched start, t*=None), pixels copied: {info['unchanged']}"
        info["output_dicom"] = write_dicom_series(output_dicom, from_ras_array(img, out), files, Path(input_path),
                                                  derivation)
    elif output_dicom is not None:
        derivation = (f"denoised by CDM4MI (conditional diffusion model, DDIM from the matched start "
                      f"t*={t_star}): sigma {sigma:.4g} on the [0,1] scale, {capped_steps('ddim', steps, t_star)} steps, "
                      f"{n_samples} sample(s), eta {eta}, {plane} slices")
        info["output_dicom"] = write_dicom_series(output_dicom, from_ras_array(img, out), files, Path(input_path),
                                                  derivation)
    info["seconds"] = time.time() - start
    return info
