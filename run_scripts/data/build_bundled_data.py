"""Rebuild the bundled demo volumes from their Debian packages.

Writes, next to this script:
  mr_colin27_t1.nii.gz  Colin27 T1 MR (mricron-data, BSD-3-clause): 48 axial slices,
                        uint8 scanner units as shipped, 1 mm isotropic, RAS orientation.
  ct_cranium.nii.gz     Cranium head CT (invesalius-examples, GPL-2): 48 axial slices,
                        int16 HU, 0.957 x 0.957 x 1.5 mm, RAS orientation.
Axial slices are on the last array axis of both files.

Usage (no root needed; runs `apt-get update` once if the download fails):
    .venv/bin/python run_scripts/data/build_bundled_data.py [--out DIR] [--full]
--full keeps every slice (181 MR, 108 CT slices) for full-size experiments.
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
MR_SLICES = (56, 104)  # axial block through the lateral ventricles, 1 mm apart
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


def build_mr(root: Path, target: Path, full: bool) -> None:
    """Cut a block of axial slices (all with full) out of Colin27 (already RAS, uint8)."""
    src = nib.load(root / MR_MEMBER)
    lo, hi = (0, src.shape[2]) if full else MR_SLICES
    data = np.asarray(src.dataobj)[:, :, lo:hi].astype(np.uint8)
    affine = src.affine.copy()
    affine[:3, 3] = src.affine[:3, :3] @ np.array([0, 0, lo]) + src.affine[:3, 3]
    img = nib.Nifti1Image(data, affine)
    img.header.set_data_dtype(np.uint8)
    img.header.set_xyzt_units("mm")
    atomic_save(img, target)


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
    ras = np.ascontiguousarray(display.transpose(2, 1, 0)[::-1, ::-1, :]).astype(np.int16)
    affine = np.diag([sx, sy, sz, 1.0])
    affine[:3, 3] = -0.5 * np.array(ras.shape) * np.array([sx, sy, sz])
    img = nib.Nifti1Image(ras, affine)
    img.header.set_data_dtype(np.int16)
    img.header.set_xyzt_units("mm")
    atomic_save(img, target)


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
    for name in ("mr_colin27_t1.nii.gz", "ct_cranium.nii.gz"):
        img = nib.load(args.out / name)
        print(f"{name}: shape {img.shape}, {img.get_data_dtype()}, spacing {img.header.get_zooms()} mm")


if __name__ == "__main__":
    main()
