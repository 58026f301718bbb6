"""data.params.volumes from a glob or a CSV/TSV manifest (issue 19, item 1): relative paths
from the manifest's folder, subjects and explicit splits carried, DICOM series folders in a
glob, and every bad row named in one refusal before anything is converted."""
from pathlib import Path

import h5py
import pytest

from diffusion_modules.diffusion_utils.datamodule import DenoisingDataModule
from diffusion_modules.diffusion_utils.manifest import expand_volumes, read_manifest
from synthetic import make_volume, write_dicom_slice


def dataset(root: Path) -> Path:
    """data/<subject>/<scan>.nii.gz: two subjects with a CT and an MR each, and a manifest."""
    for i, s in enumerate(("p01", "p02")):
        (root / "data" / s).mkdir(parents=True)
        make_volume(root / "data" / s / "head_ct.nii.gz", "ct", n_slices=4, seed=2 * i)
        make_volume(root / "data" / s / "brain_mr.nii.gz", "mr", n_slices=4, seed=2 * i + 1)
    return root / "data"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_manifest_rows_become_volumes_with_subjects_and_splits(tmp_path):
    data = dataset(tmp_path)
    manifest = write(data / "scans.csv", "path,modality,subject,split,name\n"
                     "p01/head_ct.nii.gz,CT,p01,,p01_ct\n"
                     "# a comment row\n"
                     "\n"
                     f"{data / 'p01' / 'brain_mr.nii.gz'},mr,p01,test,p01_mr\n"
                     "p02/head_ct.nii.gz,ct,p02,train,\n")
    vols = expand_volumes(str(manifest))
    assert [v["name"] for v in vols] == ["p01_ct", "p01_mr", "head_ct"]  # name column, else the file stem
    assert [v["path"] for v in vols] == [data / "p01/head_ct.nii.gz", data / "p01/brain_mr.nii.gz",
                                         data / "p02/head_ct.nii.gz"]  # relative to the manifest's folder
    assert [v["modality"] for v in vols] == ["ct", "mr", "ct"]
    assert [v["subject"] for v in vols] == ["p01", "p01", "p02"]
    assert [v["split"] for v in vols] == [None, "test", "train"]
    assert vols[2]["where"] == "scans.csv line 6"
    tsv = write(data / "scans.tsv", "subject\tpath\tmodality\np02\tp02/brain_mr.nii.gz\tmr\n")
    assert [(v["name"], v["subject"]) for v in expand_volumes([str(tsv)])] == [("brain_mr", "p02")]


def test_a_bad_manifest_is_refused_naming_every_bad_line(tmp_path):
    data = dataset(tmp_path)
    manifest = write(data / "bad.csv", "path,modality,subject,split,name\n"
                     "p01/head_ct.nii.gz,ct,p01,,a\n"          # line 2: fine
                     "p01/missing.nii.gz,ct,p01,,b\n"          # line 3: no such file
                     "p01/brain_mr.nii.gz,pet,p01,,c\n"        # line 4: unknown modality
                     "p02/head_ct.nii.gz,ct,,,d\n"             # line 5: no subject
                     "p02/brain_mr.nii.gz,mr,p02,holdout,e\n"  # line 6: bad split
                     "p02/head_ct.nii.gz,ct,p02,,../x\n")      # line 7: a name that leaves the cache folder
    with pytest.raises(ValueError) as err:
        read_manifest(manifest)
    text = str(err.value)
    assert "5 bad row(s)" in text and "line 2" not in text
    assert "line 3: file not found" in text and "missing.nii.gz" in text
    assert "line 4: unknown modality 'pet'" in text
    assert "line 5: empty subject" in text
    assert "line 6: split 'holdout'" in text
    assert "line 7:" in text and "'../x'" in text


@pytest.mark.parametrize("header, message", [
    ("path,modality,subjects", "unknown ['subjects']; missing ['subject']"),
    ("path,modality,subject,age", "unknown ['age']"),
    ("path,subject", "missing ['modality']"),
])
def test_manifest_header_is_checked(tmp_path, header, message):
    manifest = write(tmp_path / "m.csv", header + "\nx,ct,s\n")
    with pytest.raises(ValueError, match=r"m\.csv line 1: header") as err:
        expand_volumes(str(manifest))
    assert message in str(err.value)


def test_repeated_names_and_paths_and_empty_manifests_are_refused(tmp_path):
    data = dataset(tmp_path)
    twice = write(data / "twice.csv", "path,modality,subject\np01/head_ct.nii.gz,ct,p01\np02/head_ct.nii.gz,ct,p02\n")
    with pytest.raises(ValueError, match=r"names must be unique, repeated: head_ct \(twice\.csv line 2, twice\.csv line 3\)"):
        expand_volumes([str(twice)])
    same = write(data / "same.csv", "path,modality,subject,name\np01/head_ct.nii.gz,ct,p01,a\np01/head_ct.nii.gz,ct,p01,b\n")
    with pytest.raises(ValueError, match=r"paths must be unique, repeated: .*head_ct\.nii\.gz \(same\.csv line 2, same\.csv line 3\)"):
        expand_volumes([str(same)])
    with pytest.raises(ValueError, match="lists no volume"):
        expand_volumes([str(write(data / "empty.csv", "path,modality,subject\n\n"))])
    with pytest.raises(FileNotFoundError, match="manifest not found"):
        expand_volumes([str(data / "nope.tsv")])


def test_a_glob_takes_files_and_dicom_series_folders(tmp_path):
    data = dataset(tmp_path)
    vols = expand_volumes(f"{data}/*/*.nii.gz")
    assert [v["name"] for v in vols] == ["p01_brain_mr", "p01_head_ct", "p02_brain_mr", "p02_head_ct"]
    assert [v["modality"] for v in vols] == ["mr", "ct", "mr", "ct"]
    assert [v["subject"] for v in vols] == [v["name"] for v in vols]  # no subject pattern: one subject per volume
    grouped = expand_volumes([{"glob": f"{data}/*/*.nii.gz", "subject": r"^(p\d+)/"}])
    assert [v["subject"] for v in grouped] == ["p01", "p01", "p02", "p02"]
    flat = expand_volumes([f"{data}/p01/*_ct.nii.gz"])
    assert [v["name"] for v in flat] == ["head_ct"]
    series = tmp_path / "dicom" / "series_a"
    series.mkdir(parents=True)
    for z in range(3):  # a series folder whose name says nothing: Modality tag CT
        write_dicom_slice(series / f"{z}.dcm", "1.2.3", (0, 0, 2.0 * z))
    (series.parent / "notes.txt").write_text("not a scan")
    with pytest.raises(ValueError, match=r"notes\.txt: not a \.nii/\.nii\.gz/\.h5 file"):
        expand_volumes([f"{tmp_path}/dicom/*"])
    (series.parent / "notes.txt").unlink()
    (dicom,) = expand_volumes([{"glob": f"{tmp_path}/dicom/*"}])
    assert (dicom["name"], dicom["modality"], dicom["path"]) == ("series_a", "ct", series)


def test_a_glob_without_match_or_subject_is_refused(tmp_path):
    data = dataset(tmp_path)
    with pytest.raises(ValueError, match=r"volumes\[0\]: the glob '.*\*\.nii' matches nothing"):
        expand_volumes([f"{data}/*.nii"])
    with pytest.raises(ValueError, match=r"p02/head_ct\.nii\.gz: the subject pattern 'p01' does not match"):
        expand_volumes([{"glob": f"{data}/*/head_ct.nii.gz", "subject": "p01"}])
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['name'\] of a glob entry"):
        expand_volumes([{"glob": f"{data}/*/head_ct.nii.gz", "name": "x"}])


def test_datamodule_builds_a_manifest_and_a_glob(tmp_path):
    data = dataset(tmp_path)
    manifest = write(data / "all.csv", "path,modality,subject,name\n" + "".join(
        f"{s}/{f}.nii.gz,{m},{s},{s}_{m}\n" for s in ("p01", "p02") for f, m in (("head_ct", "ct"), ("brain_mr", "mr"))))
    dm = DenoisingDataModule(str(manifest), cache_dir=tmp_path / "cache", image_size=16, stride=8,
                             split={"gap": 0, "fractions": [0.5, 0.25, 0.25]}, batch_size=4)
    dm.setup()
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["p01_ct.h5", "p01_mr.h5", "p02_ct.h5", "p02_mr.h5"]
    assert len(dm.train_set) > 0 and len(dm.test_slices()) == 4
    summary = dm.summary()
    assert (summary["volumes"], summary["subjects"], summary["volumes_per_subject"]) == (4, 2, (2, 2.0, 2))
    assert summary["slices"] == 16 and summary["modalities"]["ct"]["volumes"] == 2
    files = sorted((tmp_path / "cache").iterdir())
    counts = {}
    for path in files:
        with h5py.File(path, "r") as f:
            counts[path.stem] = f["patches"].shape[0]
    assert summary["patches"] == sum(counts.values()) and summary["bytes"] == sum(p.stat().st_size for p in files)
    assert summary["modalities"]["ct"]["patches"] == counts["p01_ct"] + counts["p02_ct"] > 0
    assert summary["modalities"]["mr"]["spacing_min"] == (1.0, 1.0, 1.0)
    globbed = DenoisingDataModule([f"{data}/p0[12]/head_ct.nii.gz"], cache_dir=tmp_path / "cache2", image_size=16,
                                  stride=8, split={"gap": 0})
    assert [v["name"] for v in globbed.volumes] == ["p01_head_ct", "p02_head_ct"]


def test_the_main_job_names_the_bad_row_before_building_anything(tmp_path):
    from omegaconf import OmegaConf

    from orchestration.run_job import check_training_volumes

    data = dataset(tmp_path)
    manifest = write(data / "m.csv", "path,modality,subject\np01/head_ct.nii.gz,ct,p01\np09/gone.nii.gz,ct,p09\n")
    cfg = OmegaConf.create({"data": {"params": {"volumes": str(manifest)}}})
    with pytest.raises(ValueError, match=r"m\.csv: 1 bad row\(s\): line 3: file not found: .*gone\.nii\.gz"):
        check_training_volumes(cfg)
    cfg = OmegaConf.create({"data": {"params": {"volumes": [f"{data}/p01/*.nii.gz", {"path": str(data / "x_ct.nii.gz")}]}}})
    with pytest.raises(FileNotFoundError, match=r"data\.params\.volumes\[1\]: volume not found: .*x_ct\.nii\.gz"):
        check_training_volumes(cfg)


def test_the_unseen_volume_check_sees_the_volumes_of_a_manifest_and_a_glob(tmp_path):
    from omegaconf import OmegaConf

    from orchestration.evaluation_job import checked_test_volumes, training_volume_paths

    data = dataset(tmp_path)
    manifest = write(data / "m.csv", "path,modality,subject,name\np01/head_ct.nii.gz,ct,p01,a\np02/head_ct.nii.gz,ct,p02,b\n")
    cfg = OmegaConf.create({"data": {"params": {"volumes": [str(manifest), {"glob": f"{data}/p0*/brain_mr.nii.gz"}]}},
                            "evaluation": {"test_volumes": [{"path": str(data / "p02" / "brain_mr.nii.gz"), "name": "t"}]}})
    assert training_volume_paths(cfg) == [data / "p01/head_ct.nii.gz", data / "p02/head_ct.nii.gz",
                                          data / "p01/brain_mr.nii.gz", data / "p02/brain_mr.nii.gz"]
    with pytest.raises(ValueError, match=r"'t' .* is the training volume .*p02/brain_mr\.nii\.gz"):
        checked_test_volumes(cfg)
    copy = tmp_path / "copy_ct.nii.gz"  # the bytes of a manifest row under another name
    copy.write_bytes((data / "p02" / "head_ct.nii.gz").read_bytes())
    cfg.evaluation.test_volumes = [{"path": str(copy), "name": "t"}]
    with pytest.raises(ValueError, match=r"has the content of the training volume .*p02/head_ct\.nii\.gz"):
        checked_test_volumes(cfg)
