"""run_scripts/dm4mi-conditional.py behind its one error boundary (issue 16): every bad input
is one line on stderr naming it, exit status 2, and no run folder; a run that trained a step
keeps its folder; a NaN stop keeps its own exit status and message."""
import re

import nibabel as nib
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from models.ddpm_conditioned import ConditionDDPM
from orchestration.checkpoints import export_inference_checkpoint
from synthetic import load_script, make_volume
from utils.initialize_configs import instantiate_from_configs, load_config

BUNDLED = "run_scripts/configs/ddpm-cond/bundled_ct_mr.yaml"
UNET = "diffusion_modules.unet_arch.unet_rosinality.UNet"
TINY = ["model.params.image_size=16", "model.params.timesteps=20", "model.params.max_train_timestep=null",
        "model.params.warmup_steps=1", "model.params.unet_rosinality_config.params.channel=8",
        "model.params.unet_rosinality_config.params.channel_multiplier=[1,2]",
        "data.params.image_size=16", "data.params.stride=16", "data.params.batch_size=4",
        "logging.logger=csv", "logging.name=tiny", "evaluation.enabled=false",
        "trainer.max_steps=3", "trainer.val_check_interval=3", "trainer.limit_val_batches=1",
        "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "trainer.num_sanity_val_steps=0"]


def ddpm(channel: int) -> ConditionDDPM:
    unet = {"target": UNET, "params": {"in_channel": 2, "channel": channel, "channel_multiplier": [1, 2],
                                       "n_res_blocks": 1, "attn_strides": [], "dropout": 0.0}}
    return ConditionDDPM(unet_rosinality_config=unet, image_size=16, timesteps=20)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("entry_main")
    ct, mr = make_volume(tmp / "head_ct.nii.gz", "ct"), make_volume(tmp / "brain_mr.nii.gz", "mr")
    nib.save(nib.Nifti1Image(np.full((40, 36, 20), np.nan, np.float32), np.eye(4)), str(tmp / "nan_ct.nii.gz"))
    wide = ddpm(16)
    full = {"state_dict": wide.state_dict(), "hyper_parameters": dict(wide.hparams)}
    torch.save(full, tmp / "wide.ckpt")
    torch.save({**full, "optimizer_states": [], "loops": {}, "global_step": 3}, tmp / "wide_train.ckpt")
    narrow = ddpm(8)
    same = instantiate_from_configs(load_config(BUNDLED, TINY).model, "model")  # the run's model, a weight short
    odd = {k: v for k, v in same.state_dict().items() if k != "unet.out.2.weight"}
    torch.save({"state_dict": odd, "hyper_parameters": dict(same.hparams), "optimizer_states": [], "loops": {}},
               tmp / "odd_train.ckpt")
    torch.save({"state_dict": narrow.state_dict(), "hyper_parameters": dict(narrow.hparams)}, tmp / "narrow.ckpt")
    export_inference_checkpoint(tmp / "narrow.ckpt", tmp / "exported.ckpt")
    volumes = f"data.params.volumes=[{{path: {ct}, modality: ct}}, {{path: {mr}, modality: mr}}]"
    return {"tmp": tmp, "base": [*TINY, volumes, f"data.params.cache_dir={tmp / 'cache'}"]}


def run_main(inputs, save_dir, *extra, resume=None):
    script = load_script("dm4mi-conditional.py")
    argv = ["--config", BUNDLED, *inputs["base"], f"logging.save_dir={save_dir}", *extra]
    return script.main(argv if resume is None else ["--resume", str(resume), *argv])


EVAL = ("evaluation.enabled=true", "evaluation.pretrained_ddpm=null", "evaluation.unet_ckpt=null",
        "evaluation.test_volumes=null")
BAD = {  # name -> (overrides, resume, the message on stderr after "dm4mi-conditional.py: ")
    "README's misspelt key": (["model.params.unet_rosinality_config.params.chanel=64"], None,
                              r"model\.params\.unet_rosinality_config\.params\.chanel: unknown parameter 'chanel'"),
    "refused target": (["model.target=os.system"], None, r"model\.target: 'os\.system' is not an allowed target"),
    "missing volume": (["data.params.volumes=[{path: {tmp}/nope_ct.nii.gz, modality: ct}]"], None,
                       r"data\.params\.volumes\[0\]: volume not found: .*nope_ct\.nii\.gz"),
    "NaN volume": (["data.params.volumes=[{path: {tmp}/nan_ct.nii.gz, modality: ct}]"], None,
                   r"nan_ct\.nii\.gz has \d+ NaN or inf voxels"),
    "stride 0": (["data.params.stride=0"], None, r"data\.params\.stride: must be >= 1, got 0"),
    "batch size 0": (["data.params.batch_size=0"], None, r"data\.params\.batch_size: must be >= 1, got 0"),
    "non-integer stride": (["data.params.stride=1.5"], None, r"data\.params: .*stride.*1\.5"),
    "batch size abc": (["data.params.batch_size=abc"], None, r"data\.params: .*'abc'"),
    "negative noise level": (["data.params.noise={type: gaussian, sigma: -1}"], None, r"data\.params: .*sigma.*-1"),
    "init_from of another width": (["init_from={tmp}/wide.ckpt"], None,
                                   r"init_from: .*wide\.ckpt does not fit the configured UNet"),
    "resume of another width": ([], "wide_train.ckpt", r"--resume .*wide_train\.ckpt: cannot resume .*channel"),
    "resume of other weights": ([], "odd_train.ckpt",
                                r"--resume .*odd_train\.ckpt does not fit the configured model \(1 weight\(s\) differ: "
                                r"unet\.out\.2\.weight missing"),
    "resume of an exported checkpoint": ([], "exported.ckpt", r"--resume .*exported\.ckpt: not a training checkpoint"),
    "save_dir under a file": (["logging.save_dir={tmp}/head_ct.nii.gz/runs"], None,
                              r"logging\.save_dir .*head_ct\.nii\.gz/runs: cannot make the run folder there"),
    "save_dir a file": (["logging.save_dir={tmp}/head_ct.nii.gz"], None,
                        r"logging\.save_dir .*head_ct\.nii\.gz: is not a folder"),
    "devices 0 (a Lightning refusal)": (["trainer.devices=0"], None, r"trainer: `Trainer\(devices=0\)` value is not a valid"),
    "bogus precision": (["trainer.precision=bogus"], None, r"trainer: Precision 'bogus' is invalid"),
    "unknown method type": ([*EVAL, "evaluation.methods=[{name: a, type: noisy}, {name: b, type: bm3}]"], None,
                            r"evaluation\.methods\[1\]\.type: 'bm3' is not one of .*did you mean 'bm3d'"),
    "unknown method key": ([*EVAL, "evaluation.methods=[{name: a, type: ddpm, parms: {steps: 2}}]"], None,
                           r"evaluation\.methods\[0\]\.parms: unknown key; did you mean 'params'"),
    "unknown method param": ([*EVAL, "evaluation.methods=[{name: a, type: ddpm, params: {stepz: 2}}]"], None,
                             r"evaluation\.methods\[0\]\.params\.stepz: unknown key; did you mean 'steps'"),
    "unknown model key": ([*EVAL, "evaluation.methods=[{name: a, type: ddpm, model: ddpm_pretraind}]"], None,
                          r"evaluation\.methods\[0\]\.model: 'ddpm_pretraind' is not one of"),
    "repeated method name": ([*EVAL, "evaluation.methods=[{name: a, type: noisy}, {name: a, type: nlm}]"], None,
                             r"evaluation\.methods: method names must be unique .*\['a'\]"),
    "unknown noise type": ([*EVAL, "evaluation.noise_type=poisson"], None,
                           r"evaluation\.noise_type: 'poisson' is not one of gaussian"),
    "model and data stacks differ": (["data.params.context_slices=1"], None,
                                     r"model\.params\.context_slices: the model's context_slices is 0 but the data's"),
    "U-Net baseline of other stacks": ([*EVAL, "evaluation.methods=[{name: a, type: noisy}]",
                                        "evaluation.unet_config=run_scripts/configs/unet/bundled_ct_mr_unet.yaml",
                                        "data.params.context_slices=1", "model.params.context_slices=1",
                                        "model.params.unet_rosinality_config.params.in_channel=4"], None,
                                       r"evaluation\.unet_config .*: its model's context_slices is 0, this run's "
                                       r"data\.params\.context_slices is 1"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_input_exits_2_with_one_line_and_no_run_folder(inputs, tmp_path, capsys, case):
    overrides, resume, message = BAD[case]
    overrides = [o.replace("{tmp}", str(inputs["tmp"])) for o in overrides]
    with pytest.raises(SystemExit) as info:
        run_main(inputs, tmp_path / "runs", *overrides, resume=resume and inputs["tmp"] / resume)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    assert err[-1].startswith("dm4mi-conditional.py: ")
    assert re.search(message, err[-1]), err[-1]
    assert not (tmp_path / "runs").exists(), list((tmp_path / "runs").rglob("*"))


class FailAtStep(Callback):
    """Raises ``error`` at the start of a batch once the fit has taken ``step`` optimizer steps."""

    def __init__(self, step, error):
        self.step, self.error = step, error

    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step >= self.step:
            raise self.error


def failing_trainer(monkeypatch, step, error):
    import orchestration.training as training

    build = training.build_trainer

    def build_failing(cfg, run_dir):
        trainer = build(cfg, run_dir)
        trainer.callbacks.insert(0, FailAtStep(step, error))
        return trainer

    monkeypatch.setattr(training, "build_trainer", build_failing)


def test_a_user_error_after_a_trained_step_keeps_the_run_folder(inputs, tmp_path, monkeypatch, capsys):
    failing_trainer(monkeypatch, 2, ValueError("a bad batch at step 2"))
    with pytest.raises(SystemExit) as info:
        run_main(inputs, tmp_path / "runs")
    assert info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "dm4mi-conditional.py: a bad batch at step 2"
    runs = list((tmp_path / "runs").glob("tiny-*"))
    assert len(runs) == 1 and (runs[0] / "config.yaml").is_file()


def test_a_user_error_before_the_first_step_removes_the_run_folder(inputs, tmp_path, monkeypatch):
    (tmp_path / "runs").mkdir()  # a save_dir that existed before stays
    failing_trainer(monkeypatch, 0, OSError(28, "No space left on device"))
    with pytest.raises(SystemExit, match="No space left on device") as info:
        run_main(inputs, tmp_path / "runs")
    assert info.value.code == 2
    assert list((tmp_path / "runs").iterdir()) == []


def test_a_nan_stop_keeps_its_exit_status_message_and_folder(inputs, tmp_path, monkeypatch):
    failing_trainer(monkeypatch, 1, FloatingPointError("non-finite loss at step 1"))
    with pytest.raises(SystemExit) as info:
        run_main(inputs, tmp_path / "runs")
    assert info.value.code == "training stopped: non-finite loss at step 1"  # printed, exit status 1
    assert len(list((tmp_path / "runs").glob("tiny-*"))) == 1
