r"""Paired comparison of methods in one or more evaluation scores.csv files.

    python run_scripts/compare_scores.py --reference "DDPM flips only" \
        --scores seed0=outputs/ablation_seed0/scores.csv seed1=outputs/ablation_seed1/scores.csv \
        [--methods "DDPM all" ...] [--score psnr_masked] [--by-source] [--out table.md]

The files (one per training seed, say; TAG names each) must score the same slices with
the same noise: a method's score on a slice is averaged over them. The unit of
the comparison is the slice, (source, slice_index) of one set: a method's score is
averaged over the tags, and, in the "all levels" rows, over the noise levels too, before
it is paired with the reference's on the same slice. The interval is a 95 % percentile
bootstrap of the mean per-slice difference (metrics.statistics.paired_comparison; the logic is evaluation/compare.py), so it
covers slice-to-slice variation, and training-seed variation only as far as the tags
average it out. One Markdown table per set (same-subject, unseen) is printed, or with
--by-source one per set and source (volume). A method may come from one file and the
reference from another, as long as they score the same slices with the same noise.

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
from pathlib import Path

from evaluation.compare import compare_scores
from evaluation.reporting import atomic_text
from orchestration.cli import check_writable_folder, user_error_boundary


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scores", nargs="+", required=True, metavar="[TAG=]CSV", help="evaluation scores.csv files")
    parser.add_argument("--reference", required=True, help="the method every other is compared with")
    parser.add_argument("--methods", nargs="*", help="methods to compare (default: all but the reference)")
    parser.add_argument("--score", default="psnr_masked", help="a score column (default psnr_masked: body PSNR, dB)")
    parser.add_argument("--by-source", action="store_true", help="one table per source (volume) of each set")
    parser.add_argument("--out", help="also write the tables to this Markdown file")
    return parser.parse_args(argv)


def main(argv=None) -> str:
    args = parse_args(argv)
    return user_error_boundary("compare_scores.py", lambda: run(args))


def run(args: argparse.Namespace) -> str:
    if args.out:
        if Path(args.out).is_dir():
            raise IsADirectoryError(f"--out {args.out}: is a folder, not a Markdown file")
        check_writable_folder(Path(args.out).absolute().parent, "--out")
    text = compare_scores(args.scores, args.reference, args.methods, args.score, by_source=args.by_source)
    print(text)
    if args.out:
        atomic_text(Path(args.out), text)
    return text


if __name__ == "__main__":
    main()
