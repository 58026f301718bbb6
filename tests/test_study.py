"""run_scripts/study.py on tiny models: every strategy of issue 10 trained / expanded,
scored on two noise types (one on CT only), compared per slice with the references, and
every table and figure written; the comparisons equal paired_comparison of the scores."""
import csv
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from metrics.statistics import paired_comparison
from evaluation.study_tables import read_scores, verdict_phrase
from orchestration.study import expand_strategies, load_study_config
from synthetic import load_script
from test_main_job import BUNDLED, write_volumes
from utils.initialize_configs import ConfigError

DIFFUSION = ["model.params.image_size=16", "model.params.timesteps=50", "model.params.max_train_timestep=null"]
SHRINK = ["model.params.warmup_steps=1",
          "model.params.unet_rosinality_config.params.channel=8",
          "model.params.unet_rosinality_config.params.channel_multiplier=[1,2]",
          "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
          "trainer.accelerator=cpu", "trainer.enable_progress_bar=false"]
STRATEGIES = [
    {"name": "1 pure noise", "model": "concat", "nfe": [2]},
    {"name": "2 matched", "model": "concat", "params": {"t_start": "auto"}, "nfe": [1, 2], "k": [1, 2]},
    {"name": "3 independent", "model": "concat", "params": {"t_start": "auto", "start_noise": "independent"},
     "extra_nfe": 1, "nfe": [1, 2]},
    {"name": "4 matched pairs", "model": "pairs", "params": {"t_start": "auto"}, "nfe": [2]},
    {"name": "5 guided", "model": "guided", "params": {"t_start": "auto"}, "nfe": [2], "guidance": [0, 1, 2]},
    {"name": "6 SDEdit", "model": "uncond", "params": {"t_start": "auto"}, "nfe": [2]},
    {"name": "U-Net", "type": "unet", "model": "unet"},
    {"name": "BM3D", "type": "bm3d"},
]
EXPECTED_METHODS = {"1 pure noise | NFE 2", "2 matched | NFE 1", "2 matched | NFE 2", "2 matched | NFE 2 | K 2",
                    "3 independent | NFE 2", "4 matched pairs | NFE 2", "5 guided | NFE 2 | s 0",
                    "5 guided | NFE 2 | s 1", "5 guided | NFE 2 | s 2", "6 SDEdit | NFE 2", "U-Net", "BM3D"}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("study")
    volumes = write_volumes(tmp / "data")
    run = OmegaConf.load(BUNDLED)
    run.data.params.update({"volumes": volumes, "cache_dir": str(tmp / "cache"), "image_size": 16, "stride": 16,
                            "batch_size": 4})
    run.evaluation.update({"pretrained_ddpm": None, "unet_ckpt": None, "max_slices_per_source": 2,
                           "test_volumes": [{"path": "pydicom:CT_small.dcm", "name": "ct_small"}]})
    OmegaConf.save(run, tmp / "run.yaml")
    cond = "run_scripts/configs/ddpm-cond/bundled_ct_mr.yaml"
    cfg = {"run": str(tmp / "run.yaml"), "train_overrides": SHRINK + [f"logging.save_dir={tmp / 'runs'}"],
           "models": {"concat": {"config": cond, "overrides": DIFFUSION},
                      "pairs": {"config": cond, "overrides": DIFFUSION + ["model.params.p_matched_start=0.5"]},
                      "guided": {"config": cond, "overrides": DIFFUSION + ["model.params.p_uncond=0.2"]},
                      "uncond": {"config": "run_scripts/configs/ddpm/bundled_ct_mr_uncond.yaml",
                                 "overrides": DIFFUSION},
                      "unet": {"config": "run_scripts/configs/unet/bundled_ct_mr_unet.yaml"}},
           "strategies": STRATEGIES, "references": ["BM3D", "U-Net"],
           "noise": [{"type": "gaussian", "levels": [0.1, 0.2]},
                     {"type": "lowdose_ct", "levels": [1.0e5], "volumes": [volumes[0]]}]}
    OmegaConf.save(OmegaConf.create(cfg), tmp / "study.yaml")
    paths = load_script("study.py").main(["--config", str(tmp / "study.yaml"), "--out", str(tmp / "out")])
    return {"tmp": tmp, "out": tmp / "out", "paths": paths}


def test_every_table_and_figure_is_written(study):
    out = study["out"]
    for name in ("study.md", "comparisons.csv", "study_config.yaml", "gaussian/scores.csv", "lowdose_ct/scores.csv",
                 "psnr_vs_level_gaussian.png", "psnr_vs_nfe_gaussian.png", "psnr_vs_level_lowdose_ct.png",
                 "psnr_vs_nfe_lowdose_ct.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    text = (out / "study.md").read_text()
    assert "## gaussian" in text and "## lowdose_ct" in text
    assert "brain-window PSNR" in text  # low-dose CT ranked in the brain window
    for line in text.splitlines():  # every table row has as many cells as its header
        if line.startswith("| set |"):
            width = line.replace("\\|", "").count("|")
        elif line.startswith("| same-subject") or line.startswith("| unseen"):
            assert line.replace("\\|", "").count("|") == width, line
    for model in ("concat", "pairs", "guided", "uncond", "unet"):
        assert (out / "models" / model / "config.yaml").is_file(), model


def test_methods_expand_with_nfe_k_and_guidance(study):
    rows = read_scores(study["out"] / "gaussian" / "scores.csv")
    assert {r["method"] for r in rows} == EXPECTED_METHODS
    assert {r["set"] for r in rows} == {"same-subject", "unseen"}
    # no run-config sampling default leaks in: without t_start the chain starts from pure noise
    pure = [r["psnr"] for r in rows if r["method"] == "1 pure noise | NFE 2"]
    matched = [r["psnr"] for r in rows if r["method"] == "2 matched | NFE 2"]
    assert len(pure) == len(matched) > 0 and pure != matched
    lowdose = read_scores(study["out"] / "lowdose_ct" / "scores.csv")
    assert {r["modality"] for r in lowdose} == {"ct"}
    assert all(np.isfinite(r["psnr_ct_window"]) for r in lowdose)


def test_comparisons_are_the_paired_statistics_of_the_scores(study):
    rows = read_scores(study["out"] / "gaussian" / "scores.csv")
    with open(study["out"] / "comparisons.csv", newline="") as f:
        comps = list(csv.DictReader(f))
    assert {c["reference"] for c in comps} == {"BM3D", "U-Net"}
    c = next(c for c in comps if c["method"] == "2 matched | NFE 2" and c["reference"] == "BM3D"
             and c["set"] == "same-subject" and c["noise_type"] == "gaussian" and float(c["level"]) == 0.1)
    pick = lambda m: {(r["source"], r["slice_index"]): r["psnr_masked"] for r in rows  # noqa: E731
                      if r["method"] == m and r["sigma"] == 0.1 and r["set"] == "same-subject"}
    mine, ref = pick("2 matched | NFE 2"), pick("BM3D")
    keys = sorted(mine)
    expected = paired_comparison([mine[k] for k in keys], [ref[k] for k in keys])
    assert int(c["n"]) == expected["n"] == 4
    assert float(c["mean_diff"]) == pytest.approx(expected["mean_diff"], rel=1e-5)
    assert float(c["ci_low"]) == pytest.approx(expected["ci_low"], rel=1e-5)


def test_bad_study_configs_name_the_problem(tmp_path):
    path = tmp_path / "bad.yaml"
    OmegaConf.save(OmegaConf.create({"run": "x.yaml", "strategies": STRATEGIES, "noise": [{"type": "gaussian"}],
                                     "refrences": ["BM3D"]}), path)
    with pytest.raises(ConfigError, match="unknown keys \\['refrences'\\]"):
        load_study_config(path)
    with pytest.raises(ConfigError, match="strategies\\[0\\]: unknown keys \\['nfes'\\]"):
        expand_strategies([{"name": "a", "nfes": [1]}], {})
    methods, info = expand_strategies(STRATEGIES, {"eta": 1.0})
    assert {m["name"] for m in methods} == EXPECTED_METHODS
    assert info["3 independent | NFE 2"]["nfe"] == 2
    assert next(m for m in methods if m["name"] == "3 independent | NFE 2")["params"]["steps"] == 1
    assert next(m for m in methods if m["name"] == "2 matched | NFE 2 | K 2")["params"] == {
        "t_start": "auto", "steps": 2, "eta": 1.0, "n_samples": 2}


@pytest.mark.parametrize("name", ["reduced_cpu.yaml", "full_gpu.yaml"])
def test_shipped_study_configs_load_and_name_existing_configs(name):
    from utils.paths import resolve_path

    study = load_study_config(f"run_scripts/configs/study/{name}")
    assert resolve_path(study["run"]).is_file()
    for key, entry in study["models"].items():
        assert resolve_path(entry["config"]).is_file(), key
    methods, info = expand_strategies(study["strategies"], study.get("k_params") or {})
    assert set(study["references"]) <= set(info)
    strategies = {v["strategy"][0] for v in info.values() if v["diffusion"]}
    assert strategies == set("123456")  # every diffusion strategy of issue 10 is in the study
    assert {n["type"] for n in study["noise"]} == {"gaussian", "rician", "lowdose_ct"}


def test_study_keys_are_documented_in_usage_md():
    from orchestration.study import NOISE_KEYS, STRATEGY_KEYS, STUDY_KEYS
    text = (Path(__file__).resolve().parents[1] / "docs" / "USAGE.md").read_text()
    section = text[text.index("### `run_scripts/study.py`"):]
    section = section[:section.index("\n### ", 5)]
    missing = [k for k in STUDY_KEYS + STRATEGY_KEYS + NOISE_KEYS if f"`{k}`" not in section]
    assert missing == []


def test_verdict_phrase_reads_as_english():
    assert verdict_phrase("better", "BM3D") == "better than BM3D"
    assert verdict_phrase("worse", "7 U-Net") == "worse than 7 U-Net"
    assert verdict_phrase("no clear difference", "BM3D") == "no clear difference from BM3D"
