"""What the evaluation writes: scores.csv, results.md, the figures and the predictions.

``evaluation.loop.evaluate`` computes the rows (one per level, slice and method) and
calls these. Noise levels are named in their unit: sigma (std on the [0,1] scale) for
gaussian and rician noise, i0 (photons per detector bin) for lowdose_ct. Predictions
are saved in physical units (HU for CT) with ``utils.intensity.to_physical``.

Every slice belongs to a set (its "set" key, default "same-subject"): "same-subject" for
the held-out slabs of the training volumes, "unseen" for volumes no training split
touches (``evaluation.test_volumes``). Rows, tables and figure rows are kept apart by set.
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
    "noise_type", "level_unit", "noise_std", "set",
    "rmse_hu_masked", "psnr_ct_window", "ssim_ct_window",
)
SCORE_KEYS = ("psnr", "ssim", "mae", "psnr_masked", "ssim_masked", "mae_masked", "seconds",
              "rmse_hu_masked", "psnr_ct_window", "ssim_ct_window")
LEVEL_UNITS = {"sigma": "sigma (0-1 scale)", "i0": "i0 (photons)"}
SAME_SUBJECT, UNSEEN = "same-subject", "unseen"
SETS = (SAME_SUBJECT, UNSEEN)
SET_TITLES = {SAME_SUBJECT: "Same-subject slabs", UNSEEN: "Unseen volumes"}
SET_NOTES = {
    SAME_SUBJECT: "Held-out slabs of the training volumes (the data module's test split): "
                  "never trained on, but the same subjects and scanners.",
    UNSEEN: "Volumes no training split touches (`evaluation.test_volumes`).",
}


def slice_set(s: dict) -> str:
    """The set of a slice dict: its "set" key, default "same-subject"."""
    return s.get("set") or SAME_SUBJECT


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
    """Per (set, modality, method, level): n and mean/std over slices of every score and
    of noise_std (NaN entries, from empty masks, are left out). Sets in SETS order."""
    summary = []
    groups = dict.fromkeys((slice_set(r), r["modality"]) for r in rows)
    for group in sorted(groups, key=lambda g: SETS.index(g[0])):
        for sigma in sigmas:
            for method in methods:
                sel = [r for r in rows if (slice_set(r), r["modality"]) == group
                       and r["method"] == method and r["sigma"] == sigma]
                if not sel:
                    continue
                entry = {"set": group[0], "modality": group[1], "method": method, "sigma": sigma,
                         "n": len(sel)}
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


def best_methods(entries) -> list:
    """Per level of one table's summary entries: (level, [methods with the highest mean
    body PSNR] (ties all listed; empty when every mean is NaN), that PSNR)."""
    out = []
    for sigma in dict.fromkeys(e["sigma"] for e in entries):
        scores = {e["method"]: e["psnr_masked"] for e in entries
                  if e["sigma"] == sigma and not np.isnan(e["psnr_masked"])}
        best = max(scores.values()) if scores else float("nan")
        out.append((sigma, [m for m, v in scores.items() if v == best], best))
    return out


def _best_line(entries, photons: bool) -> str:
    symbol = "i0" if photons else "sigma"
    parts = []
    for sigma, methods, best in best_methods(entries):
        won = " = ".join(methods) + f" ({best:.2f} dB)" if methods else "n/a"
        parts.append(f"{symbol} {sigma:g}: {won}")
    return "Highest mean body PSNR: " + "; ".join(parts) + "."


def _source_list(slices) -> list:
    """One bullet per unseen source: name, modality, slice count and label."""
    lines = []
    for source in dict.fromkeys(s["source"] for s in slices):
        sel = [s for s in slices if s["source"] == source]
        n, label = len(sel), sel[0].get("label")
        lines.append(f"- {source}: {sel[0]['modality'].upper()}, {n} slice{'s' if n != 1 else ''}"
                     + (f", {label}" if label else ""))
    return lines


def results_markdown(summary, slices, noise_type: str, noise_seed: int) -> str:
    """Two sections, "Same-subject slabs" and "Unseen volumes", each with one Markdown
    table per modality: rows level x method, mean ± std over slices, and a line naming
    the method with the highest mean body PSNR per level. For lowdose_ct the level is
    i0 and a column gives the mean noise std on [0,1]."""
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
    for group in SETS:
        lines += [f"## {SET_TITLES[group]}", "", SET_NOTES[group], ""]
        entries = [e for e in summary if e.get("set", SAME_SUBJECT) == group]
        in_set = [s for s in slices if slice_set(s) == group]
        if not entries:
            lines += ["No slices of this set were scored"
                      + (": list volumes in `evaluation.test_volumes`." if group == UNSEEN else "."), ""]
            continue
        if group == UNSEEN:
            lines += _source_list(in_set) + [""]
        lines += _set_tables(entries, in_set, photons)
    return "\n".join(lines)


def _set_tables(summary, slices, photons: bool) -> list:
    """The per-modality tables of one set (with their best-method lines)."""
    lines = []
    level_columns = "i0 (photons) | noise std" if photons else "sigma"
    for modality in dict.fromkeys(e["modality"] for e in summary):
        sources = sorted({s["source"] for s in slices if s["modality"] == modality})
        n = sum(1 for s in slices if s["modality"] == modality)
        lines += [
            f"### {modality.upper()} ({n} slice{'s' if n != 1 else ''} from {', '.join(sources)})",
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
        lines += ["", _best_line([e for e in summary if e["modality"] == modality], photons), ""]
    return lines


# ----------------------------------------------------------------------------- figures
def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(path: Path, fig) -> Path:
    plt = pyplot()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)


#: the panels of the evaluation's figure: score -> axis label
SUMMARY_PANELS = {"psnr": "PSNR (dB)", "ssim": "SSIM", "psnr_masked": "PSNR body (dB)", "ssim_masked": "SSIM body"}


def summary_curves(summary) -> dict:
    """``summarize``'s entries as ``plot_vs_level`` curves: {"<set> <MODALITY>": {method:
    {level: entry}}}."""
    curves = {}
    for e in summary:
        group = f"{e.get('set', SAME_SUBJECT)} {e['modality'].upper()}"
        curves.setdefault(group, {}).setdefault(e["method"], {})[e["sigma"]] = e
    return curves


def plot_vs_level(path: Path, curves, scores, noise_type: str = "gaussian", title: str | None = None) -> Path:
    """Scores against the noise level: one row of panels per group, one panel per score, one
    line per curve; i0 (photons) on a log axis.

    curves: {group: {line label: {level: {score: value}}}}; scores: {score: axis label}.
    A missing or non-finite value leaves a gap."""
    plt = pyplot()
    photons = level_name(noise_type) == "i0"
    fig, axes = plt.subplots(len(curves), len(scores), figsize=(4 * max(len(scores), 2), 3.4 * len(curves)),
                             squeeze=False)
    names = list(dict.fromkeys(name for lines in curves.values() for name in lines))
    colors = {name: f"C{i % 10}" for i, name in enumerate(names)}  # one colour per line in every panel
    for r, (group, lines) in enumerate(curves.items()):
        for c, (key, label) in enumerate(scores.items()):
            ax = axes[r, c]
            for name, by_level in lines.items():
                xs = sorted(by_level)
                ys = [float(by_level[x].get(key, np.nan)) for x in xs]
                ax.plot(xs, [y if np.isfinite(y) else np.nan for y in ys], marker="o", label=name, color=colors[name])
            if photons:
                ax.set_xscale("log")
            ax.set_xlabel("i0 (photons per detector bin)" if photons else "sigma ([0,1] scale)")
            ax.set_ylabel(label)
            ax.set_title(f"{group}: {label}", fontsize=10)
            ax.grid(alpha=0.3)
    from matplotlib.lines import Line2D  # every line, also those missing from the first panel (e.g. unseen-only)

    axes[0, 0].legend(handles=[Line2D([], [], color=colors[n], marker="o", label=n) for n in names], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return save_figure(path, fig)


def plot_examples(path: Path, examples, noise_type: str = "gaussian") -> Path:
    """Per example slice: clean, noisy, each method with its PSNR, and the std maps."""
    plt = pyplot()
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
        images += [(f"{m}\n{ex['psnr'][m]:.2f} dB" if m in ex["psnr"] else f"{m}\n(not scored)", ex["preds"].get(m))
                   for m in methods]  # a method restricted to other sets (its ``sets``) has no image here
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
        axes[r, 0].set_ylabel(f"{slice_set(s)} {s['modality'].upper()}\n{s['source']} z={s['slice_index']}",
                              fontsize=8)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    return save_figure(path, fig)


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
