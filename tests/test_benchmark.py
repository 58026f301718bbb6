"""The benchmark's peer is the same size as our UNet, so its speed ratio compares like with like."""
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from synthetic import load_script
from utils.initialize_configs import instantiate_from_configs

ROOT = Path(__file__).resolve().parents[1]


def test_peer_unet_has_exactly_our_parameter_count():
    cfg = OmegaConf.load(ROOT / "run_scripts" / "configs" / "ddpm-cond" / "exp01_brain_1BA001_ct_config.yaml")
    unet_cfg = cfg.model.params.unet_rosinality_config
    ours = instantiate_from_configs(unet_cfg, "unet")
    peer = load_script("benchmark.py").peer_unet(dict(unet_cfg.params))
    n = lambda m: sum(p.numel() for p in m.parameters())
    assert n(ours) == n(peer) == 15_723_201
    assert [type(b).__name__ for b in peer.down_blocks] == ["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"]


def test_peer_comparison_prints_a_row_per_case_and_option_and_writes_the_table(capsys, tmp_path):
    """Training rows per (size, option), denoising rows per option through the same DDIM loop;
    the printed Markdown is the file --out writes; CUDA graphs are a skipped row on CPU."""
    bench = load_script("benchmark.py")
    out = tmp_path / "table" / "bench.md"
    text = bench.main(["--config", str(ROOT / "run_scripts" / "configs" / "ddpm-cond" / "bundled_ct_mr.yaml"),
                       "--peer", "--sizes", "16", "--options", "fp32", "bf16+cl+fused", "--denoise-options", "fp32",
                       "bf16+cl", "graphs", "--batch-size", "2", "--steps", "1", "--slice-size", "16", "--nfe", "2",
                       "--peak-tflops", "1", "--out", str(out)])
    assert capsys.readouterr().out == text == out.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| 16 x 16")]
    assert [r.split("|")[2].strip() for r in rows] == ["fp32", "bf16+cl+fused"]
    assert all(float(r.split("|")[6]) > 0 for r in rows)  # a positive ratio each
    denoise = {r.split("|")[1].strip(): r for r in text.splitlines() if r.startswith(("| fp32 |", "| bf16+cl |",
                                                                                      "| graphs |"))}
    assert set(denoise) == {"fp32", "bf16+cl", "graphs"} and "skipped: CUDA graphs need CUDA" in denoise["graphs"]
    assert all(float(denoise[k].split("|")[4]) > 0 for k in ("fp32", "bf16+cl"))  # speed ratio ours / peer


def test_model_benchmark_times_training_and_denoise_per_option(capsys):
    bench = load_script("benchmark.py")
    text = bench.main(["--config", str(ROOT / "run_scripts" / "configs" / "ddpm-cond" / "bundled_ct_mr.yaml"),
                       "--options", "fp32", "bf16+cl+fused", "--denoise-options", "fp32", "bf16+cl",
                       "--batch-size", "2", "--steps", "1", "--slice-size", "16", "sampling.steps=2"])
    training, denoising = text.split("Denoising")
    assert [r.split("|")[1].strip() for r in training.splitlines() if "| 64 x 64 |" in r] == ["fp32", "bf16+cl+fused"]
    rows = [r.split("|") for r in denoising.splitlines() if r.startswith("| ") and "---" not in r][1:]
    assert [r[1].strip() for r in rows] == ["fp32", "bf16+cl"] and all(float(r[3]) > 0 for r in rows)


def test_a_bad_option_row_is_refused_before_any_timing():
    bench = load_script("benchmark.py")
    config = str(ROOT / "run_scripts" / "configs" / "ddpm-cond" / "bundled_ct_mr.yaml")
    with pytest.raises(ValueError, match="training option.*'graphs'"):
        bench.main(["--config", config, "--options", "bf16+graphs"])
    with pytest.raises(ValueError, match="option 'fused' unknown"):
        bench.main(["--config", config, "--denoise-options", "bf16+fused"])
