"""The benchmark's peer is the same size as our UNet, so its speed ratio compares like with like."""
from pathlib import Path

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


def test_peer_comparison_prints_a_row_per_case(capsys):
    bench = load_script("benchmark.py")
    bench.main(["--config", str(ROOT / "run_scripts" / "configs" / "ddpm-cond" / "bundled_ct_mr.yaml"), "--peer",
                "--sizes", "16", "--dtypes", "fp32", "bf16", "--batch-size", "2", "--steps", "1", "--peak-tflops", "1"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| 16 x 16")]
    assert len(rows) == 2 and all(float(r.split("|")[4]) > 0 for r in rows)  # a positive ratio each
