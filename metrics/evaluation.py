"""Denoising evaluation: add seeded noise to clean test slices, run every method, score.

Units: clean slices and noise levels are on the [0,1] scale (sigma = Gaussian std on
[0,1]); scores are computed in [0,1] units (dynamic range 1); saved predictions are in
physical units (HU for CT) via the slice's norm: x_phys = low + x01 * (high - low).

``evaluate`` writes into out_dir:
  scores.csv               one row per (sigma, slice, method)
  results.md               mean +- std per modality, method and sigma
  psnr_ssim_vs_sigma.png   PSNR / SSIM against sigma, per method and modality
  examples.png             clean, noisy, each method (and the DDPM std map) per example
  predictions/<method>/<sigma>/<source>_z<slice>.tif and <source>.nii.gz
``orchestration.evaluation_job.run_evaluation`` goes from a run config to ``evaluate``.
"""

from __future__ import annotations

import csv
import io
import re
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from metrics.denoisers import NoisyInput
from metrics.image_metrics import ImageMetrics, body_mask
from utils.atomic import atomic_write

NOISE_TYPES = ("gaussian", "rician")
CSV_COLUMNS = (
    "sigma", "source", "modality", "slice_index", "method",
    "psnr", "ssim", "mae", "psnr_masked", "ssim_masked", "mae_masked", "seconds",
)
SCORE_KEYS = ("psnr", "ssim", "mae", "psnr_masked", "ssim_masked", "mae_masked", "seconds")
SLICE_KEYS = ("clean", "source", "modality", "slice_index", "spacing", "norm")


# ----------------------------------------------------------------------------- files
def _atomic_text(path: Path, text: str) -> Path:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)

    return atomic_write(path, write)


def safe_name(name: str) -> str:
    """A file-system safe version of a method or source name ('DDPM mean of 4' -> 'DDPM_mean_of_4')."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("._")
    return safe or "unnamed"


def sigma_tag(sigma: float) -> str:
    """Folder name of a noise level, e.g. 0.1 -> 'sigma_0.1'."""
    return f"sigma_{float(sigma):g}"


# ----------------------------------------------------------------------------- noise
def noise_rng(noise_seed: int, sigma: float, slice_number: int) -> np.random.Generator:
    """Generator for the noise of slice ``slice_number`` (its position in the slice
    list) at level sigma: the same for every method and every run."""
    return np.random.default_rng([int(noise_seed), int(round(sigma * 1e6)), int(slice_number)])


def add_noise(clean01: np.ndarray, sigma: float, rng: np.random.Generator, noise_type: str) -> np.ndarray:
    """Noisy slice on the [0,1] scale, not clipped.

    gaussian: clean + N(0, sigma^2). rician (MR magnitude): sqrt((clean + n1)^2 + n2^2)
    with n1, n2 ~ N(0, sigma^2).
    """
    clean = np.asarray(clean01, dtype=np.float64)
    n1 = rng.standard_normal(clean.shape) * sigma
    if noise_type == "gaussian":
        noisy = clean + n1
    elif noise_type == "rician":
        n2 = rng.standard_normal(clean.shape) * sigma
        noisy = np.sqrt((clean + n1) ** 2 + n2**2)
    else:
        raise ValueError(f"noise_type must be one of {NOISE_TYPES}, got {noise_type!r}")
    return noisy.astype(np.float32)


def _seed_torch(noise_seed: int, sigma: float, slice_number: int, method: str) -> None:
    """Seeds torch for one model call so sampling does not depend on method order."""
    seq = np.random.SeedSequence(
        [int(noise_seed), int(round(sigma * 1e6)), int(slice_number), zlib.crc32(method.encode())]
    )
    torch.manual_seed(int(seq.generate_state(1)[0]))


# ----------------------------------------------------------------------------- checks
def _check_inputs(denoisers, slices, sigmas, noise_type):
    if noise_type not in NOISE_TYPES:
        raise ValueError(f"noise_type must be one of {NOISE_TYPES}, got {noise_type!r}")
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
        clean = np.asarray(s["clean"])
        if clean.ndim != 2:
            raise ValueError(f"slice {i} ({s['source']}): clean must be (H,W), got {clean.shape}")
        if not np.all(np.isfinite(clean)):
            raise ValueError(f"slice {i} ({s['source']}): clean contains NaN or inf")
        for key in ("low", "high"):
            if key not in s["norm"]:
                raise ValueError(f"slice {i} ({s['source']}): norm lacks {key!r}")
    sigmas = [float(x) for x in sigmas]
    if not sigmas or any(not np.isfinite(x) or x < 0 for x in sigmas):
        raise ValueError(f"sigmas must be a non-empty list of non-negative numbers, got {sigmas}")
    return sigmas


def _example_numbers(slices, n_examples: int) -> set:
    """Slice numbers shown in examples.png: n_examples per modality, evenly spaced
    over that modality's slices (chosen by position, never by score)."""
    chosen = set()
    by_modality = {}
    for i, s in enumerate(slices):
        by_modality.setdefault(s["modality"], []).append(i)
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
) -> dict:
    """Scores every denoiser on every slice at every noise level.

    denoisers: list of Denoiser (metrics.denoisers); names must be unique.
    slices: list of dicts {"clean": (H,W) float32 [0,1], "source", "modality",
        "slice_index", "spacing" (mm: in-plane axis 0, axis 1, slice), "norm":
        {"low", "high", ...} physical units} as given by the data module's test_slices().
    sigmas: noise std on the [0,1] scale.
    noise_seed: the noise of slice number i at level sigma comes from
        default_rng([noise_seed, round(sigma * 1e6), i]); every method sees the same noise.
    noise_type: "gaussian" or "rician".
    save_predictions: write TIFF / NIfTI predictions in physical units.
    n_examples: example slices per modality in examples.png (0: no figure).
    Returns {"scores_csv", "results_md", "plot_png", "examples_png", "predictions_dir"}
    (paths, None where not written) and "summary" (list of per modality/method/sigma
    dicts with n and mean/std of each score).
    """
    sigmas = _check_inputs(denoisers, slices, sigmas, noise_type)
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
    progress = tqdm(total=len(sigmas) * len(slices), desc="evaluate", leave=False)

    for sigma in sigmas:
        for i, s in enumerate(slices):
            clean = np.asarray(s["clean"], dtype=np.float32)
            noisy = add_noise(clean, sigma, noise_rng(noise_seed, sigma, i), noise_type)
            example = None
            if i in example_numbers:
                example = {"number": i, "slice": s, "sigma": sigma, "clean": clean, "noisy": noisy,
                           "preds": {}, "stds": {}, "psnr": {}}
                examples.append(example)
            for d in denoisers:
                _seed_torch(noise_seed, sigma, i, d.name)
                pred, std, seconds = _timed(d, noisy, sigma)
                if pred.shape != clean.shape or not np.all(np.isfinite(pred)):
                    raise ValueError(
                        f"method {d.name!r} returned shape {pred.shape} / non-finite values "
                        f"for slice {i} ({s['source']}), expected finite {clean.shape}"
                    )
                row = _score_row(metrics, clean, pred, masks[i], sigma, s, d.name, seconds)
                rows.append(row)
                if example is not None and not isinstance(getattr(d, "inner", d), NoisyInput):
                    example["preds"][d.name] = pred
                    example["psnr"][d.name] = row["psnr"]
                    if std is not None:
                        example["stds"][d.name] = std
                if save_predictions:
                    path = _save_tiff(pred_dir, d.name, sigma, s, pred)
                    saved.setdefault((d.name, sigma, s["source"]), []).append((s["slice_index"], path, s))
            progress.update(1)
    progress.close()

    summary = summarize(rows, [d.name for d in denoisers], sigmas)
    examples.sort(key=lambda ex: (ex["slice"]["modality"], ex["number"], ex["sigma"]))
    result = {
        "scores_csv": _write_csv(out_dir / "scores.csv", rows),
        "results_md": _atomic_text(out_dir / "results.md",
                                   results_markdown(summary, slices, noise_type, noise_seed)),
        "plot_png": _plot_vs_sigma(out_dir / "psnr_ssim_vs_sigma.png", summary),
        "examples_png": _plot_examples(out_dir / "examples.png", examples) if examples else None,
        "predictions_dir": None,
        "summary": summary,
    }
    if save_predictions:
        for (name, sigma, source), items in saved.items():
            _save_nifti(pred_dir, name, sigma, source, items)
        result["predictions_dir"] = pred_dir
    return result


def _timed(denoiser, noisy, sigma):
    start = time.perf_counter()
    pred, std = denoiser.denoise_with_std(noisy, sigma)
    seconds = time.perf_counter() - start
    return np.asarray(pred, dtype=np.float32), std, seconds


def _score_row(metrics, clean, pred, mask, sigma, s, name, seconds) -> dict:
    whole = metrics.image_scores(clean, pred)
    if mask.any():
        masked = metrics.image_scores(clean, pred, mask=mask)
    else:
        masked = {"psnr": float("nan"), "ssim": float("nan"), "mae": float("nan")}
    return {
        "sigma": sigma, "source": s["source"], "modality": s["modality"],
        "slice_index": int(s["slice_index"]), "method": name,
        "psnr": whole["psnr"], "ssim": whole["ssim"], "mae": whole["mae"],
        "psnr_masked": masked["psnr"], "ssim_masked": masked["ssim"], "mae_masked": masked["mae"],
        "seconds": seconds,
    }


# ----------------------------------------------------------------------------- tables
def summarize(rows, methods, sigmas) -> list:
    """Per (modality, method, sigma): n and mean/std over slices of every score
    (NaN entries, from empty masks, are left out)."""
    summary = []
    modalities = list(dict.fromkeys(r["modality"] for r in rows))
    for modality in modalities:
        for sigma in sigmas:
            for method in methods:
                sel = [r for r in rows
                       if r["modality"] == modality and r["method"] == method and r["sigma"] == sigma]
                if not sel:
                    continue
                entry = {"modality": modality, "method": method, "sigma": sigma, "n": len(sel)}
                for key in SCORE_KEYS:
                    vals = np.array([r[key] for r in sel], dtype=np.float64)
                    entry[key] = _mean(vals)
                    entry[key + "_std"] = _std(vals)
                summary.append(entry)
    return summary


def _mean(vals):
    vals = vals[~np.isnan(vals)]
    return float(np.mean(vals)) if vals.size else float("nan")


def _std(vals):
    vals = vals[~np.isnan(vals)]
    if not vals.size or np.isinf(vals).any():
        return float("nan")
    return float(np.std(vals))


def _write_csv(path: Path, rows) -> Path:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]) for k in CSV_COLUMNS})
    return _atomic_text(path, buf.getvalue())


def _pm(mean, std, digits):
    if np.isnan(mean):
        return "n/a"
    if np.isinf(mean):
        return "inf"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def results_markdown(summary, slices, noise_type: str, noise_seed: int) -> str:
    """Markdown tables, one per modality: rows sigma x method, mean ± std over slices."""
    lines = [
        "# Denoising evaluation",
        "",
        f"Noise: {noise_type}, sigma = std on the [0,1] intensity scale, seed {noise_seed} "
        "(the same noise for every method). Scores on the [0,1] scale (data range 1): "
        "whole slice and inside the body mask (threshold, largest component, holes "
        "filled). MAE in [0,1] units (x (high - low) for physical units). Mean ± std over "
        "slices; seconds = wall time per slice.",
        "",
    ]
    for modality in dict.fromkeys(e["modality"] for e in summary):
        sources = sorted({s["source"] for s in slices if s["modality"] == modality})
        n = sum(1 for s in slices if s["modality"] == modality)
        lines += [
            f"## {modality.upper()} ({n} slice{'s' if n != 1 else ''} from {', '.join(sources)})",
            "",
            "| method | sigma | PSNR (dB) | SSIM | PSNR body (dB) | SSIM body | MAE | MAE body | s/slice |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for e in summary:
            if e["modality"] != modality:
                continue
            lines.append(
                f"| {e['method']} | {e['sigma']:g} | {_pm(e['psnr'], e['psnr_std'], 2)} | "
                f"{_pm(e['ssim'], e['ssim_std'], 3)} | {_pm(e['psnr_masked'], e['psnr_masked_std'], 2)} | "
                f"{_pm(e['ssim_masked'], e['ssim_masked_std'], 3)} | {_pm(e['mae'], e['mae_std'], 4)} | "
                f"{_pm(e['mae_masked'], e['mae_masked_std'], 4)} | {e['seconds']:.3f} |"
            )
        lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- figures
def _save_figure(path: Path, fig) -> Path:
    import matplotlib.pyplot as plt

    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)


def _plot_vs_sigma(path: Path, summary) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("psnr", "PSNR (dB)"), ("ssim", "SSIM"), ("psnr_masked", "PSNR body (dB)"),
              ("ssim_masked", "SSIM body"))
    modalities = list(dict.fromkeys(e["modality"] for e in summary))
    methods = list(dict.fromkeys(e["method"] for e in summary))
    fig, axes = plt.subplots(len(modalities), len(panels), figsize=(4 * len(panels), 3.2 * len(modalities)),
                             squeeze=False)
    for r, modality in enumerate(modalities):
        for c, (key, label) in enumerate(panels):
            ax = axes[r, c]
            for method in methods:
                sel = [e for e in summary if e["modality"] == modality and e["method"] == method]
                xs = [e["sigma"] for e in sel]
                ys = [e[key] if np.isfinite(e[key]) else np.nan for e in sel]
                ax.plot(xs, ys, marker="o", label=method)
            ax.set_xlabel("sigma ([0,1] scale)")
            ax.set_ylabel(label)
            ax.set_title(f"{modality.upper()}: {label}")
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    return _save_figure(path, fig)


def _plot_examples(path: Path, examples) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(m for ex in examples for m in ex["preds"]))
    std_methods = list(dict.fromkeys(m for ex in examples for m in ex["stds"]))
    columns = ["clean", "noisy"] + methods + [f"{m} std" for m in std_methods]
    fig, axes = plt.subplots(len(examples), len(columns),
                             figsize=(2.3 * len(columns), 2.5 * len(examples)), squeeze=False)
    for r, ex in enumerate(examples):
        lo, hi = np.percentile(ex["clean"], (0.5, 99.5))
        hi = hi if hi > lo else lo + 1.0
        s = ex["slice"]
        images = [("clean", ex["clean"]), (f"noisy σ={ex['sigma']:g}", ex["noisy"])]
        images += [(f"{m}\n{ex['psnr'][m]:.2f} dB", ex["preds"].get(m)) for m in methods]
        for c, (title, img) in enumerate(images):
            ax = axes[r, c]
            if img is not None:
                ax.imshow(img, cmap="gray", vmin=lo, vmax=hi)
            ax.set_title(title, fontsize=8)
        for k, m in enumerate(std_methods):
            ax = axes[r, len(images) + k]
            std = ex["stds"].get(m)
            if std is not None:
                im = ax.imshow(std, cmap="magma", vmin=0.0)
                fig.colorbar(im, ax=ax, fraction=0.046)
            ax.set_title(f"{m}\nstd ([0,1])", fontsize=8)
        axes[r, 0].set_ylabel(f"{s['modality'].upper()} {s['source']}\nz={s['slice_index']}", fontsize=8)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    return _save_figure(path, fig)


# ----------------------------------------------------------------------------- predictions
def _to_physical(x01: np.ndarray, norm) -> np.ndarray:
    low, high = float(norm["low"]), float(norm["high"])
    return (low + x01.astype(np.float64) * (high - low)).astype(np.float32)


def _save_tiff(pred_dir: Path, method: str, sigma: float, s, pred01) -> Path:
    import tifffile

    path = (pred_dir / safe_name(method) / sigma_tag(sigma)
            / f"{safe_name(s['source'])}_z{int(s['slice_index']):04d}.tif")
    data = _to_physical(pred01, s["norm"])
    return atomic_write(path, lambda tmp: tifffile.imwrite(tmp, data))


def _save_nifti(pred_dir: Path, method: str, sigma: float, source: str, items) -> Path:
    """Stacks one source's slices (sorted by slice index) on the last axis, physical units.
    The slice spacing is multiplied by the slice-index step when the slices are evenly
    spaced; with uneven steps it stays the source's spacing."""
    import nibabel as nib
    import tifffile

    items = sorted(items, key=lambda t: t[0])
    volume = np.stack([tifffile.imread(p) for _, p, _ in items], axis=-1).astype(np.float32)
    spacing = items[0][2].get("spacing")
    spacing = [1.0, 1.0, 1.0] if spacing is None else [float(v) for v in spacing]
    if len(spacing) != 3:
        raise ValueError(f"source {source!r}: spacing must have 3 values, got {spacing}")
    steps = np.unique(np.diff([t[0] for t in items]))
    if steps.size == 1:
        spacing[2] *= float(steps[0])
    img = nib.Nifti1Image(volume, np.diag(spacing + [1.0]))
    img.header.set_xyzt_units("mm")
    norm = items[0][2]["norm"]
    img.header["descrip"] = f"{method} sigma={sigma:g} {norm.get('modality', '')}"[:79].encode()
    path = pred_dir / safe_name(method) / sigma_tag(sigma) / f"{safe_name(source)}.nii.gz"
    return atomic_write(path, lambda tmp: nib.save(img, tmp))
