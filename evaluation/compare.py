"""Paired comparison of methods across evaluation scores.csv files (``compare_scores.py``).

The unit is the slice, (source, slice_index) of one set: a method's score is averaged over
the files' tags (training seeds, say) and, in the "all levels" rows, over the noise levels,
then paired with the reference's on the same slice (``metrics.statistics.paired_comparison``:
95 % bootstrap interval of the mean difference, Wilcoxon p). Rows without a numeric sigma,
duplicated rows, a file given twice and infinite scores of compared methods are refused,
naming the rows as FILE:LINE; NaN scores (not defined for that row) leave the slice out and
the table says how many.
"""
from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import numpy as np

from evaluation.reporting import SETS
from evaluation.study_tables import NUMERIC, read_scores
from metrics.statistics import paired_comparison

REQUIRED = {"set", "method", "source", "slice_index", "sigma"}
#: what makes a row unique: one score per tag, set, method, slice and level
ROW_KEY = ("tag", "set", "method", "source", "slice_index", "sigma")


def _row(r: dict) -> str:
    return f"{r['method']}, {r['source']} slice {r['slice_index']:g}, sigma {r['sigma']:g}"


def _named(rows, limit: int = 4) -> str:
    """``FILE:LINE (method, source slice i, sigma s)`` of the first ``limit`` rows."""
    text = "; ".join(f"{r['where']} ({_row(r)})" for r in rows[:limit])
    return text + (f"; and {len(rows) - limit} more" if len(rows) > limit else "")


def tagged_rows(specs: list[str], score: str | None = None) -> list[dict]:
    """The rows of each ``[TAG=]CSV``, with ``tag`` set (the file's index without a TAG) and
    ``where`` (FILE:LINE). ValueError naming the rows for a missing or NaN sigma or slice
    index and for duplicated rows (ROW_KEY); naming the file for a missing column (``score``
    too) or a file given twice."""
    rows, seen = [], {}
    for i, spec in enumerate(specs):
        tag, sep, path = spec.partition("=")
        if not sep:
            tag, path = str(i), spec
        if not Path(path).is_file():
            raise FileNotFoundError(f"scores file not found: {path}")
        if Path(path).resolve() in seen:
            raise ValueError(f"{path} is given twice ({seen[Path(path).resolve()]} and {spec}): its rows would count twice")
        seen[Path(path).resolve()] = spec
        with open(path, newline="", encoding="utf-8") as f:
            missing = (REQUIRED | ({score} if score else set())) - set(next(csv.reader(f), []))
        if missing:
            raise ValueError(f"{path} lacks the column(s) {sorted(missing)} of an evaluation scores.csv")
        try:
            found = read_scores(Path(path))
        except ValueError as err:  # a score that is not a number
            raise ValueError(f"{path}: {err}") from None
        rows += [{**r, "tag": tag, "where": f"{path}:{n + 2}"} for n, r in enumerate(found)]
    bad = [r for r in rows if not (np.isfinite(r["sigma"]) and np.isfinite(r["slice_index"]))]
    if bad:
        where = "; ".join(f"{r['where']} ({r['method']}, {r['source']})" for r in bad[:4])
        raise ValueError(f"{len(bad)} row(s) without a numeric sigma or slice_index: {where}"
                         f"{' ...' if len(bad) > 4 else ''}")
    groups = defaultdict(list)
    for r in rows:
        groups[tuple(r[k] for k in ROW_KEY)].append(r)
    repeated = [group for group in groups.values() if len(group) > 1]
    if repeated:
        raise ValueError(f"{len(repeated)} duplicated row(s) (same tag, set, method, source, slice and sigma): "
                         + "; ".join(f"{' = '.join(r['where'] for r in group)} ({_row(group[0])})"
                                     for group in repeated[:3]) + (" ..." if len(repeated) > 3 else ""))
    return rows


def refuse_infinite(rows, methods, score: str) -> None:
    """ValueError naming the rows of ``methods`` whose ``score`` is +-inf."""
    bad = [r for r in rows if r["method"] in methods and np.isinf(r[score])]
    if bad:
        raise ValueError(f"{len(bad)} row(s) with an infinite {score} (a prediction identical to the clean slice?) "
                         f"have no finite mean or difference: {_named(bad)}; compare another score "
                         "(--score ssim_masked, mae_masked) or leave that level out")


def slice_means(rows, group: str, method: str, score: str, level=None) -> dict:
    """{(source, slice_index): mean score over tags (and levels unless ``level``)}."""
    acc = defaultdict(list)
    for r in rows:
        if r["set"] == group and r["method"] == method and (level is None or r["sigma"] == level):
            acc[(r["source"], int(r["slice_index"]))].append(r[score])
    return {k: float(np.mean(v)) for k, v in acc.items() if np.all(np.isfinite(v))}


def undefined_slices(rows, group: str, methods, score: str) -> int:
    """Slices of the set left out because a compared method's score is NaN there."""
    return len({(r["source"], r["slice_index"]) for r in rows
                if r["set"] == group and r["method"] in methods and np.isnan(r[score])})


def comparison_table(rows, reference: str, methods: list[str], score: str, group: str) -> str:
    levels = sorted({r["sigma"] for r in rows if r["set"] == group})
    lines = [f"| level | method | slices | {reference} | method | difference | 95 % interval | Wilcoxon p | verdict |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for level in [*levels, None]:
        ref = slice_means(rows, group, reference, score, level)
        for method in methods:
            mine = slice_means(rows, group, method, score, level)
            common = sorted(set(ref) & set(mine))
            if not common:
                continue
            c = paired_comparison([mine[k] for k in common], [ref[k] for k in common])
            ci = f"[{c['ci_low']:+.2f}, {c['ci_high']:+.2f}]" if c["n"] > 1 else "n/a (1 slice)"
            p = f"{c['p_wilcoxon']:.3g}" if np.isfinite(c["p_wilcoxon"]) else "n/a"
            name = "all levels" if level is None else f"{level:g}"
            lines.append(f"| {name} | {method} | {c['n']} | {c['mean_b']:.2f} | {c['mean_a']:.2f} | "
                         f"{c['mean_diff']:+.2f} | {ci} | {p} | {c['verdict']} |")
    left_out = undefined_slices(rows, group, [reference, *methods], score)
    if left_out:
        lines.append(f"\n{left_out} slice(s) left out where a compared method has no {score} (NaN, not defined there).")
    return "\n".join(lines)


def compare_scores(specs: list[str], reference: str, methods: list[str] | None = None,
                   score: str = "psnr_masked", by_source: bool = False) -> str:
    """Markdown: one table per set (per set and source with ``by_source``) of ``methods``
    (default all but ``reference``) paired per slice against ``reference`` in ``score``,
    from the ``[TAG=]CSV`` files ``specs``."""
    if score not in NUMERIC:
        raise ValueError(f"--score: unknown score {score!r}; choose from {', '.join(NUMERIC)}")
    rows = tagged_rows(specs, score)
    names = sorted({r["method"] for r in rows})
    for method in [reference, *(methods or [])]:
        if method not in names:
            raise ValueError(f"method {method!r} is not in the scores; they hold {names}")
    methods = methods or [m for m in names if m != reference]
    refuse_infinite(rows, [reference, *methods], score)
    parts = [f"{score}, paired per slice against {reference}; files: {', '.join(specs)}"]
    for group in SETS:
        sources = sorted({r["source"] for r in rows if r["set"] == group})
        if not sources:
            continue
        for source in (sources if by_source else [None]):
            mine = [r for r in rows if source is None or r["source"] == source]
            title = group if source is None else f"{group}: {source}"
            parts.append(f"\n### {title}\n\n" + comparison_table(mine, reference, methods, score, group))
    return "\n".join(parts) + "\n"
