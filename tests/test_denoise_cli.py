"""denoise.py's command line (issue 16): the modality of a NIfTI told from its intensities,
outputs that would destroy the input or each other refused, flags, --device and output
folders checked before the checkpoint is read; every refusal is one line on stderr naming
the flag, exit status 2 (the shared boundary of orchestration/cli.py).

Before: a NIfTI without --modality failed with "unknown modality ''"; --output equal to
--input overwrote the scan; --batch-size -2 wrote an all-NaN volume; a missing GPU or an
unwritable folder was found only after the checkpoint was loaded, or after the work."""
import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from pydicom.uid import generate_uid

from models.ddpm_conditioned import ConditionDDPM
from orchestration.checkpoints import load_checkpoint
from orchestration.volume_denoiser import denoise_volume
from synthetic import load_script, write_dicom_slice
from utils.intensity import modality_from_intensities

ROOT = Path(__file__).resolve().parents[1]
CKPT = ROOT / "pretrained" / "cdm4mi_bundled_ct_mr.ckpt"
DATA = ROOT / "run_scripts" / "data"


@pytest.fixture(scope="module")
def script():
    return load_script("denoise.py")


def refused(script, argv, capsys) -> str:
    """The one stderr line of a command line refused with exit status 2."""
    with pytest.raises(SystemExit) as exit_info:
        script.main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and err[0].startswith("denoise.py: "), (exit_info.value, err)
    return err[0]


def bundled(name, slices=slice(20, 24)):
    img = nib.load(str(DATA / name))
    return np.asarray(img.dataobj[:, :, slices], dtype=np.float32), img.affine


def save(path, volume, affine=None):
    nib.save(nib.Nifti1Image(volume, np.eye(4) if affine is None else affine), str(path))
    return path


def test_the_bundled_volumes_are_told_apart_by_their_intensities():
    ct = nib.load(str(DATA / "ct_cranium.nii.gz")).get_fdata(dtype=np.float32)
    assert modality_from_intensities(ct) == ("ct", "55 % of the voxels lie in -1100..-900, air in HU "
                                             "(values -1024 .. 1746)")
    for name in ("mr_colin27_t1.nii.gz", "mr_colin27_t1_0.5mm_test.nii.gz"):
        found, why = modality_from_intensities(nib.load(str(DATA / name)).get_fdata(dtype=np.float32))
        assert found == "mr" and "no negative values" in why
    # CT padded outside its field of view at -3024 HU is still CT by its air
    assert modality_from_intensities(np.where(ct < -1000, -3024, ct))[0] == "ct"
    # interpolation leaves MR values slightly below 0: up to 1 % of the maximum is MR
    assert modality_from_intensities(np.array([-0.5, 0, 10, 200.0]))[0] == "mr"
    ambiguous = np.random.default_rng(0).uniform(-500, 500, (20, 20, 4))
    found, why = modality_from_intensities(ambiguous)
    assert found is None and "negative, yet only 0.0 % of the voxels in -1100..-900" in why
    assert modality_from_intensities(np.full((4, 4, 4), np.nan)) == (None, "the volume has no finite voxel")


def test_a_nifti_without_modality_is_inferred_and_the_reason_printed(script, tmp_path, capsys):
    ct = save(tmp_path / "ct.nii.gz", *bundled("ct_cranium.nii.gz"))
    with pytest.warns(UserWarning, match="no noise to remove"):  # the bundled CT: sigma 0.0009
        info = script.main(["--ckpt", str(CKPT), "--input", str(ct), "--output", str(tmp_path / "ct_den.nii.gz")])
    printed = capsys.readouterr().out
    assert info["modality"] == "ct"
    assert "modality: ct (inferred: 5" in printed and "% of the voxels lie in -1100..-900, air in HU" in printed
    mr = save(tmp_path / "mr.nii.gz", *bundled("mr_colin27_t1.nii.gz"))
    info = script.main(["--ckpt", str(CKPT), "--input", str(mr), "--output", str(tmp_path / "mr_den.nii.gz"),
                        "--steps", "2"])
    printed = capsys.readouterr().out
    assert info["modality"] == "mr" and info["t_star"] == 2
    assert "modality: mr (inferred: no air in HU" in printed and "an MR magnitude image" in printed


def test_the_modality_flag_overrides_the_inference(tmp_path):
    model = load_checkpoint(ConditionDDPM, CKPT)
    mr = save(tmp_path / "mr.nii.gz", *bundled("mr_colin27_t1.nii.gz"))
    with pytest.warns(UserWarning, match="no noise to remove"):
        info = denoise_volume(model, mr, tmp_path / "o.nii.gz", modality="ct", sigma=0.0, progress=False)
    assert info["modality"] == "ct" and info["modality_source"] == "given with --modality"
    assert info["window"] == (-1024.0, 3071.0)


def test_an_ambiguous_volume_names_the_modality_flag(script, tmp_path, capsys):
    src = save(tmp_path / "odd.nii.gz", np.random.default_rng(0).uniform(-500, 500, (24, 20, 3)).astype(np.float32))
    line = refused(script, ["--ckpt", CKPT, "--input", src, "--output", tmp_path / "o.nii.gz"], capsys)
    assert "cannot tell CT from MR" in line and "give --modality ct or --modality mr" in line
    assert not (tmp_path / "o.nii.gz").exists()


def write_series(folder, modality="CT", pixels=None):
    folder.mkdir()
    uid = generate_uid()
    for i in range(3):
        path = write_dicom_slice(folder / f"im{i}.dcm", uid, [0.0, 0.0, 2.0 * i], pixels=pixels, intercept=0)
        ds = pydicom.dcmread(str(path))
        ds.Modality = modality
        ds.save_as(str(path), enforce_file_format=True)
    return folder


def test_the_dicom_modality_tag_wins_over_the_intensities(tmp_path):
    model = load_checkpoint(ConditionDDPM, CKPT)
    pixels = np.tile(np.arange(24, dtype=np.int16) * 8, (20, 1))  # 0..184, non-negative: MR-like values
    src = write_series(tmp_path / "ct", "CT", pixels)
    with pytest.warns(UserWarning, match="no noise to remove"):
        info = denoise_volume(model, src, tmp_path / "o.nii.gz", sigma=0.0, progress=False)
    assert info["modality"] == "ct" and info["modality_source"] == "the DICOM Modality tag"
    pet = write_series(tmp_path / "pt", "PT", pixels)
    with pytest.raises(ValueError, match="DICOM Modality tag is 'pt', not CT or MR: give --modality"):
        denoise_volume(model, pet, tmp_path / "p.nii.gz", sigma=0.0, progress=False)


def case_paths(tmp_path, case):
    """(argv after --ckpt, input) of an output-path conflict."""
    src = save(tmp_path / "ct.nii.gz", np.full((24, 20, 3), 40.0, np.float32))
    if case == "output is input":
        return ["--input", src, "--output", src], src
    if case == "output is input, spelled otherwise":
        (tmp_path / "sub").mkdir()
        return ["--input", src, "--output", f"{tmp_path}/sub/../ct.nii.gz"], src
    if case == "output is a hard link of the input":
        os.link(src, tmp_path / "link.nii.gz")
        return ["--input", src, "--output", tmp_path / "link.nii.gz"], src
    if case == "std is output":
        return ["--input", src, "--output", tmp_path / "o.nii.gz", "--std", tmp_path / "o.nii.gz",
                "--samples", "2", "--eta", "1"], src
    series = write_series(tmp_path / "series")
    if case == "output inside the DICOM input":
        return ["--input", series, "--output", series / "den.nii.gz"], series
    assert case == "output inside the DICOM output"
    return ["--input", series, "--output", tmp_path / "den" / "den.nii.gz", "--output-dicom", tmp_path / "den"], series


CONFLICTS = {"output is input": "--output .* is the input .*it would overwrite the scan",
             "output is input, spelled otherwise": "--output .* is the input",
             "output is a hard link of the input": "--output .*link.nii.gz is the input",
             "std is output": "--std .*o.nii.gz is the same path as --output",
             "output inside the DICOM input": "--output .*den.nii.gz lies inside the input DICOM folder",
             "output inside the DICOM output": "den.nii.gz lies inside the --output-dicom folder"}


@pytest.mark.parametrize("case", sorted(CONFLICTS))
def test_outputs_that_would_destroy_the_input_or_each_other_are_refused_first(script, tmp_path, capsys, case):
    argv, src = case_paths(tmp_path, case)
    before = sorted(p for p in tmp_path.rglob("*"))
    data = {p: p.read_bytes() for p in before if p.is_file()}
    line = refused(script, ["--ckpt", tmp_path / "missing.ckpt", *argv], capsys)  # refused before the checkpoint
    assert re.search(CONFLICTS[case], line), line
    assert sorted(p for p in tmp_path.rglob("*")) == before
    assert all(p.read_bytes() == b for p, b in data.items())


BAD_FLAGS = [(["--batch-size", "-2"], "--batch-size must be an integer >= 1, got -2"),
             (["--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
             (["--steps", "0"], "--steps must be an integer >= 1, got 0"),
             (["--samples", "0"], "--samples must be an integer >= 1, got 0"),
             (["--overlap", "-1"], "--overlap must be an integer >= 0, got -1"),
             (["--tile", "4"], "--tile must be an integer >= 8 and larger than twice --overlap (32), got 4"),
             (["--tile", "64", "--overlap", "32"], "--tile must be an integer >= 8 and larger than twice --overlap"),
             (["--eta", "1.5"], "--eta must lie in [0, 1], got 1.5"),
             (["--eta", "-0.1"], "--eta must lie in [0, 1], got -0.1"),
             (["--eta", "nan"], "--eta must lie in [0, 1], got nan"),
             (["--sigma", "-1"], "--sigma must be 'auto' or a finite number >= 0"),
             (["--sigma", "inf"], "--sigma must be 'auto' or a finite number >= 0")]


@pytest.mark.parametrize("flags, message", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_numbers_are_refused_before_anything_is_read(script, tmp_path, capsys, flags, message):
    src = save(tmp_path / "ct.nii.gz", np.full((24, 20, 3), 40.0, np.float32))
    line = refused(script, ["--ckpt", tmp_path / "missing.ckpt", "--input", src, "--output", tmp_path / "o.nii.gz",
                            *flags], capsys)
    assert message in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz"]


def test_a_negative_batch_size_no_longer_writes_nan(tmp_path):
    model = load_checkpoint(ConditionDDPM, CKPT)
    src = save(tmp_path / "ct.nii.gz", np.full((24, 20, 3), 40.0, np.float32))
    with pytest.raises(ValueError, match="--batch-size must be an integer >= 1, got -2"):
        denoise_volume(model, src, tmp_path / "o.nii.gz", modality="ct", sigma=0.1, batch_size=-2, progress=False)
    assert not (tmp_path / "o.nii.gz").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
@pytest.mark.parametrize("device, message", [("cuda", "--device cuda: no CUDA GPU is usable on this machine"),
                                             ("cuda:3", "--device cuda:3: no CUDA GPU is usable on this machine"),
                                             ("gpu", "--device 'gpu': not a device name")])
def test_a_missing_gpu_is_named_before_the_checkpoint_is_read(script, tmp_path, capsys, device, message):
    src = save(tmp_path / "ct.nii.gz", np.full((24, 20, 3), 40.0, np.float32))
    line = refused(script, ["--ckpt", tmp_path / "missing.ckpt", "--input", src, "--output", tmp_path / "o.nii.gz",
                            "--device", device], capsys)
    assert message in line


def test_an_unwritable_output_folder_is_found_before_the_work(script, tmp_path, capsys, monkeypatch):
    src = save(tmp_path / "ct.nii.gz", np.full((24, 20, 3), 40.0, np.float32))
    (tmp_path / "file.txt").write_text("not a folder")
    line = refused(script, ["--ckpt", tmp_path / "missing.ckpt", "--input", src, "--output",
                            tmp_path / "file.txt" / "o.nii.gz"], capsys)
    assert line.startswith(f"denoise.py: --output {tmp_path / 'file.txt'}") and "file.txt is not a folder" in line
    # a folder that does not exist yet is made when written: it is probed (made, written, removed)
    locked = tmp_path / "locked"
    locked.mkdir()
    import tempfile

    def no_write(dir=None, **kw):  # root ignores file modes: a folder that refuses files, mocked
        if Path(dir).is_relative_to(locked):
            raise PermissionError(13, "Permission denied")
        return original(dir=dir, **kw)

    original = tempfile.TemporaryFile
    monkeypatch.setattr(tempfile, "TemporaryFile", no_write)
    line = refused(script, ["--ckpt", tmp_path / "missing.ckpt", "--input", src, "--output", tmp_path / "o.nii.gz",
                            "--std", locked / "new" / "std.nii.gz", "--samples", "2", "--eta", "1"], capsys)
    assert f"--std {locked / 'new'}: cannot write there (Permission denied)" in line
    assert not (locked / "new").exists() and not (tmp_path / "o.nii.gz").exists()
