"""Tables, statistics and figures of the conditioning / guidance study (docs/STUDY.md).

Input: the per-slice rows of ``evaluate`` (one ``scores.csv`` per noise type) and, per
method name, what it is: ``{"strategy", "nfe", "k", "guidance"}`` (``nfe``: network
evaluations per sample, ``k``: samples averaged, ``guidance``: CFG scale or None).
Scores are compared per slice: each difference pairs a method with a reference
(BM3D, BM4D, the U-Net) on the same slice, noise draw and level.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from evaluation.reporting import SETS, atomic_text, level_name, pyplot, save_figure
from metrics.statistics import paired_comparison

#: the score each noise type is ranked by, with the table's second score
PRIMARY = {"gaussian": ("psnr_masked", "ssim_masked"), "rician": ("psnr_masked", "ssim_masked"),
           "lowdose_ct": ("psnr_ct_window", "ssim_ct_window")}
SCORE_LABELS = {"psnr_masked": "body PSNR (dB)", "ssim_masked": "body SSIM",
                "psnr_ct_window": "brain-window PSNR (dB)", "ssim_ct_window": "brain-window SSIM",
                "rmse_hu_masked": "body RMSE (HU)"}
NUMERIC = ("sigma", "slice_index", "psnr", "ssim", "mae", "psnr_masked", "ssim_masked", "mae_masked", "seconds",
           "noise_std", "rmse_hu_masked", "psnr_ct_window", "ssim_ct_window")


def read_scores(path: Path) -> list[dict]:
    """The rows of an ``evaluate`` scores.csv with numbers as floats."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for key in NUMERIC:
            r[key] = float(r[key]) if r.get(key) not in (None, "") else float("nan")
    return rows


def _by_slice(rows, noise_type, group, level, method, score) -> dict:
    return {(r["source"], int(r["slice_index"])): r[score] for r in rows
            if r["noise_type"] == noise_type and r["set"] == group and r["sigma"] == level
            and r["method"] == method and np.isfinite(r[score])}


def comparisons(rows, methods: dict, references, n_boot: int = 10000, seed: int = 0) -> list[dict]:
    """Per (noise type, set, level, method, reference): paired_comparison of the primary
    score of the method against the reference's on the same slices."""
    out = []
    keys = sorted({(r["noise_type"], r["set"], r["sigma"]) for r in rows},
                  key=lambda k: (k[0], SETS.index(k[1]), k[2]))
    for noise_type, group, level in keys:
        score = PRIMARY[noise_type][0]
        for ref in references:
            ref_scores = _by_slice(rows, noise_type, group, level, ref, score)
            if not ref_scores:
                continue
            for method in methods:
                if method == ref:
                    continue
                mine = _by_slice(rows, noise_type, group, level, method, score)
                common = sorted(set(mine) & set(ref_scores))
                if not common:
                    continue
                stats = paired_comparison([mine[k] for k in common], [ref_scores[k] for k in common],
                                          n_boot=n_boot, seed=seed)
                out.append({"noise_type": noise_type, "set": group, "level": level, "method": method,
                            "reference": ref, "score": score, **stats})
    return out


def write_comparisons_csv(path: Path, comps) -> Path:
    cols = ("noise_type", "set", "level", "method", "reference", "score", "n", "mean_diff", "ci_low", "ci_high",
            "p_wilcoxon", "verdict")
    lines = [",".join(cols)]
    for c in comps:
        lines.append(",".join(f"{c[k]:.6g}" if isinstance(c[k], float) else f'"{c[k]}"' if "," in str(c[k])
                              else str(c[k]) for k in cols))
    return atomic_text(path, "\n".join(lines) + "\n")


def _mean(rows, noise_type, group, level, method, score) -> tuple[float, int]:
    vals = list(_by_slice(rows, noise_type, group, level, method, score).values())
    return (float(np.mean(vals)) if vals else float("nan")), len(vals)


def _levels(rows, noise_type):
    return sorted({r["sigma"] for r in rows if r["noise_type"] == noise_type})


def _groups(rows, noise_type):
    found = {r["set"] for r in rows if r["noise_type"] == noise_type}
    return [g for g in SETS if g in found]


def _cell(text) -> str:
    """A Markdown table cell: method names such as "2 matched | NFE 5" keep their bars."""
    return str(text).replace("|", "\\|")


def _fmt_level(level, noise_type) -> str:
    return f"i0 {level:.0e}" if level_name(noise_type) == "i0" else f"sigma {level:g}"


def score_table(rows, methods: dict, noise_type: str) -> str:
    """Markdown: one row per method, one column per (set, level): primary / second score."""
    first, second = PRIMARY[noise_type]
    levels, groups = _levels(rows, noise_type), _groups(rows, noise_type)
    head = ["method"] + [f"{g} {_fmt_level(lv, noise_type)}" for g in groups for lv in levels]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for method in methods:
        cells = []
        for g in groups:
            for lv in levels:
                a, n = _mean(rows, noise_type, g, lv, method, first)
                b, _ = _mean(rows, noise_type, g, lv, method, second)
                cells.append("-" if n == 0 else f"{a:.2f} / {b:.3f}")
        if any(c != "-" for c in cells):
            lines.append("| " + " | ".join([_cell(method)] + cells) + " |")
    return "\n".join(lines)


def best_per_strategy(rows, methods: dict, noise_type: str, group: str, level) -> dict:
    """strategy -> (method, mean primary score) of its best configuration at one level."""
    best = {}
    for method, info in methods.items():
        mean, n = _mean(rows, noise_type, group, level, method, PRIMARY[noise_type][0])
        if n and np.isfinite(mean) and (info["strategy"] not in best or mean > best[info["strategy"]][1]):
            best[info["strategy"]] = (method, mean)
    return best


def _ci(comp) -> str:
    if comp is None:
        return "-"
    return (f"{comp['mean_diff']:+.2f} [{comp['ci_low']:+.2f}, {comp['ci_high']:+.2f}], "
            f"p={comp['p_wilcoxon']:.2g}, n={comp['n']}")


def verdict_phrase(verdict: str, reference: str) -> str:
    """'better than BM3D', 'worse than BM3D', 'no clear difference from BM3D'."""
    return f"{verdict} {'from' if verdict == 'no clear difference' else 'than'} {reference}"


def recommendation_table(rows, methods: dict, comps, noise_type: str, diffusion: set, references) -> str:
    """Per (set, level): the best diffusion configuration by mean primary score, and its
    paired difference (95 % bootstrap interval, Wilcoxon p) to each reference."""
    head = ["set", "level", "best diffusion configuration", "mean"] + [f"minus {r}" for r in references] + ["verdict"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    index = {(c["set"], c["level"], c["method"], c["reference"]): c for c in comps if c["noise_type"] == noise_type}
    for g in _groups(rows, noise_type):
        for lv in _levels(rows, noise_type):
            cands = {m: info for m, info in methods.items() if info["strategy"] in diffusion}
            best = best_per_strategy(rows, cands, noise_type, g, lv)
            if not best:
                continue
            method, mean = max(best.values(), key=lambda mb: mb[1])
            refs = [index.get((g, lv, method, r)) for r in references]
            verdicts = [verdict_phrase(c["verdict"], r) for c, r in zip(refs, references) if c is not None]
            lines.append("| " + " | ".join([g, _fmt_level(lv, noise_type), _cell(method), f"{mean:.2f}"]
                                           + [_ci(c) for c in refs] + ["; ".join(verdicts) or "-"]) + " |")
    return "\n".join(lines)


def strategy_curves(rows, methods: dict, noise_type: str) -> dict:
    """``reporting.plot_vs_level`` curves of the study: per set, one line per strategy, its
    best configuration at each level with that configuration's mean scores."""
    curves = {}
    for g in _groups(rows, noise_type):
        for lv in _levels(rows, noise_type):
            for strategy, (method, _) in best_per_strategy(rows, methods, noise_type, g, lv).items():
                curves.setdefault(g, {}).setdefault(strategy, {})[lv] = {
                    score: _mean(rows, noise_type, g, lv, method, score)[0] for score in PRIMARY[noise_type]}
    return curves


def plot_vs_nfe(path: Path, rows, methods: dict, noise_type: str) -> Path:
    """Primary and second score against NFE at the middle level, K = 1, guidance 1 or none,
    one line per strategy (first set: same-subject when present)."""
    plt = pyplot()
    levels, groups = _levels(rows, noise_type), _groups(rows, noise_type)
    level, group = levels[len(levels) // 2], groups[0]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), squeeze=False)
    strategies = list(dict.fromkeys(info["strategy"] for info in methods.values()))
    for c, score in enumerate(PRIMARY[noise_type]):
        ax = axes[0, c]
        for strategy in strategies:
            sel = sorted((info["nfe"], m) for m, info in methods.items() if info["strategy"] == strategy
                         and info.get("nfe") and info.get("k", 1) == 1 and info.get("guidance") in (None, 1.0))
            if sel:
                ax.plot([n for n, _ in sel], [_mean(rows, noise_type, group, level, m, score)[0] for _, m in sel],
                        marker="o", label=strategy)
        ax.set_xscale("log")
        ax.set_xlabel("network evaluations per sample (NFE)")
        ax.set_ylabel(SCORE_LABELS[score])
        ax.set_title(f"{group}, {_fmt_level(level, noise_type)}", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    return save_figure(path, fig)


def study_markdown(rows, methods: dict, comps, noise_types, diffusion: set, references, header: str) -> str:
    """The study's results: per noise type the recommendation, the full score table and
    the figures written beside it."""
    parts = [header]
    for noise_type in noise_types:
        if not any(r["noise_type"] == noise_type for r in rows):
            continue
        first, second = PRIMARY[noise_type]
        parts += [f"## {noise_type}", "",
                  f"Ranked by {SCORE_LABELS[first]}; differences are per-slice paired, mean with its 95 % "
                  "bootstrap interval and the Wilcoxon signed-rank p-value. \"better\"/\"worse\" only where "
                  "the interval excludes 0.", "",
                  recommendation_table(rows, methods, comps, noise_type, diffusion, references), "",
                  f"All configurations ({SCORE_LABELS[first]} / {SCORE_LABELS[second]}, mean over slices):", "",
                  score_table(rows, methods, noise_type), "",
                  f"![{noise_type} vs level](psnr_vs_level_{noise_type}.png) "
                  f"![{noise_type} vs NFE](psnr_vs_nfe_{noise_type}.png)", ""]
    return "\n".join(parts)
