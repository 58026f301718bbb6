"""What the evaluation writes: scores.csv, results.md, the figures and the predictions.

``metrics.evaluation.evaluate`` computes the rows (one per level, slice and method) and
calls these. Noise levels are named in their unit: sigma (std on the [0,1] scale) for
gaussian and rician noise, i0 (photons per detector bin) for lowdose_ct. Predictions
are saved in physical units (HU for CT) with ``utils.intensity.to_physical``.
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import numpy as np

from diffusion_modules.diffusion_utils.noise import NOISE_TYPES
from utils.atomic import atomic_write
from utils.intensity import to_physical

# "sigma" holds the requested noise level of the row in its unit (level_unit); noise_std
# is the noise std on [0,1] the methods were given (gaussian/rician: sigma).
CSV_COLUMNS = (
    "sigma", "source", "modality", "slice_index", "method",
    "psnr", "ssim", "mae", "psnr_masked", "ssim_masked", "mae_masked", "seconds",
    "noise_type", "level_unit", "noise_std",
)
SCORE_KEYS = ("psnr", "ssim", "mae", "psnr_masked", "ssim_masked", "mae_masked", "seconds")
LEVEL_UNITS = {"sigma": "sigma (0-1 scale)", "i0": "i0 (photons)"}


def level_name(noise_type: str) -> str:
    """The level parameter of a noise type: 'sigma' (gaussian, rician) or 'i0' (lowdose_ct)."""
    return NOISE_TYPES[noise_type].level


def level_unit(noise_type: str) -> str:
    """The level and its unit, e.g. 'sigma (0-1 scale)' or 'i0 (photons)'."""
    return LEVEL_UNITS[level_name(noise_type)]


# ----------------------------------------------------------------------------- files
def atomic_text(path: Path, text: str) -> Path:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)

    return atomic_write(path, write)


def safe_name(name: str) -> str:
    """A file-system safe version of a method or source name ('DDPM mean of 4' -> 'DDPM_mean_of_4')."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("._")
    return safe or "unnamed"


def level_tag(level: float, noise_type: str = "gaussian") -> str:
    """Folder name of a noise level, e.g. 0.1 -> 'sigma_0.1', i0 1e5 -> 'i0_100000'."""
    return f"{level_name(noise_type)}_{float(level):g}"


# ----------------------------------------------------------------------------- tables
def summarize(rows, methods, sigmas) -> list:
    """Per (modality, method, level): n and mean/std over slices of every score and of
    noise_std (NaN entries, from empty masks, are left out)."""
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
                for key in SCORE_KEYS + ("noise_std",):
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


def write_csv(path: Path, rows) -> Path:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]) for k in CSV_COLUMNS})
    return atomic_text(path, buf.getvalue())


def _pm(mean, std, digits):
    if np.isnan(mean):
        return "n/a"
    if np.isinf(mean):
        return "inf"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def results_markdown(summary, slices, noise_type: str, noise_seed: int) -> str:
    """Markdown tables, one per modality: rows level x method, mean ± std over slices.
    For lowdose_ct the level is i0 and a column gives the mean noise std on [0,1]."""
    photons = level_name(noise_type) == "i0"
    if photons:
        noise = (f"Noise: {noise_type}, i0 = photons per detector bin (fewer: more noise), "
                 "noise std = std of the added noise on the [0,1] intensity scale (mean over "
                 f"slices; the methods get it as their sigma), seed {noise_seed} ")
    else:
        noise = f"Noise: {noise_type}, sigma = std on the [0,1] intensity scale, seed {noise_seed} "
    lines = [
        "# Denoising evaluation",
        "",
        noise + "(the same noise for every method). Scores on the [0,1] scale (data range 1): "
        "whole slice and inside the body mask (threshold, largest component, holes "
        "filled). MAE in [0,1] units (x (high - low) for physical units). Mean ± std over "
        "slices; seconds = wall time per slice.",
        "",
    ]
    level_columns = "i0 (photons) | noise std" if photons else "sigma"
    for modality in dict.fromkeys(e["modality"] for e in summary):
        sources = sorted({s["source"] for s in slices if s["modality"] == modality})
        n = sum(1 for s in slices if s["modality"] == modality)
        lines += [
            f"## {modality.upper()} ({n} slice{'s' if n != 1 else ''} from {', '.join(sources)})",
            "",
            f"| method | {level_columns} | PSNR (dB) | SSIM | PSNR body (dB) | SSIM body | MAE | MAE body | s/slice |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |" + (" --- |" if photons else ""),
        ]
        for e in summary:
            if e["modality"] != modality:
                continue
            level = f"{e['sigma']:g} | {e['noise_std']:.4f}" if photons else f"{e['sigma']:g}"
            lines.append(
                f"| {e['method']} | {level} | {_pm(e['psnr'], e['psnr_std'], 2)} | "
                f"{_pm(e['ssim'], e['ssim_std'], 3)} | {_pm(e['psnr_masked'], e['psnr_masked_std'], 2)} | "
                f"{_pm(e['ssim_masked'], e['ssim_masked_std'], 3)} | {_pm(e['mae'], e['mae_std'], 4)} | "
                f"{_pm(e['mae_masked'], e['mae_masked_std'], 4)} | {e['seconds']:.3f} |"
            )
        lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- figures
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(path: Path, fig) -> Path:
    plt = _pyplot()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)


def plot_vs_level(path: Path, summary, noise_type: str = "gaussian") -> Path:
    """PSNR / SSIM (whole and body) against the noise level, one line per method, one
    row per modality; i0 on a log axis."""
    plt = _pyplot()
    panels = (("psnr", "PSNR (dB)"), ("ssim", "SSIM"), ("psnr_masked", "PSNR body (dB)"),
              ("ssim_masked", "SSIM body"))
    photons = level_name(noise_type) == "i0"
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
            if photons:
                ax.set_xscale("log")
                ax.set_xlabel("i0 (photons per detector bin)")
            else:
                ax.set_xlabel("sigma ([0,1] scale)")
            ax.set_ylabel(label)
            ax.set_title(f"{modality.upper()}: {label}")
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    return _save_figure(path, fig)


def plot_examples(path: Path, examples, noise_type: str = "gaussian") -> Path:
    """Per example slice: clean, noisy, each method with its PSNR, and the std maps."""
    plt = _pyplot()
    symbol = "i0" if level_name(noise_type) == "i0" else "σ"
    methods = list(dict.fromkeys(m for ex in examples for m in ex["preds"]))
    std_methods = list(dict.fromkeys(m for ex in examples for m in ex["stds"]))
    columns = ["clean", "noisy"] + methods + [f"{m} std" for m in std_methods]
    fig, axes = plt.subplots(len(examples), len(columns),
                             figsize=(2.3 * len(columns), 2.5 * len(examples)), squeeze=False)
    for r, ex in enumerate(examples):
        lo, hi = np.percentile(ex["clean"], (0.5, 99.5))
        hi = hi if hi > lo else lo + 1.0
        s = ex["slice"]
        images = [("clean", ex["clean"]), (f"noisy {symbol}={ex['sigma']:g}", ex["noisy"])]
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
def save_tiff(pred_dir: Path, method: str, level: float, s, pred01, noise_type: str = "gaussian") -> Path:
    """One prediction as float32 TIFF in physical units:
    pred_dir/<method>/<level_tag>/<source>_z<slice>.tif."""
    import tifffile

    path = (pred_dir / safe_name(method) / level_tag(level, noise_type)
            / f"{safe_name(s['source'])}_z{int(s['slice_index']):04d}.tif")
    data = to_physical(pred01, s["norm"])
    return atomic_write(path, lambda tmp: tifffile.imwrite(tmp, data))


def save_nifti(pred_dir: Path, method: str, level: float, source: str, items, noise_type: str = "gaussian") -> Path:
    """Stacks one source's saved TIFFs (items: (slice_index, path, slice), sorted by slice
    index) on the last axis, physical units, as pred_dir/<method>/<level_tag>/<source>.nii.gz.
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
    img.header["descrip"] = f"{method} {level_name(noise_type)}={level:g} {norm.get('modality', '')}"[:79].encode()
    path = pred_dir / safe_name(method) / level_tag(level, noise_type) / f"{safe_name(source)}.nii.gz"
    return atomic_write(path, lambda tmp: nib.save(img, tmp))
