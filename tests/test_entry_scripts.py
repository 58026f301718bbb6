"""evaluate.py and study.py behind the shared error boundary (issue 16): a --device this
machine lacks and an --out that cannot be written are one line naming the flag, exit status
2, found before any data are read or any model is trained; orchestration/cli.py's helpers."""
import re

import pytest
import torch

from orchestration.cli import UserErrorExit, check_writable_folder, checked_device, user_error_boundary
from synthetic import load_script

BUNDLED = "run_scripts/configs/ddpm-cond/bundled_ct_mr.yaml"
STUDY = "run_scripts/configs/study/reduced_cpu.yaml"
NO_SHIPPED = ["evaluation.pretrained_ddpm=null", "evaluation.unet_ckpt=null"]


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.fixture
def no_work(monkeypatch):
    """The evaluation and the study fail the test if they are reached."""
    import orchestration.evaluation_job as evaluation_job
    import orchestration.study as study

    def reached(*args, **kwargs):
        raise AssertionError("the work started before the input was refused")

    monkeypatch.setattr(evaluation_job, "run_evaluation", reached)
    monkeypatch.setattr(study, "run_study", reached)


def refused(script: str, argv, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        load_script(script).main(argv)
    assert info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and lines[-1].startswith(f"{script}: ") and "Traceback" not in "\n".join(lines), lines
    return lines[-1]


def test_evaluate_refuses_cuda_without_a_gpu(no_gpu, no_work, tmp_path, capsys):
    line = refused("evaluate.py", ["--config", BUNDLED, "--device", "cuda", "--out", str(tmp_path / "out"),
                                   *NO_SHIPPED], capsys)
    assert line.startswith("evaluate.py: --device cuda: no CUDA GPU is usable on this machine")
    assert not (tmp_path / "out").exists()


def test_evaluate_finds_an_unwritable_out_first(no_work, tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    line = refused("evaluate.py", ["--config", BUNDLED, "--device", "cpu", "--out", str(tmp_path / "a_file" / "out"),
                                   *NO_SHIPPED], capsys)
    assert f"--out {tmp_path / 'a_file' / 'out'}: {tmp_path / 'a_file'} is not a folder" in line


@pytest.mark.parametrize("overrides, message", [
    (["evaluation.methods=[{name: a, type: bm5d}]"], r"evaluation\.methods\[0\]\.type: 'bm5d'"),
    (["evaluation.sigmas=[]"], r"evaluation\.sigmas: expected a non-empty list"),
    (["evaluation.enabled=maybe"], r"evaluation\.enabled: expected bool"),
])
def test_evaluate_refuses_a_bad_evaluation_section(no_work, tmp_path, capsys, overrides, message):
    line = refused("evaluate.py", ["--config", BUNDLED, "--device", "cpu", "--out", str(tmp_path / "out"),
                                   *NO_SHIPPED, *overrides], capsys)
    assert re.search(message, line), line
    assert not (tmp_path / "out").exists()


def test_evaluate_refuses_a_config_without_evaluation(no_work, tmp_path, capsys):
    from omegaconf import OmegaConf

    config = OmegaConf.load("run_scripts/configs/ddpm/bundled_ct_mr_uncond.yaml")
    line = refused("evaluate.py", ["--config", "run_scripts/configs/ddpm/bundled_ct_mr_uncond.yaml"], capsys)
    assert line == "evaluate.py: evaluation.sigmas: required (the noise levels to score; or evaluation.levels)"
    del config["evaluation"]
    OmegaConf.save(config, tmp_path / "none.yaml")
    line = refused("evaluate.py", ["--config", str(tmp_path / "none.yaml")], capsys)
    assert line == f"evaluate.py: {tmp_path / 'none.yaml'}: the config has no evaluation section (levels and methods to score)"


def test_study_refuses_cuda_without_a_gpu_and_an_unwritable_out(no_gpu, no_work, tmp_path, capsys):
    line = refused("study.py", ["--config", STUDY, "--device", "cuda:1", "--out", str(tmp_path / "out")], capsys)
    assert line.startswith("study.py: --device cuda:1: no CUDA GPU is usable")
    (tmp_path / "a_file").write_text("")
    line = refused("study.py", ["--config", STUDY, "--device", "cpu", "--out", str(tmp_path / "a_file" / "o")], capsys)
    assert f"--out {tmp_path / 'a_file' / 'o'}: " in line and "is not a folder" in line
    assert f"study.py: study config not found: {tmp_path / 'none.yaml'}" == refused(
        "study.py", ["--config", str(tmp_path / "none.yaml")], capsys)


def test_checked_device(monkeypatch):
    assert checked_device(None) is None and checked_device("cpu") == "cpu"
    with pytest.raises(ValueError, match=r"^--device 'gpu0': not a device name"):
        checked_device("gpu0")
    with pytest.raises(ValueError, match=r"^--device meta: unsupported device type 'meta'"):
        checked_device("meta")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert checked_device("cuda:1") == "cuda:1"
    with pytest.raises(ValueError, match=r"^--device cuda:2: this machine has 2 CUDA GPU\(s\), cuda:0 to cuda:1"):
        checked_device("cuda:2")


def test_check_writable_folder_leaves_nothing_behind(tmp_path):
    deep = tmp_path / "a" / "b" / "c"
    assert check_writable_folder(deep) == deep
    assert list(tmp_path.iterdir()) == []  # the folders made for the probe are gone again
    (tmp_path / "kept").mkdir()
    check_writable_folder(tmp_path / "kept")
    assert list((tmp_path / "kept").iterdir()) == []  # and so is the probe file
    (tmp_path / "f").write_text("")
    with pytest.raises(NotADirectoryError, match=r"^--x .*f/y: .*f is not a folder"):
        check_writable_folder(tmp_path / "f" / "y", "--x")


def test_the_boundary_exits_2_with_the_line_and_passes_bugs(capsys):
    def bad():
        raise FileNotFoundError("volume not found:\n  /x.nii")

    with pytest.raises(UserErrorExit) as info:
        user_error_boundary("s.py", bad)
    assert info.value.code == 2 and str(info.value) == "s.py: volume not found: /x.nii"
    assert capsys.readouterr().err == "s.py: volume not found: /x.nii\n"
    with pytest.raises(KeyError):
        user_error_boundary("s.py", lambda: {}["bug"])
    assert user_error_boundary("s.py", lambda: 7) == 7
