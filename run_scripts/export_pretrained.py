"""Export a training checkpoint as the small inference checkpoint that ships with the code
(EMA weights only for a DDPM, float16, no optimizer state).

    python run_scripts/export_pretrained.py runs/<run>/checkpoints/last.ckpt pretrained/cdm4mi_bundled_ct_mr.ckpt

Refused with one line on stderr and exit status 2, nothing written: an output that is the
input file, a checkpoint that torch.load(weights_only=True) cannot read, and one whose
hyper-parameters name a target outside the project's allowlist.
"""
from __future__ import annotations

import argparse


from orchestration.checkpoints import export_inference_checkpoint
from orchestration.cli import user_error_boundary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="Lightning checkpoint of a training run")
    parser.add_argument("dst", help="where to write the inference checkpoint")
    parser.add_argument("--fp32", action="store_true", help="keep float32 (default: float16 weights)")
    args = parser.parse_args(argv)
    dst = user_error_boundary("export_pretrained.py",
                              lambda: export_inference_checkpoint(args.src, args.dst, half=not args.fp32))
    print(f"wrote {dst} ({dst.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
