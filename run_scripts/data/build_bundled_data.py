"""Rebuild the bundled demo volumes from their Debian packages.

Writes, next to this script:
  mr_colin27_t1.nii.gz  Colin27 T1 MR (mricron-data, BSD-3-clause): 48 axial slices,
                        uint8 scanner units as shipped, 1 mm isotropic, RAS orientation.
  ct_cranium.nii.gz     Cranium head CT (invesalius-examples, GPL-2): 48 axial slices,
                        int16 HU, 0.957 x 0.957 x 1.5 mm, RAS orientation.
  mr_colin27_t1_0.5mm_test.nii.gz
                        Colin27 at 0.5 mm (mricron-data ch2better, BSD-3-clause, skull
                        stripped): the axial slab at the world positions of the bundled
                        MR's test slab (z = 27..32 mm), cropped in-plane to the head's
                        bounding box, uint8 as shipped, 0.5 mm isotropic, RAS. An unseen
                        test volume (evaluation.test_volumes), never a training volume.
Axial slices are on the last array axis of every file.

Usage (no root needed; runs `apt-get update` once if the download fails):
    .venv/bin/python run_scripts/data/build_bundled_data.py [--out DIR] [--full]
--full keeps every slice (181 MR, 108 CT slices) for full-size experiments; the 0.5 mm
test slab is the same slab either way.
"""

import argparse
import gzip
import io
import os
import plistlib
import subprocess
import tarfile
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

PACKAGES = ("mricron-data", "invesalius-examples")
MR_MEMBER = "usr/share/mricron/templates/ch2.nii.gz"
CT_MEMBER = "usr/share/doc/invesalius-examples/examples/Cranium.inv3"
MR_05MM_MEMBER = "usr/share/mricron/templates/ch2better.nii.gz"
MR_SLICES = (56, 104)  # axial block through the lateral ventricles, 1 mm apart
# The test slab of the bundled MR under the default split (slab, fractions 0.7/0.15/0.15,
# gap 4): its slices 42-47 of 48, i.e. ch2.nii.gz slices 98-103 (z = 27..32 mm).
MR_TEST_SLAB = (98, 104)
CROP_MARGIN = 4  # voxels kept around the head's bounding box in the 0.5 mm slab
CT_SLICES = (40, 88)  # axial block through the brain, 1.5 mm apart


def fetch_packages(workdir: Path) -> Path:
    """Download the two .deb files with apt-get and unpack them under workdir/root."""
    cmd = ["apt-get", "download", *PACKAGES]
    if subprocess.run(cmd, cwd=workdir).returncode != 0:
        subprocess.run(["apt-get", "update"], check=True)
        subprocess.run(cmd, cwd=workdir, check=True)
    root = workdir / "root"
    root.mkdir()
    for deb in sorted(workdir.glob("*.deb")):
        subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
    return root


def atomic_save(img: nib.Nifti1Image, target: Path) -> None:
    """Save a NIfTI image to a temporary file in the target folder, then rename it."""
    fd, tmp = tempfile.mkstemp(suffix=".nii.gz", dir=target.parent)
    os.close(fd)
    try:
        nib.save(img, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_nifti(data: np.ndarray, affine: np.ndarray, dtype, target: Path) -> None:
    """``data`` as ``dtype`` in a NIfTI-1 file with ``affine`` and mm units, saved atomically."""
    img = nib.Nifti1Image(data.astype(dtype), affine)
    img.header.set_data_dtype(dtype)
    img.header.set_xyzt_units("mm")
    atomic_save(img, target)


def build_mr(root: Path, target: Path, full: bool) -> None:
    """Cut a block of axial slices (all with full) out of Colin27 (already RAS, uint8)."""
    src = nib.load(root / MR_MEMBER)
    lo, hi = (0, src.shape[2]) if full else MR_SLICES
    data = np.asarray(src.dataobj)[:, :, lo:hi]
    affine = src.affine.copy()
    affine[:3, 3] = src.affine[:3, :3] @ np.array([0, 0, lo]) + src.affine[:3, 3]
    save_nifti(data, affine, np.uint8, target)


def build_mr_05mm(root: Path, target: Path) -> None:
    """Cut the slab of ch2better (Colin27 at 0.5 mm, RAS, uint8) that covers the world z
    range of the bundled MR's test slab; crop it in-plane to the nonzero voxels plus
    CROP_MARGIN. The voxel values are kept as shipped."""
    ref = nib.load(root / MR_MEMBER)
    src = nib.load(root / MR_05MM_MEMBER)
    world_z = [(ref.affine @ np.array([0, 0, k, 1.0]))[2] for k in (MR_TEST_SLAB[0], MR_TEST_SLAB[1] - 1)]
    inv = np.linalg.inv(src.affine)
    z0, z1 = (int(round((inv @ np.array([0, 0, z, 1.0]))[2])) for z in world_z)
    slab = np.asarray(src.dataobj)[:, :, z0 : z1 + 1].astype(np.uint8)
    nonzero = np.argwhere(slab.max(axis=2) > 0)
    lo = np.maximum(nonzero.min(axis=0) - CROP_MARGIN, 0)
    hi = np.minimum(nonzero.max(axis=0) + CROP_MARGIN + 1, slab.shape[:2])
    data = np.ascontiguousarray(slab[lo[0] : hi[0], lo[1] : hi[1]])
    affine = src.affine.copy()
    affine[:3, 3] = src.affine[:3, :3] @ np.array([lo[0], lo[1], z0]) + src.affine[:3, 3]
    save_nifti(data, affine, np.uint8, target)


def read_inv3(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Read an InVesalius project: (Z, rows, cols) int16 HU array and (col, row, slice) mm spacing."""
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(path.read_bytes()))) as tar:
        members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
        plist = plistlib.loads(tar.extractfile(members["main.plist"]).read())
        matrix = plist["matrix"]
        raw = tar.extractfile(members[matrix["filename"]]).read()
    volume = np.frombuffer(raw, dtype=np.dtype(matrix["dtype"])).reshape(matrix["shape"])
    return volume, tuple(float(s) for s in plist["spacing"])


def build_ct(root: Path, target: Path, full: bool) -> None:
    """Cut a block of axial slices (all with full) out of Cranium; store a RAS NIfTI in HU."""
    volume, (sx, sy, sz) = read_inv3(root / CT_MEMBER)
    lo, hi = (0, volume.shape[0]) if full else CT_SLICES
    # Cranium rows run posterior->anterior (upside down); flip them so that the
    # radiological display (anterior up, patient's right on the image left) results.
    display = volume[lo:hi, ::-1, :]
    # Radiological display D[r, c] corresponds to RAS voxel [nx-1-c, ny-1-r].
    ras = np.ascontiguousarray(display.transpose(2, 1, 0)[::-1, ::-1, :])
    affine = np.diag([sx, sy, sz, 1.0])
    affine[:3, 3] = -0.5 * np.array(ras.shape) * np.array([sx, sy, sz])
    save_nifti(ras, affine, np.int16, target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="output folder")
    parser.add_argument("--full", action="store_true", help="keep every slice (full-size volumes)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = fetch_packages(Path(tmp))
        build_mr(root, args.out / "mr_colin27_t1.nii.gz", args.full)
        build_ct(root, args.out / "ct_cranium.nii.gz", args.full)
        build_mr_05mm(root, args.out / "mr_colin27_t1_0.5mm_test.nii.gz")
    for name in ("mr_colin27_t1.nii.gz", "ct_cranium.nii.gz", "mr_colin27_t1_0.5mm_test.nii.gz"):
        img = nib.load(args.out / name)
        print(f"{name}: shape {img.shape}, {img.get_data_dtype()}, spacing {img.header.get_zooms()} mm")


if __name__ == "__main__":
    main()
