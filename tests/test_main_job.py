"""End to end: run_scripts/dm4mi-conditional.py trains a tiny ConditionDDPM (and the U-Net
baseline) on synthetic NIfTI volumes and evaluates it; run_scripts/evaluate.py re-scores the
saved checkpoint. Everything shrunk to run on CPU in seconds."""
import csv
import importlib.util
import math
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import tifffile
import torch
from omegaconf import OmegaConf

from orchestration import config_checks, evaluation_job, run_job

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "run_scripts" / "configs" / "ddpm-cond" / "bundled_ct_mr.yaml"
UNET_BUNDLED = ROOT / "run_scripts" / "configs" / "unet" / "bundled_ct_mr_unet.yaml"
TINY_UNET = {"channel": 8, "channel_multiplier": [1, 2], "n_res_blocks": 1, "attn_strides": [], "dropout": 0.0}
TRAINER = {"max_steps": 3, "val_check_interval": 3, "limit_val_batches": 1, "accelerator": "cpu",
           "enable_progress_bar": False, "log_every_n_steps": 1}


def load_script(name: str, filename: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "run_scripts" / filename)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def smooth_volume(shape, seed):
    """Smooth random structure in [0, 1] inside an ellipse, zero outside: (X, Y, Z)."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    vol = np.zeros(shape)
    for _ in range(6):
        c, w = rng.uniform(-0.6, 0.6, 3), rng.uniform(0.2, 0.5)
        d2 = ((x - c[0]) ** 2 + (y - c[1]) ** 2) / (2 * w ** 2) + (z - c[2]) ** 2 / 2  # slow along z
        vol += rng.uniform(0.3, 1.0) * np.exp(-d2)
    vol = vol / vol.max()
    inside = (x / 0.9) ** 2 + (y / 0.8) ** 2 <= 1
    return np.where(inside, 0.2 + 0.8 * vol, 0.0)


def write_volumes(folder: Path) -> list[dict]:
    folder.mkdir()
    shape = (40, 40, 24)
    ct = np.round(-1000 + 2000 * smooth_volume(shape, 0)).astype(np.int16)  # HU, air outside
    mr = np.round(250 * smooth_volume(shape, 1)).astype(np.uint8)
    nib.save(nib.Nifti1Image(ct, np.eye(4)), str(folder / "head_ct.nii.gz"))
    nib.save(nib.Nifti1Image(mr, np.eye(4)), str(folder / "brain_mr.nii.gz"))
    return [{"path": str(folder / "head_ct.nii.gz"), "modality": "ct", "name": "head_ct"},
            {"path": str(folder / "brain_mr.nii.gz"), "modality": "mr", "name": "brain_mr"}]


@pytest.fixture(scope="module")
def main_job(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("job")
    volumes = write_volumes(tmp / "data")

    unet_cfg = OmegaConf.load(UNET_BUNDLED)
    unet_cfg.model.params.warmup_steps = 1
    unet_cfg.model.params.unet_rosinality_config.params = OmegaConf.merge(
        unet_cfg.model.params.unet_rosinality_config.params, TINY_UNET)
    unet_cfg.trainer = OmegaConf.merge(unet_cfg.trainer, TRAINER)
    OmegaConf.save(unet_cfg, tmp / "tiny_unet.yaml")

    cfg = OmegaConf.load(BUNDLED)
    cfg.data.params.volumes = volumes
    cfg.data.params.cache_dir = str(tmp / "cache")
    cfg.logging.save_dir = str(tmp / "runs")
    cfg.evaluation.unet_config = str(tmp / "tiny_unet.yaml")
    cfg.evaluation.methods = [
        {"name": "noisy input", "type": "noisy"},
        {"name": "NLM", "type": "nlm"},
        {"name": "U-Net", "type": "unet"},
        {"name": "DDPM DDIM 2 from t*", "type": "ddpm", "params": {"steps": 2, "t_start": "auto"}},
    ]
    config_path = tmp / "tiny_job.yaml"
    OmegaConf.save(cfg, config_path)

    overrides = [
        "model.params.image_size=16", "model.params.timesteps=50", "model.params.max_train_timestep=null",
        "model.params.warmup_steps=1",
        "model.params.unet_rosinality_config.params.channel=8",
        "model.params.unet_rosinality_config.params.channel_multiplier=[1,2]",
        "data.params.image_size=16", "data.params.stride=16", "data.params.batch_size=4",
        "logging.logger=csv", "logging.name=tiny",
        "evaluation.max_slices_per_source=1", "evaluation.sigmas=[0.1]", "evaluation.pretrained_ddpm=null", "evaluation.unet_ckpt=null",
        "evaluation.n_examples=1", "sampling.steps=2",
    ] + [f"trainer.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in TRAINER.items()]
    calls = {"check_run_config": [], "checked_test_volumes": 0}
    check_run_config, checked_test_volumes = run_job.check_run_config, run_job.checked_test_volumes

    def counting_check(cfg):
        calls["check_run_config"].append(cfg.logging.name)
        return check_run_config(cfg)

    def counting_tests(cfg):
        calls["checked_test_volumes"] += 1
        return checked_test_volumes(cfg)

    with pytest.MonkeyPatch.context() as mp:  # the script is loaded inside: it sees the counters too
        for module in (config_checks, run_job):
            mp.setattr(module, "check_run_config", counting_check)
        for module in (run_job, evaluation_job):
            mp.setattr(module, "checked_test_volumes", counting_tests)
        script = load_script("dm4mi_conditional", "dm4mi-conditional.py")
        assert script.main(["--config", str(config_path), *overrides]) == 0
    runs = sorted((tmp / "runs").glob("tiny-*"))
    assert len(runs) == 1, runs
    return {"tmp": tmp, "run": runs[0], "config": config_path, "overrides": overrides, "calls": calls}


def test_the_job_checks_its_config_and_test_volumes_once(main_job):
    """check_run_config once for the run (and once for the U-Net baseline's config), the test
    volumes (read and compared with the training volumes, voxels included) once, before training."""
    assert main_job["calls"]["check_run_config"].count("tiny") == 1
    assert main_job["calls"]["checked_test_volumes"] == 1


def read_scores(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_run_folder_holds_resolved_config_checkpoint_and_evaluation(main_job):
    from utils.initialize_configs import load_config

    run = main_job["run"]
    saved = OmegaConf.load(run / "config.yaml")
    expected = load_config(main_job["config"], main_job["overrides"])
    assert OmegaConf.to_container(saved, resolve=True) == OmegaConf.to_container(expected, resolve=True)
    assert saved.trainer.max_steps == 3 and saved.model.params.unet_rosinality_config.params.channel == 8
    assert saved.model.params.max_train_timestep is None and list(saved.evaluation.sigmas) == [0.1]
    assert (run / "checkpoints" / "last.ckpt").is_file()
    for name in ("results.md", "scores.csv", "psnr_ssim_vs_sigma.png", "examples.png"):
        assert (run / "evaluation" / name).is_file(), name
    # the U-Net baseline trained in its own sub-folder with its own checkpoint
    assert (run / "unet" / "checkpoints" / "last.ckpt").is_file()
    assert (run / "unet" / "config.yaml").is_file()


def test_checkpoint_is_the_trained_conditional_model(main_job):
    from models.ddpm_conditioned import ConditionDDPM

    model = ConditionDDPM.load_from_checkpoint(str(main_job["run"] / "checkpoints" / "last.ckpt"),
                                               map_location="cpu")
    assert model.num_timesteps == 50 and model.unet.channel == 8 and model.max_train_timestep is None
    assert int(model.ema_updates) == 3


def test_scores_csv_numbers(main_job):
    all_rows = read_scores(main_job["run"] / "evaluation" / "scores.csv")
    # the bundled config's evaluation.test_volumes are scored too, as the set "unseen"
    assert {r["source"] for r in all_rows if r["set"] == "unseen"} == {
        "pydicom_ct_small", "pydicom_mr_small", "mr_colin27_t1_0.5mm", "mr_dipy_b0", "mr_dipy_t1_coronal"}
    rows = [r for r in all_rows if r["set"] == "same-subject"]
    methods = {r["method"] for r in rows}
    assert methods == {"noisy input", "NLM", "U-Net", "DDPM DDIM 2 from t*"}
    assert {r["modality"] for r in rows} == {"ct", "mr"}
    assert len(rows) == 4 * 2  # 4 methods x 1 slice per source x 1 sigma
    for r in rows:
        assert float(r["sigma"]) == pytest.approx(0.1)
    for r in (r for r in rows if r["method"] == "noisy input"):
        # Gaussian noise with std 0.1 on the [0,1] scale, unclipped: PSNR = -20 log10(0.1) = 20 dB
        assert float(r["psnr"]) == pytest.approx(20.0, abs=0.5), r
        assert float(r["psnr_masked"]) == pytest.approx(20.0, abs=1.0), r  # the body mask is not empty
    ddpm = [r for r in rows if r["method"] == "DDPM DDIM 2 from t*"]
    assert len(ddpm) == 2
    for r in ddpm:
        for key in ("psnr", "ssim", "mae", "seconds"):
            assert math.isfinite(float(r[key])), (key, r)
        # the CSV score is the PSNR of the saved prediction against the cached clean slice
        with h5py.File(main_job["tmp"] / "cache" / f"{r['source']}.h5", "r") as f:
            clean = f["volume"][int(r["slice_index"])] / np.float32(65535.0)
            low, high = float(f.attrs["norm_low"]), float(f.attrs["norm_high"])
        tif = (main_job["run"] / "evaluation" / "predictions" / "DDPM_DDIM_2_from_t" / "sigma_0.1"
               / f"{r['source']}_z{int(r['slice_index']):04d}.tif")
        pred01 = (tifffile.imread(tif).astype(np.float64) - low) / (high - low)
        mse = np.mean((pred01 - clean) ** 2)
        assert float(r["psnr"]) == pytest.approx(-10 * np.log10(mse), abs=1e-3)
    md = (main_job["run"] / "evaluation" / "results.md").read_text()
    assert "DDPM DDIM 2 from t*" in md and "NLM" in md and "## CT" in md and "## MR" in md
    assert md.index("## Same-subject slabs") < md.index("## Unseen volumes")


def test_evaluate_script_rescores_the_checkpoint(main_job, tmp_path):
    script = load_script("evaluate_script", "evaluate.py")
    out = tmp_path / "eval"
    ckpt = main_job["run"] / "checkpoints" / "last.ckpt"
    result = script.main(["--config", str(main_job["config"]), "--ckpt", str(ckpt), "--out", str(out),
                          "--device", "cpu", *main_job["overrides"]])
    assert Path(result["results_md"]) == out / "results.md" and (out / "results.md").is_file()
    rows = read_scores(out / "scores.csv")
    # no --unet-ckpt: the U-Net method is skipped, the others are scored
    assert {r["method"] for r in rows} == {"noisy input", "NLM", "DDPM DDIM 2 from t*"}
    # same noise seed, same slices, same weights: the same scores as in the main job
    job = {(r["method"], r["source"]): r for r in read_scores(main_job["run"] / "evaluation" / "scores.csv")}
    for r in rows:
        ref = job[(r["method"], r["source"])]
        assert float(r["psnr"]) == pytest.approx(float(ref["psnr"]), abs=1e-4), r
        assert float(r["ssim"]) == pytest.approx(float(ref["ssim"]), abs=1e-5), r


def test_evaluate_script_scores_more_checkpoints_by_key(main_job, tmp_path):
    """--model KEY=PATH: a method with model KEY is scored on the same noise as --ckpt's."""
    script = load_script("evaluate_script", "evaluate.py")
    ckpt = main_job["run"] / "checkpoints" / "last.ckpt"
    methods = ("evaluation.methods=[{name: a, type: ddpm, params: {steps: 2, t_start: auto}},"
               "{name: b, type: ddpm, model: again, params: {steps: 2, t_start: auto}}]")
    result = script.main(["--config", str(main_job["config"]), "--ckpt", str(ckpt), "--model", f"again={ckpt}",
                          "--out", str(tmp_path / "eval"), "--device", "cpu", *main_job["overrides"], methods])
    rows = read_scores(Path(result["scores_csv"]))
    a = {r["source"]: float(r["psnr"]) for r in rows if r["method"] == "a"}
    b = {r["source"]: float(r["psnr"]) for r in rows if r["method"] == "b"}
    assert a and a == pytest.approx(b, abs=1e-4)
    for bad, message in ((["--model", "again"], "expected KEY=PATH"),
                         (["--model", f"ddpm={ckpt}"], "model key 'ddpm' is already given"),
                         (["--model", f"x={tmp_path / 'none.ckpt'}"], "checkpoint not found")):
        with pytest.raises(SystemExit, match=message):
            script.main(["--config", str(main_job["config"]), "--ckpt", str(ckpt), *bad,
                         "--out", str(tmp_path / "bad"), "--device", "cpu", *main_job["overrides"]])


def test_evaluate_script_model_key_loads_a_unet_checkpoint_as_a_unet(main_job, tmp_path):
    """--model KEY=PATH takes the model class from the checkpoint: a SupervisedUNet given by
    key scores as the same file given by --unet-ckpt."""
    script = load_script("evaluate_script", "evaluate.py")
    unet_ckpt = main_job["run"] / "unet" / "checkpoints" / "last.ckpt"
    methods = "evaluation.methods=[{name: a, type: unet}, {name: b, type: unet, model: u2}]"
    result = script.main(["--config", str(main_job["config"]), "--unet-ckpt", str(unet_ckpt),
                          "--model", f"u2={unet_ckpt}", "--out", str(tmp_path / "eval"), "--device", "cpu",
                          *main_job["overrides"], methods])
    rows = read_scores(Path(result["scores_csv"]))
    a = {r["source"]: float(r["psnr"]) for r in rows if r["method"] == "a"}
    b = {r["source"]: float(r["psnr"]) for r in rows if r["method"] == "b"}
    assert a and a == pytest.approx(b, abs=1e-6)


def test_evaluate_script_missing_checkpoint(main_job, tmp_path):
    script = load_script("evaluate_script", "evaluate.py")
    with pytest.raises(SystemExit, match="checkpoint not found"):
        script.main(["--config", str(main_job["config"]), "--ckpt", str(tmp_path / "none.ckpt"),
                     "--out", str(tmp_path / "eval"), "--device", "cpu", *main_job["overrides"]])


def test_resume_continues_from_the_checkpoint(main_job):
    """--resume restores step count and EMA, then trains on to the new max_steps."""
    import torch

    script = load_script("dm4mi_conditional_resume", "dm4mi-conditional.py")
    ckpt = main_job["run"] / "checkpoints" / "last.ckpt"
    overrides = [o for o in main_job["overrides"] if not o.startswith(("trainer.max_steps", "logging.name"))]
    overrides += ["trainer.max_steps=5", "logging.name=resumed", "evaluation.enabled=false"]
    assert script.main(["--config", str(main_job["config"]), "--resume", str(ckpt), *overrides]) == 0
    resumed = sorted((main_job["tmp"] / "runs").glob("resumed-*"))[-1] / "checkpoints" / "last.ckpt"
    state = torch.load(resumed, map_location="cpu", weights_only=False)
    assert state["global_step"] == 5 and int(state["state_dict"]["ema_updates"]) == 5
    with pytest.raises(SystemExit, match="checkpoint to resume not found: .*no_such.ckpt") as info:
        script.main(["--config", str(main_job["config"]), "--resume", str(main_job["tmp"] / "no_such.ckpt"),
                     *overrides])
    assert info.value.code == 2
    assert len(list((main_job["tmp"] / "runs").glob("resumed-*"))) == 1  # the failed call made no run folder


def test_exported_checkpoints_load_and_denoise_like_the_trained_models(main_job, tmp_path):
    import torch

    from models.ddpm_conditioned import ConditionDDPM
    from orchestration.checkpoints import export_inference_checkpoint

    src = main_job["run"] / "checkpoints" / "last.ckpt"
    dst = export_inference_checkpoint(src, tmp_path / "small.ckpt", half=False)
    full = ConditionDDPM.load_from_checkpoint(str(src), map_location="cpu").eval()
    small = ConditionDDPM.load_from_checkpoint(str(dst), map_location="cpu").eval()
    assert not small.use_ema and not hasattr(small, "unet_ema")
    for (k, v), (k2, v2) in zip(full.unet_ema.state_dict().items(), small.unet.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    noisy = torch.rand(1, 1, 20, 20) * 2 - 1
    a = full.denoise(noisy, steps=2, t_start="auto", sigma=0.1)
    b = small.denoise(noisy, steps=2, t_start="auto", sigma=0.1)
    torch.testing.assert_close(a, b)
    half = export_inference_checkpoint(src, tmp_path / "half.ckpt", half=True)
    assert half.stat().st_size < dst.stat().st_size
    c = ConditionDDPM.load_from_checkpoint(str(half), map_location="cpu").eval().denoise(
        noisy, steps=2, t_start="auto", sigma=0.1)
    assert (c - a).abs().max() < 1e-2
    unet_small = export_inference_checkpoint(main_job["run"] / "unet" / "checkpoints" / "last.ckpt",
                                             tmp_path / "unet.ckpt")
    from models.supervised_unet import SupervisedUNet

    unet_full = SupervisedUNet.load_from_checkpoint(str(main_job["run"] / "unet" / "checkpoints" / "last.ckpt"),
                                                    map_location="cpu").eval()
    unet_half = SupervisedUNet.load_from_checkpoint(str(unet_small), map_location="cpu").eval()
    assert (unet_full.denoise(noisy) - unet_half.denoise(noisy)).abs().max() < 1e-2
    torch.save({"weights": 1}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="not a Lightning checkpoint"):
        export_inference_checkpoint(tmp_path / "plain.pt", tmp_path / "again.ckpt")
    assert not (tmp_path / "again.ckpt").exists()


def test_missing_shipped_checkpoint_fails_before_training(main_job):
    script = load_script("dm4mi_conditional_missing", "dm4mi-conditional.py")
    overrides = [o for o in main_job["overrides"] if not o.startswith(("evaluation.pretrained_ddpm", "logging.name"))]
    with pytest.raises(SystemExit, match="missing_model.ckpt") as info:
        script.main(["--config", str(main_job["config"]), *overrides, "logging.name=missing",
                     f"evaluation.pretrained_ddpm={main_job['tmp'] / 'missing_model.ckpt'}"])
    assert info.value.code == 2
    assert not list((main_job["tmp"] / "runs").glob("missing-*"))


def test_preparing_the_evaluation_leaves_the_training_random_state_alone(main_job):
    """Loading the shipped models draws from torch's generator (their UNets are initialised
    before their weights load): done after the seeding, it changed what the run trained. The
    generators after prepare_job must be those after build_run alone."""
    from orchestration.training import build_run
    from utils.initialize_configs import load_config

    cfg = load_config(main_job["config"], [*main_job["overrides"],
                                           "evaluation.pretrained_ddpm=pretrained/cdm4mi_bundled_ct_mr.ckpt"])
    build_run(cfg)
    alone = torch.get_rng_state(), np.random.get_state()[1].copy()
    job = run_job.prepare_job(cfg)
    assert "ddpm_pretrained" in job["models"]
    assert torch.equal(torch.get_rng_state(), alone[0]) and np.array_equal(np.random.get_state()[1], alone[1])


def test_evaluate_script_refuses_a_unet_for_a_ddpm_method_before_scoring(main_job, tmp_path):
    """--model loads either class; a method of the other type is refused by name, exit 2."""
    script = load_script("evaluate_script", "evaluate.py")
    unet_ckpt = main_job["run"] / "unet" / "checkpoints" / "last.ckpt"
    methods = "evaluation.methods=[{name: wrong, type: ddpm, model: u2}]"
    with pytest.raises(SystemExit, match="'wrong' \\(type ddpm\\) needs a ConditionDDPM; the 'u2' model is a SupervisedUNet"):
        script.main(["--config", str(main_job["config"]), "--model", f"u2={unet_ckpt}", "--out", str(tmp_path / "e"),
                     "--device", "cpu", *main_job["overrides"], methods])
    assert not (tmp_path / "e" / "scores.csv").exists()
