r"""Paired comparison of methods in one or more evaluation scores.csv files.

    python run_scripts/compare_scores.py --reference "DDPM flips only" \
        --scores seed0=outputs/ablation_seed0/scores.csv seed1=outputs/ablation_seed1/scores.csv \
        [--methods "DDPM all" ...] [--score psnr_masked] [--out table.md]

The files (one per training seed, say; TAG names each) must score the same slices with
the same noise: a method's score on a slice is averaged over them. The unit of
the comparison is the slice, (source, slice_index) of one set: a method's score is
averaged over the tags, and, in the "all levels" rows, over the noise levels too, before
it is paired with the reference's on the same slice. The interval is a 95 % percentile
bootstrap of the mean per-slice difference (metrics.statistics.paired_comparison), so it
covers slice-to-slice variation, and training-seed variation only as far as the tags
average it out. One Markdown table per set (same-subject, unseen) is printed.

Refused, with the rows named as FILE:LINE (exit status 2): a row without a numeric sigma,
two rows of the same tag, set, method, source, slice and sigma (files tagged alike, or
concatenated scores), a file given twice, and an infinite score of a compared method (PSNR of a
prediction identical to the clean slice: no finite mean or difference exists; compare
with ssim or mae, or leave that level out). A NaN (empty) score means the score is not
defined for that row (psnr_ct_window of an MR slice): such a slice is left out of that
method's comparison, and the table says how many were.
"""
from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from metrics.reporting import SETS, atomic_text  # noqa: E402
from metrics.statistics import paired_comparison  # noqa: E402
from metrics.study_tables import NUMERIC, read_scores  # noqa: E402
from orchestration.cli import check_writable_folder, user_error_boundary  # noqa: E402

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


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scores", nargs="+", required=True, metavar="[TAG=]CSV", help="evaluation scores.csv files")
    parser.add_argument("--reference", required=True, help="the method every other is compared with")
    parser.add_argument("--methods", nargs="*", help="methods to compare (default: all but the reference)")
    parser.add_argument("--score", default="psnr_masked", help="a score column (default psnr_masked: body PSNR, dB)")
    parser.add_argument("--out", help="also write the tables to this Markdown file")
    return parser.parse_args(argv)


def main(argv=None) -> str:
    args = parse_args(argv)
    return user_error_boundary("compare_scores.py", lambda: run(args))


def run(args: argparse.Namespace) -> str:
    if args.score not in NUMERIC:
        raise ValueError(f"--score: unknown score {args.score!r}; choose from {', '.join(NUMERIC)}")
    if args.out:
        if Path(args.out).is_dir():
            raise IsADirectoryError(f"--out {args.out}: is a folder, not a Markdown file")
        check_writable_folder(Path(args.out).absolute().parent, "--out")
    rows = tagged_rows(args.scores, args.score)
    names = sorted({r["method"] for r in rows})
    for method in [args.reference, *(args.methods or [])]:
        if method not in names:
            raise ValueError(f"method {method!r} is not in the scores; they hold {names}")
    methods = args.methods or [m for m in names if m != args.reference]
    refuse_infinite(rows, [args.reference, *methods], args.score)
    parts = [f"{args.score}, paired per slice against {args.reference}; files: {', '.join(args.scores)}"]
    for group in SETS:
        if any(r["set"] == group for r in rows):
            parts.append(f"\n### {group}\n\n" + comparison_table(rows, args.reference, methods, args.score, group))
    text = "\n".join(parts) + "\n"
    print(text)
    if args.out:
        atomic_text(Path(args.out), text)
    return text


if __name__ == "__main__":
    main()
