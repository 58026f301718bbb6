"""study.py --estimate (issue 19, item 6): the predicted GPU time of a study config from the
stated throughput figures, before anything runs; the shipped GPU configs fit their budgets;
the study's data overrides reach the models it trains."""
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from orchestration import study_estimate as se
from orchestration.study import _model_run_config, load_study_config
from synthetic import load_script

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "run_scripts" / "configs" / "study"


def test_the_shipped_gpu_configs_fit_their_budgets():
    full = se.estimate(load_study_config(STUDY / "full_gpu.yaml"))
    assert full["total_s"] <= 3600 and (full["trained"], full["methods"]) == (10, 20)
    assert full["lines"][0].startswith("Figures: H200 training fp32 1,400, bf16 1,900 images/s")
    # robust: a training rate 30 % below the FLOP-scaled one still fits the hour
    assert full["training_s"] / 0.7 + full["evaluation_s"] <= 3600
    smoke = se.estimate(load_study_config(STUDY / "smoke_gpu.yaml"))
    assert smoke["total_s"] <= 300 and smoke["trained"] == 2


def test_the_estimate_adds_up_from_the_stated_figures(tmp_path, monkeypatch):
    monkeypatch.setattr(se, "train_flops", lambda model_cfg, size: 1.0e9)
    monkeypatch.setattr(se, "reference_flops", lambda: 2.0e9)  # twice the reference's speed: 2,800 / 3,800 img/s
    study = {"run": "run_scripts/configs/ddpm-cond/bundled_ct_mr.yaml",
             "evaluation": {"max_slices_per_source": 1, "test_volumes": None},
             "train_overrides": ["trainer.max_steps=100", "trainer.val_check_interval=100", "trainer.limit_val_batches=2",
                                 "data.params.batch_size=10", "data.params.num_workers=4", "trainer.precision=32"],
             "models": {"concat": {"config": "run_scripts/configs/ddpm-cond/bundled_ct_mr.yaml"}},
             "strategies": [{"name": "m", "model": "concat", "params": {"t_start": "auto"}, "nfe": [2]},
                            {"name": "BM3D", "type": "bm3d"}],
             "noise": [{"type": "gaussian", "levels": [0.1, 0.2]}]}
    r = se.estimate(study)
    rate = 2 * se.REF_RATE["fp32"]  # the loader: 4 workers x 5,650 (augment true: flips only) is faster
    validation = 1 * (2 * 10 / (3 * rate) + 8 * 10 * se.CALL_FLOOR_S)
    assert r["training_s"] == pytest.approx(100 * 10 / rate + validation + se.RUN_OVERHEAD_S)
    ct, mr = 256 * 256, 217 * 181  # one test slice of each bundled volume (axial: rows y, cols x)
    network = 2 * 2 * 2 * se.CALL_FLOOR_S  # levels x slices x calls, each under the launch floor
    bm3d = 2 * se.CPU_S_PER_MP["bm3d"] * (ct + mr) / 1e6
    assert r["evaluation_s"] == pytest.approx(network + bm3d + 2 * 2 * 2 * se.SCORE_S)
    assert "100 steps x 10 = 1,000 patches at 2,800/s (GPU-bound, 1.0 GFLOP per image, fp32)" in "\n".join(r["lines"])
    monkeypatch.setattr(se, "LOADER_RATE", {"rescale": 100.0, "plain": 100.0})
    slow = se.estimate(study)
    assert "at 400/s (loader-bound" in "\n".join(slow["lines"])


def test_study_data_overrides_reach_the_trained_models():
    study = load_study_config(STUDY / "full_gpu.yaml")
    run_cfg = OmegaConf.load(ROOT / study["run"])
    entry = study["models"]["concat"]
    cfg = _model_run_config(entry, run_cfg, study["train_overrides"], None, "concat")
    assert (cfg.data.params.batch_size, cfg.data.params.num_workers) == (128, 8)  # were the run config's 16 and 0
    assert list(cfg.data.params.noise.sigma) == [0.01, 0.3] and cfg.data.params.augment.rescale == [0.5, 2.0]
    lowdose = study["noise"][2]
    cfg = _model_run_config(entry, run_cfg, study["train_overrides"], lowdose, "concat")
    assert cfg.data.params.noise.type == "lowdose_ct" and cfg.data.params.batch_size == 128  # the noise entry wins


def test_study_script_estimate_runs_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    result = load_script("study.py").main(["--config", str(STUDY / "smoke_gpu.yaml"), "--estimate", "--out", str(out)])
    text = capsys.readouterr().out
    assert text.startswith("# Estimate:") and "predicted: 0.0" in text and result["total_s"] > 0
    assert not out.exists()
