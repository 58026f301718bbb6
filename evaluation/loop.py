"""Denoising evaluation: add seeded noise to clean test slices, run every method, score.

Units: clean slices are on the [0,1] scale. The noise comes from the models of
``diffusion_modules.diffusion_utils.noise`` (the ones training uses), one per level:
gaussian and rician levels are sigma (std on [0,1]); lowdose_ct levels are i0 (photons
per detector bin), simulated with each CT slice's HU window and pixel spacing. The
methods get the noise model's (Gaussian-equivalent) std on [0,1] as their sigma.
Scores are computed in [0,1] units (dynamic range 1); saved predictions are in physical
units (HU for CT): x_phys = low + x01 * (high - low).
A slice may carry "set" ("same-subject", the default: held-out slabs of the training
volumes; "unseen": a volume no training split touches) and "label" (e.g. "resolution
shift"); rows, tables and figure rows are kept apart by set. It may carry its volume
context: "volume", the clean (S,H,W) stack of consecutive slices it belongs to (a test
slab, an unseen volume; one array shared by the slices of a source) and "volume_index",
its position in it. The noise of a slice is keyed by (noise seed, level, source, slice
index), so a slice is the same noisy slice whether it is scored, a 2.5D model's
neighbour or part of BM4D's volume.

``evaluate`` writes into out_dir (see evaluation.reporting):
  scores.csv               one row per (level, slice, method), column "set"
  results.md               sections "Same-subject slabs" and "Unseen volumes": mean +- std
                           per modality, method and level, best body PSNR per level
  psnr_ssim_vs_sigma.png   PSNR / SSIM against the level, per method and modality
  examples.png             clean, noisy, each method (and the DDPM std map) per example
  predictions/<method>/<level>/<source>_z<slice>.tif and <source>.nii.gz
``orchestration.evaluation_job.run_evaluation`` goes from a run config to ``evaluate``.
"""

from __future__ import annotations

import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from diffusion_modules.diffusion_utils.context import context_indices
from diffusion_modules.diffusion_utils.noise import NOISE_TYPES, noise_at_level, noise_for_volume
from evaluation.denoisers import NoisyInput, volume_runs
from evaluation.reporting import (
    SETS,
    SUMMARY_PANELS,
    atomic_text,
    level_name,
    level_unit,
    plot_examples,
    plot_vs_level,
    summary_curves,
    results_markdown,
    safe_name,
    save_nifti,
    save_tiff,
    slice_set,
    summarize,
    write_csv,
)
from metrics.image_metrics import ImageMetrics, body_mask
from utils.intensity import to_physical

SLICE_KEYS = ("clean", "source", "modality", "slice_index", "spacing", "norm")
#: (level, width) in HU of the CT display window scored by ct_scores: a head CT's brain window
CT_WINDOW = (40.0, 80.0)


# ----------------------------------------------------------------------------- noise
def source_key(source: str) -> int:
    """A source name as a number for seeding (crc32 of its UTF-8 bytes)."""
    return zlib.crc32(str(source).encode())


def slice_rng(noise_seed: int, level: float, source: str, slice_index: int) -> np.random.Generator:
    """Generator for the noise of slice ``slice_index`` (its index in its volume) of
    ``source`` at level sigma (or i0): default_rng([noise_seed, round(level * 1e6),
    crc32(source), slice_index]). The same wherever the slice is used (scored, a 2.5D
    neighbour, a slice of BM4D's volume), for every method and every run; every slice
    has its own draw."""
    return np.random.default_rng([int(noise_seed), int(round(level * 1e6)), source_key(source), int(slice_index)])


def volume_of(s: dict):
    """(clean (S,H,W) stack, position of the slice in it) of a slice dict: its "volume"
    and "volume_index", or the slice alone as a stack of one."""
    if "volume" in s:
        return s["volume"], int(s["volume_index"])
    return np.asarray(s["clean"])[None], 0


class NoisySlices:
    """The noisy slices of one level, each made once and keyed (source, slice index in its
    volume): a scored slice, a 2.5D neighbour and a slice of a 3-D method's volume are the
    same voxels."""

    def __init__(self, noise, noise_seed: int, level: float):
        self.noise, self.noise_seed, self.level, self.made = noise, int(noise_seed), level, {}

    def at(self, s: dict, j: int):
        """(noisy01 float32, noise std) of position j of slice dict s's volume."""
        volume, index = volume_of(s)
        z = int(s["slice_index"]) - index + int(j)
        key = (s["source"], z)
        if key not in self.made:
            clean = np.asarray(volume[j], dtype=np.float32)
            self.made[key] = slice_noise(self.noise, s, clean, slice_rng(self.noise_seed, self.level, s["source"], z))
        return self.made[key]

    def context(self, s: dict, k: int) -> np.ndarray:
        """(1+2k, H, W): the noisy slice and its k noisy neighbours on each side
        (``context_indices`` order, reflected at the volume's ends)."""
        volume, index = volume_of(s)
        return np.stack([self.at(s, j)[0] for j in context_indices(index, k, len(volume))])

    def volume(self, s: dict, run: range | None = None):
        """(noisy (S,H,W) stack of s's volume (positions ``run``, default all), the noise std
        of its slices: their common level, or the mean of each slice's (low-dose CT))."""
        made = [self.at(s, j) for j in (range(len(volume_of(s)[0])) if run is None else run)]
        stds = {float(m[1]) for m in made}
        return np.stack([m[0] for m in made]), stds.pop() if len(stds) == 1 else float(np.mean([m[1] for m in made]))


def slice_noise(noise, s: dict, clean01: np.ndarray, rng: np.random.Generator):
    """(noisy01 float32, sigma_used) of one slice dict; a model with ``for_volume``
    (low-dose CT) first takes the slice's HU window and pixel spacing."""
    return noise_for_volume(noise, s["norm"], s["spacing"])(clean01, rng)


def _seed_torch(noise_seed: int, sigma: float, s: dict, method: str) -> None:
    """Seeds torch for one model call, keyed like the slice's noise (source, slice index),
    so sampling depends neither on method order nor on the slice's place in the list."""
    seq = np.random.SeedSequence(
        [int(noise_seed), int(round(sigma * 1e6)), source_key(s["source"]), int(s["slice_index"]),
         zlib.crc32(method.encode())]
    )
    torch.manual_seed(int(seq.generate_state(1)[0]))


# ----------------------------------------------------------------------------- checks
def _check_inputs(denoisers, slices, sigmas, noise_type, noise_params):
    """Validated levels and the noise model of each level ({level: model})."""
    if noise_type not in NOISE_TYPES:
        raise ValueError(f"noise_type must be one of {sorted(NOISE_TYPES)}, got {noise_type!r}")
    if not denoisers:
        raise ValueError("no denoisers to evaluate")
    names = [d.name for d in denoisers]
    safe = [safe_name(n) for n in names]
    if len(set(safe)) != len(safe):
        raise ValueError(f"method names must be unique (also as file names): {names}")
    if not slices:
        raise ValueError("no slices to evaluate")
    for i, s in enumerate(slices):
        missing = [k for k in SLICE_KEYS if k not in s]
        if missing:
            raise ValueError(f"slice {i} lacks key(s) {missing}")
        if slice_set(s) not in SETS:
            raise ValueError(f"slice {i} ({s['source']}): set must be one of {SETS}, got {s['set']!r}")
        clean = np.asarray(s["clean"])
        if clean.ndim != 2:
            raise ValueError(f"slice {i} ({s['source']}): clean must be (H,W), got {clean.shape}")
        if not np.all(np.isfinite(clean)):
            raise ValueError(f"slice {i} ({s['source']}): clean contains NaN or inf")
        if "volume" in s:
            volume, index = s["volume"], s.get("volume_index")
            if (np.ndim(volume) != 3 or not isinstance(index, (int, np.integer)) or not 0 <= index < len(volume)
                    or not np.array_equal(volume[index], clean)):
                raise ValueError(f"slice {i} ({s['source']} z={s['slice_index']}): volume must be an (S,H,W) "
                                 "stack whose volume_index-th slice is the clean slice")
        for key in ("low", "high"):
            if key not in s["norm"]:
                raise ValueError(f"slice {i} ({s['source']}): norm lacks {key!r}")
        if noise_type == "lowdose_ct" and str(s["modality"]).lower() != "ct":
            raise ValueError(
                f"slice {i} ({s['source']} z={s['slice_index']}) is {s['modality']!r}: "
                "lowdose_ct noise needs CT slices"
            )
    sources = {}
    for s in slices:
        sources.setdefault(safe_name(s["source"]), set()).add(slice_set(s))
    shared = sorted(name for name, sets in sources.items() if len(sets) > 1)
    if shared:
        raise ValueError(f"source name(s) {shared} occur in more than one set: give unseen volumes other names")
    sigmas = [float(x) for x in sigmas]
    if not sigmas or any(not np.isfinite(x) or x < 0 for x in sigmas):
        raise ValueError(f"sigmas must be a non-empty list of non-negative numbers, got {sigmas}")
    params = dict(noise_params or {})
    fixed = {"type", level_name(noise_type)} & set(params)
    if fixed:
        raise ValueError(f"noise_params must not set {sorted(fixed)}: the levels give them")
    return sigmas, {x: noise_at_level(noise_type, x, **params) for x in sigmas}


def _example_numbers(slices, n_examples: int) -> set:
    """Slice numbers shown in examples.png: n_examples per set and modality, evenly
    spaced over those slices (chosen by position, never by score)."""
    chosen = set()
    by_modality = {}
    for i, s in enumerate(slices):
        by_modality.setdefault((slice_set(s), s["modality"]), []).append(i)
    for numbers in by_modality.values():
        k = min(max(int(n_examples), 0), len(numbers))
        if k:
            pos = np.linspace(0, len(numbers) - 1, k + 2)[1:-1] if k < len(numbers) else range(len(numbers))
            chosen.update(numbers[int(round(p))] for p in pos)
    return chosen


# ----------------------------------------------------------------------------- main
def evaluate(
    denoisers,
    slices,
    sigmas,
    out_dir,
    noise_seed: int = 0,
    noise_type: str = "gaussian",
    save_predictions: bool = True,
    n_examples: int = 1,
    noise_params: dict | None = None,
) -> dict:
    """Scores every denoiser on every slice at every noise level.

    denoisers: list of Denoiser (evaluation.denoisers); names must be unique.
    slices: list of dicts {"clean": (H,W) float32 [0,1], "source", "modality",
        "slice_index", "spacing" (mm: in-plane axis 0, axis 1, slice), "norm":
        {"low", "high", ...} physical units} as given by the data module's test_slices();
        optional "set" ("same-subject" default, or "unseen") and "label". Source names
        must not be shared between sets. Optional volume context: "volume" (clean (S,H,W)
        stack of consecutive slices, shared by a source's slices) and "volume_index" (the
        slice's position in it): 2.5D models take their neighbours from it (reflected at
        its ends), 3-D methods (BM4D) denoise all of it. Without it a slice is a volume of one.
    sigmas: the noise levels: sigma (std on the [0,1] scale) for "gaussian" and
        "rician", i0 (photons per detector bin, > 0) for "lowdose_ct" (CT slices only).
    noise_seed: the noise of slice z (index in its volume) of source at level x comes from
        ``slice_rng``: default_rng([noise_seed, round(x * 1e6), crc32(source), z]); every
        method sees the same noisy voxels, as a scored slice, neighbour or volume slice.
    noise_type: "gaussian", "rician" or "lowdose_ct" (noise.NOISE_TYPES).
    save_predictions: write TIFF / NIfTI predictions in physical units.
    n_examples: example slices per modality in examples.png (0: no figure).
    noise_params: other parameters of the noise model, e.g. {"n_angles": 180} for
        lowdose_ct (its pixel size and HU window come from each slice).
    Returns {"scores_csv", "results_md", "plot_png", "examples_png", "predictions_dir"}
    (paths, None where not written) and "summary" (list of per modality/method/level
    dicts with n and mean/std of each score and of noise_std).
    """
    sigmas, noise_models = _check_inputs(denoisers, slices, sigmas, noise_type, noise_params)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pred_dir = out_dir / "predictions"
    metrics = ImageMetrics()
    masks = [body_mask(s["clean"]) for s in slices]
    for i, m in enumerate(masks):
        if not m.any():
            warnings.warn(
                f"slice {i} ({slices[i]['source']} z={slices[i]['slice_index']}): empty body "
                "mask, its masked scores are NaN"
            )
    example_numbers = _example_numbers(slices, n_examples)
    examples = []
    rows = []
    saved = {}
    noise_info = {"noise_type": noise_type, "level_unit": level_unit(noise_type)}
    progress = tqdm(total=len(sigmas) * len(slices), desc="evaluate", leave=False)
    scored = {}  # source -> positions of its scored slices in its volume (3-D methods' runs)
    for s in slices:
        scored.setdefault(s["source"], []).append(volume_of(s)[1])

    for sigma in sigmas:
        noisy_slices, volume_preds = NoisySlices(noise_models[sigma], noise_seed, sigma), {}
        for i, s in enumerate(slices):
            clean = np.asarray(s["clean"], dtype=np.float32)
            noisy, noise_std = noisy_slices.at(s, volume_of(s)[1])
            example = None
            if i in example_numbers:
                example = {"number": i, "slice": s, "sigma": sigma, "clean": clean, "noisy": noisy,
                           "preds": {}, "stds": {}, "psnr": {}}
                examples.append(example)
            for d in denoisers:
                if getattr(d, "sets", None) is not None and slice_set(s) not in d.sets:
                    continue
                _seed_torch(noise_seed, sigma, s, d.name)
                k = int(getattr(d, "context_slices", 0) or 0)
                if getattr(d, "volumetric", False):
                    pred, std, seconds = _volume_prediction(d, s, noisy_slices, volume_preds, scored[s["source"]])
                else:
                    pred, std, seconds = _timed(d, noisy_slices.context(s, k) if k else noisy, noise_std)
                if pred.shape != clean.shape or not np.all(np.isfinite(pred)):
                    raise ValueError(
                        f"method {d.name!r} returned shape {pred.shape} / non-finite values "
                        f"for slice {i} ({s['source']}), expected finite {clean.shape}"
                    )
                row = _score_row(metrics, clean, pred, masks[i], sigma, s, d.name, seconds)
                rows.append({**row, **noise_info, "noise_std": float(noise_std), "set": slice_set(s)})
                if example is not None and not isinstance(getattr(d, "inner", d), NoisyInput):
                    example["preds"][d.name] = pred
                    example["psnr"][d.name] = row["psnr"]
                    if std is not None:
                        example["stds"][d.name] = std
                if save_predictions:
                    path = save_tiff(pred_dir, d.name, sigma, s, pred, noise_type)
                    saved.setdefault((d.name, sigma, s["source"]), []).append((s["slice_index"], path, s))
            progress.update(1)
    progress.close()

    summary = summarize(rows, [d.name for d in denoisers], sigmas)
    examples.sort(key=lambda ex: (SETS.index(slice_set(ex["slice"])), ex["slice"]["modality"],
                                  ex["number"], ex["sigma"]))
    result = {
        "scores_csv": write_csv(out_dir / "scores.csv", rows),
        "results_md": atomic_text(out_dir / "results.md",
                                  results_markdown(summary, slices, noise_type, noise_seed)),
        "plot_png": plot_vs_level(out_dir / "psnr_ssim_vs_sigma.png", summary_curves(summary), SUMMARY_PANELS,
                                  noise_type),
        "examples_png": plot_examples(out_dir / "examples.png", examples, noise_type) if examples else None,
        "predictions_dir": None,
        "summary": summary,
    }
    if save_predictions:
        for (name, sigma, source), items in saved.items():
            save_nifti(pred_dir, name, sigma, source, items, noise_type)
        result["predictions_dir"] = pred_dir
    return result


def _volume_prediction(denoiser, s, noisy_slices, cache, scored):
    """(pred01 of slice s, None, seconds) of a 3-D method: the whole noisy volume of s's
    source (or, with the method's ``max_slices``, the run of slices around the scored ones
    that holds s: ``volume_runs``) denoised once per level (seconds: that time per slice)."""
    index = volume_of(s)[1]
    run = next(r for r in volume_runs(scored, len(volume_of(s)[0]), getattr(denoiser, "max_slices", None))
               if index in r)
    key = (denoiser.name, s["source"], run.start)
    if key not in cache:
        stack, noise_std = noisy_slices.volume(s, run)
        start = time.perf_counter()
        pred = np.asarray(denoiser.denoise_volume(stack, noise_std), dtype=np.float32)
        seconds = time.perf_counter() - start
        if pred.shape != stack.shape:
            raise ValueError(f"method {denoiser.name!r} returned shape {pred.shape} for the volume of "
                             f"{s['source']}, expected {stack.shape}")
        cache[key] = (pred, seconds / len(stack))
    pred, seconds = cache[key]
    return pred[index - run.start], None, seconds


def _timed(denoiser, noisy, sigma):
    start = time.perf_counter()
    pred, std = denoiser.denoise_with_std(noisy, sigma)
    seconds = time.perf_counter() - start
    return np.asarray(pred, dtype=np.float32), std, seconds


def ct_scores(metrics, clean01, pred01, mask, norm) -> dict:
    """CT scores in the units a radiologist reads, inside the body mask: RMSE in HU, and
    PSNR / SSIM of the CT_WINDOW display (level 40, width 80 HU: a head CT's brain
    window; HU clipped to [0, 80] and scaled to [0,1], data range 1)."""
    nan = {"rmse_hu_masked": float("nan"), "psnr_ct_window": float("nan"), "ssim_ct_window": float("nan")}
    if not mask.any():
        return nan
    clean_hu, pred_hu = to_physical(clean01, norm), to_physical(pred01, norm)
    low = CT_WINDOW[0] - CT_WINDOW[1] / 2
    window = [np.clip((x - low) / CT_WINDOW[1], 0.0, 1.0).astype(np.float32) for x in (clean_hu, pred_hu)]
    scores = metrics.image_scores(*window, mask=mask, dynamic_range=1.0)
    rmse = float(np.sqrt(np.mean((pred_hu[mask].astype(np.float64) - clean_hu[mask]) ** 2)))
    return {"rmse_hu_masked": rmse, "psnr_ct_window": scores["psnr"], "ssim_ct_window": scores["ssim"]}


def _score_row(metrics, clean, pred, mask, sigma, s, name, seconds) -> dict:
    whole = metrics.image_scores(clean, pred)
    if mask.any():
        masked = metrics.image_scores(clean, pred, mask=mask)
    else:
        masked = {"psnr": float("nan"), "ssim": float("nan"), "mae": float("nan")}
    nan = float("nan")
    ct = (ct_scores(metrics, clean, pred, mask, s["norm"]) if s["modality"] == "ct" else
          {"rmse_hu_masked": nan, "psnr_ct_window": nan, "ssim_ct_window": nan})
    return {**ct, 
        "sigma": sigma, "source": s["source"], "modality": s["modality"],
        "slice_index": int(s["slice_index"]), "method": name,
        "psnr": whole["psnr"], "ssim": whole["ssim"], "mae": whole["mae"],
        "psnr_masked": masked["psnr"], "ssim_masked": masked["ssim"], "mae_masked": masked["mae"],
        "seconds": seconds,
    }
