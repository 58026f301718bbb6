"""Subject-level splits (issue 19, item 2): no subject crosses train/val/test, a manifest's
split wins, the split is seeded, written to the run folder as split.csv and reused from it."""
import csv
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from diffusion_modules.diffusion_utils.datamodule import DenoisingDataModule
from diffusion_modules.diffusion_utils.splits import check_split_config, subject_split
from synthetic import make_volume, tiny_model_cfg


def manifest(root: Path, n_subjects=10, per_subject=3, splits=None) -> Path:
    """A manifest of n_subjects with per_subject volumes each (CT, MR, CT ...; tiny files);
    ``splits``: {subject: split} for the split column."""
    root.mkdir(parents=True, exist_ok=True)
    lines = ["path,modality,subject,split,name"]
    for s in range(n_subjects):
        for k in range(per_subject):
            modality = "ct" if k % 2 == 0 else "mr"
            make_volume(root / f"s{s:02d}_{k}_{modality}.nii.gz", modality, n_slices=3, seed=100 * s + k)
            lines.append(f"s{s:02d}_{k}_{modality}.nii.gz,{modality},subj{s:02d},{(splits or {}).get(f'subj{s:02d}', '')},"
                         f"v{s:02d}_{k}")
    (root / "m.csv").write_text("\n".join(lines) + "\n")
    return root / "m.csv"


def dm(volumes, tmp_path, **kwargs) -> DenoisingDataModule:
    kwargs.setdefault("split", {"mode": "subject"})
    return DenoisingDataModule(volumes, cache_dir=tmp_path / "cache", image_size=16, stride=8, batch_size=4, **kwargs)


def by_subject(data: DenoisingDataModule) -> dict:
    out = {}
    for v in data.volumes:
        out.setdefault(v["subject"], set()).add(data.assignment[v["name"]])
    return out


def test_no_subject_crosses_and_the_seed_decides(tmp_path):
    data = dm(str(manifest(tmp_path / "d")), tmp_path)
    assert all(len(parts) == 1 for parts in by_subject(data).values())
    counts = {p: sum(1 for parts in by_subject(data).values() if parts == {p}) for p in ("train", "val", "test")}
    assert counts == {"train": 6, "val": 2, "test": 2}  # 10 subjects at 0.7 / 0.15 / 0.15: round(1.5) = 2
    again = dm(str(manifest(tmp_path / "d")), tmp_path)
    assert again.assignment == data.assignment  # seeded: the same every time
    other = dm(str(manifest(tmp_path / "d")), tmp_path, seed=7)
    assert other.assignment != data.assignment and all(len(p) == 1 for p in by_subject(other).values())


def test_subject_split_keeps_each_modality_group_in_val_and_test():
    vols = [{"name": f"{m}{i}", "subject": f"{m}{i}", "modality": m, "split": None, "where": "x"}
            for m in ("ct", "mr") for i in range(10)]
    assignment = subject_split(vols, [0.6, 0.2, 0.2], seed=0)
    for m in ("ct", "mr"):
        mine = [assignment[f"{m}{i}"] for i in range(10)]
        assert (mine.count("train"), mine.count("val"), mine.count("test")) == (6, 2, 2)


def test_the_manifest_split_wins_for_every_volume_of_its_subject(tmp_path):
    m = manifest(tmp_path / "d", splits={"subj03": "test", "subj04": "test", "subj05": "val"})
    text = m.read_text().splitlines()
    text[1 + 3 * 3 + 1] = text[1 + 3 * 3 + 1].replace(",test,", ",,")  # one of subj03's rows leaves it empty: follows
    m.write_text("\n".join(text) + "\n")
    data = dm(str(m), tmp_path)
    assert by_subject(data)["subj03"] == {"test"} and by_subject(data)["subj04"] == {"test"}
    assert by_subject(data)["subj05"] == {"val"}
    assert all(len(parts) == 1 for parts in by_subject(data).values())
    text[1 + 3 * 3 + 1] = text[1 + 3 * 3 + 1].replace(",,", ",train,")
    m.write_text("\n".join(text) + "\n")
    with pytest.raises(ValueError, match=r"subject 'subj03' is given several splits: m\.csv line 11 \(test\), "
                                         r"m\.csv line 12 \(train\)"):
        dm(str(m), tmp_path)


def test_too_few_subjects_and_ignored_split_columns_are_refused(tmp_path):
    m = manifest(tmp_path / "d", n_subjects=2)
    with pytest.raises(ValueError, match="subject split needs at least 3 subjects .* got 2"):
        dm(str(m), tmp_path)
    m = manifest(tmp_path / "e", n_subjects=4, splits={"subj01": "test"})
    with pytest.raises(ValueError, match=r"split mode 'slab' ignores the split column .*m\.csv line 5 \(test\)"):
        dm(str(m), tmp_path, split={"mode": "slab"})
    m = manifest(tmp_path / "f", n_subjects=4, per_subject=2)  # sorted names put v01_1 in val beside v01_0 in train?
    with pytest.raises(ValueError, match=r"split mode 'volume' \(sorted names\) puts one subject's volumes into "
                                         r"several splits: subject 'subj03': test \['v03_1'\]; val \['v03_0'\]"):
        dm(str(m), tmp_path, split={"mode": "volume"})


def test_split_slices_hold_only_the_subjects_of_each_split(tmp_path):
    data = dm(str(manifest(tmp_path / "d", n_subjects=5, per_subject=2)), tmp_path,
              split={"mode": "subject", "fractions": [0.6, 0.2, 0.2]})
    data.prepare_data()
    parts = data.split_slices()
    names = {p: {f.stem for f in files} for p, files in parts.items()}
    subjects = {p: {n[1:3] for n in ns} for p, ns in names.items()}
    assert sum(len(ns) for ns in names.values()) == 10 and all(len(s) >= 1 for s in subjects.values())
    assert not (subjects["train"] & subjects["test"]) and not (subjects["train"] & subjects["val"])
    assert all(files[f] == [0, 1, 2] for files in parts.values() for f in files)  # whole volumes


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_split_csv_is_written_and_reused_exactly(tmp_path):
    m = manifest(tmp_path / "d")
    data = dm(str(m), tmp_path)
    path = data.write_split(tmp_path / "run" / "split.csv")
    rows = read_rows(path)
    assert list(rows[0]) == ["name", "path", "subject", "split"] and len(rows) == 30
    assert {r["name"]: r["split"] for r in rows} == data.assignment
    assert rows[0] == {"name": "v00_0", "path": str(tmp_path / "d" / "s00_0_ct.nii.gz"), "subject": "subj00",
                       "split": data.assignment["v00_0"]}
    assert not list((tmp_path / "run").glob(".tmp-*"))
    reused = dm(str(m), tmp_path, seed=5, split={"file": str(path)})  # another seed: the file decides
    assert reused.split["mode"] == "file" and reused.assignment == data.assignment
    assert check_split_config({"file": str(path)})["file"] == path


def test_a_split_file_that_does_not_fit_is_refused_naming_the_rows(tmp_path):
    m = manifest(tmp_path / "d", n_subjects=4, per_subject=2)
    data = dm(str(m), tmp_path, split={"mode": "subject", "fractions": [0.5, 0.25, 0.25]})
    path = data.write_split(tmp_path / "split.csv")
    lines = path.read_text().splitlines()
    (tmp_path / "short.csv").write_text("\n".join(lines[:-1]) + "\nghost,/x.nii.gz,subjX,train\n")
    with pytest.raises(ValueError, match=r"short\.csv: 2 problem\(s\): line 9: volume 'ghost' is not in "
                                         r"data\.params\.volumes; volume 'v03_1' \(m\.csv line 9\) is not listed"):
        dm(str(m), tmp_path, split={"file": str(tmp_path / "short.csv")})
    crossed = [lines[0]] + [ln.rsplit(",", 1)[0] + ("," + ("test" if ln.startswith("v00_1") else ln.rsplit(",", 1)[1]))
                            for ln in lines[1:]]
    if crossed[1].endswith(",test"):
        crossed[1] = crossed[1].rsplit(",", 1)[0] + ",train"
    (tmp_path / "crossed.csv").write_text("\n".join(crossed) + "\n")
    with pytest.raises(ValueError, match=r"crossed\.csv puts one subject's volumes into several splits: subject 'subj00'"):
        dm(str(m), tmp_path, split={"file": str(tmp_path / "crossed.csv")})
    (tmp_path / "slab.csv").write_text("\n".join([lines[0]] + [ln.rsplit(",", 1)[0] + ",slab" for ln in lines[1:]]))
    with pytest.raises(ValueError, match="was slab-split"):
        dm(str(m), tmp_path, split={"file": str(tmp_path / "slab.csv")})
    with pytest.raises(ValueError, match="mode 'file' needs"):
        dm(str(m), tmp_path, split={"mode": "file"})
    # an override split={file: ...} merged into a config's {mode: subject, ...} reads the file
    assert dm(str(m), tmp_path, split={"mode": "subject", "file": str(path)}).assignment == data.assignment


def test_training_writes_split_csv_into_the_run_folder_and_a_rerun_reuses_it(tmp_path):
    from orchestration.training import train

    m = manifest(tmp_path / "d", n_subjects=4, per_subject=2)

    def config(split):
        return OmegaConf.create({
            "seed": 0, "model": tiny_model_cfg(),
            "data": {"target": "diffusion_modules.diffusion_utils.datamodule.DenoisingDataModule",
                     "params": {"volumes": str(m), "cache_dir": str(tmp_path / "cache"), "image_size": 16, "stride": 8,
                                "batch_size": 4, "split": split}},
            "trainer": {"max_steps": 1, "accelerator": "cpu", "devices": 1, "enable_progress_bar": False,
                        "num_sanity_val_steps": 0, "limit_val_batches": 1, "enable_model_summary": False,
                        "log_every_n_steps": 1},
            "logging": {"logger": "csv"}})

    first = tmp_path / "run1"
    first.mkdir()
    train(config({"mode": "subject", "fractions": [0.5, 0.25, 0.25]}), first)
    rows = read_rows(first / "split.csv")
    assert len(rows) == 8 and {r["split"] for r in rows} == {"train", "val", "test"}
    second = tmp_path / "run2"
    second.mkdir()
    _, datamodule, _ = train(config({"file": str(first / "split.csv")}), second)
    assert (second / "split.csv").read_text() == (first / "split.csv").read_text()
    test_sources = {s["source"] for s in datamodule.test_slices()}
    assert test_sources == {r["name"] for r in rows if r["split"] == "test"}
