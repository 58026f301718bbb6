"""Build the through-plane spacing test volumes of issue 17 (not committed: about 4 MB).

The same anatomy at thicker slices: the slices of Colin27 (ch2) and Cranium just above the
bundled training slabs, which no training split holds, averaged over n consecutive slices
(a thick slice is the mean of the thin ones it covers):

  spacing_mr_colin27_{1,2,3}mm.nii.gz  ch2 slices 104-133 (z = 32..61 mm), 1 mm -> 1, 2, 3 mm
  spacing_ct_cranium_{1.5,3,4.5}mm.nii.gz  Cranium slices 88-105, 1.5 mm -> 1.5, 3, 4.5 mm

float32 (MR scanner units, CT HU), RAS, axial slices on the last axis. The test volumes of
`run_scripts/configs/eval/context_spacing.yaml` (docs/RESULTS.md, "Neighbouring slices").

Usage (apt-get downloads the two Debian packages, as build_bundled_data.py does):
    .venv/bin/python run_scripts/data/build_spacing_test.py [--out DIR]   # default cache/spacing_test
"""

import argparse
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

from build_bundled_data import CT_SLICES, MR_SLICES, build_ct, build_mr, fetch_packages, save_nifti

MR_ABOVE = (MR_SLICES[1], MR_SLICES[1] + 30)  # 30 slices of 1 mm above the training slab
CT_ABOVE = (CT_SLICES[1], CT_SLICES[1] + 18)  # 18 slices of 1.5 mm above it (of 108)


def thick_slices(volume: np.ndarray, n: int) -> np.ndarray:
    """Mean of each run of n consecutive slices (last axis); a trailing remainder is dropped."""
    m = volume.shape[2] // n * n
    return volume[:, :, :m].reshape(*volume.shape[:2], m // n, n).mean(axis=3, dtype=np.float64)


def write_thick(full: Path, lo_hi: tuple[int, int], factors: dict[str, int], stem: str, out: Path) -> None:
    src = nib.load(full)
    lo, hi = lo_hi
    thin = np.asarray(src.dataobj, dtype=np.float64)[:, :, lo:hi]
    for label, n in factors.items():
        affine = src.affine.copy()
        affine[:3, 2] *= n
        affine[:3, 3] = src.affine[:3, :3] @ np.array([0, 0, lo + (n - 1) / 2]) + src.affine[:3, 3]
        save_nifti(thick_slices(thin, n), affine, np.float32, out / f"{stem}_{label}.nii.gz")


def main() -> None:
    default = Path(__file__).resolve().parents[2] / "cache" / "spacing_test"
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=default, help="output folder")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = fetch_packages(Path(tmp))
        build_mr(root, Path(tmp) / "mr_full.nii.gz", full=True)
        build_ct(root, Path(tmp) / "ct_full.nii.gz", full=True)
        write_thick(Path(tmp) / "mr_full.nii.gz", MR_ABOVE, {"1mm": 1, "2mm": 2, "3mm": 3},
                    "spacing_mr_colin27", args.out)
        write_thick(Path(tmp) / "ct_full.nii.gz", CT_ABOVE, {"1.5mm": 1, "3mm": 2, "4.5mm": 3},
                    "spacing_ct_cranium", args.out)
    for path in sorted(args.out.glob("spacing_*.nii.gz")):
        img = nib.load(path)
        print(f"{path.name}: shape {img.shape}, spacing {tuple(round(float(z), 3) for z in img.header.get_zooms())} mm")


if __name__ == "__main__":
    main()
