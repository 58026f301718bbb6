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

REQUIRED = {"set", "method", "source", "slice_index", "sigma"}


def tagged_rows(specs: list[str]) -> list[dict]:
    """The rows of each ``[TAG=]CSV``, with ``tag`` set (the file's index without a TAG)."""
    rows = []
    for i, spec in enumerate(specs):
        tag, sep, path = spec.partition("=")
        if not sep:
            tag, path = str(i), spec
        if not Path(path).is_file():
            raise FileNotFoundError(f"scores file not found: {path}")
        with open(path, newline="", encoding="utf-8") as f:
            missing = REQUIRED - set(next(csv.reader(f), []))
        if missing:
            raise ValueError(f"{path} lacks the column(s) {sorted(missing)} of an evaluation scores.csv")
        rows += [{**r, "tag": tag} for r in read_scores(Path(path))]
    return rows


def slice_means(rows, group: str, method: str, score: str, level=None) -> dict:
    """{(source, slice_index): mean score over tags (and levels unless ``level``)}."""
    acc = defaultdict(list)
    for r in rows:
        if r["set"] == group and r["method"] == method and (level is None or r["sigma"] == level):
            acc[(r["source"], int(r["slice_index"]))].append(r[score])
    return {k: float(np.mean(v)) for k, v in acc.items() if np.all(np.isfinite(v))}


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
    if args.score not in NUMERIC:
        raise SystemExit(f"compare_scores.py: unknown score {args.score!r}; choose from {', '.join(NUMERIC)}")
    try:
        rows = tagged_rows(args.scores)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"compare_scores.py: {err}") from err
    names = sorted({r["method"] for r in rows})
    for method in [args.reference, *(args.methods or [])]:
        if method not in names:
            raise SystemExit(f"compare_scores.py: method {method!r} is not in the scores; they hold {names}")
    methods = args.methods or [m for m in names if m != args.reference]
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
