"""The inference options on a CUDA GPU (skipped without one; run by run_scripts/gpu_check.sh):
compiled and eager networks agree, CUDA graphs give the compiled result and keep earlier
outputs intact, bf16 stays within tolerance (0.05 dB on bundled slices with the shipped model),
the DDIM loop makes no host synchronisation, and denoise.py runs with the options on CUDA.
The CPU versions are in tests/test_inference_options.py."""
import numpy as np
import pytest
import torch

from diffusion_modules.diffusion_utils.inference import optimized_networks
from diffusion_modules.diffusion_utils.sampling import matched_timestep, run_chain
from diffusion_modules.unet_arch.unet_rosinality import UNet
from models.ddpm_conditioned import ConditionDDPM
from orchestration.checkpoints import load_checkpoint
from test_inference_options import SHIPPED, bf16_against_fp32, tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

#: the reference UNet's shape (15.7 M parameters, attention at stride 4 and in the middle)
REFERENCE = dict(in_channel=2, channel=64, out_channel=1, channel_multiplier=[1, 2, 4], n_res_blocks=2,
                 attn_strides=[4], dropout=0.0)


@pytest.fixture
def exact_fp32(monkeypatch):
    """float32 convolutions and matmuls without TF32, so eager and compiled differ only by the
    order of their sums."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


def randomized_unet(**kw) -> UNet:
    net = UNet(**{**REFERENCE, **kw})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return net.cuda().eval()


def run_net(net, options, x, t):
    with torch.no_grad(), optimized_networks([net], options, "cuda"):
        return net(x, t)


def relative_error(got, ref) -> float:
    return ((got - ref).abs().max() / ref.abs().max()).item()


def test_cuda_compiled_unet_matches_eager_in_fp32(exact_fp32):
    net = randomized_unet()
    x = torch.randn(4, 2, 64, 64, device="cuda")
    t = torch.tensor([5, 100, 400, 900], device="cuda")
    ref = run_net(net, None, x, t)
    for options in ({"compile": True}, {"compile": True, "channels_last": True}):
        got = run_net(net, options, x, t)
        assert got.dtype == torch.float32 and relative_error(got, ref) < 1e-4, options


def test_cuda_bf16_unet_stays_close_to_fp32(exact_fp32):
    """Autocast keeps GroupNorm, softmax and the sums in float32: the output differs from fp32 by
    bf16 rounding of the convolution and attention inputs, about 1 % of the output scale."""
    net = randomized_unet()
    x = torch.randn(4, 2, 64, 64, device="cuda")
    t = torch.tensor([5, 100, 400, 900], device="cuda")
    ref = run_net(net, None, x, t)
    for options in ({"precision": "bf16"}, {"precision": "bf16", "channels_last": True, "compile": True}):
        got = run_net(net, options, x, t)
        assert got.dtype == torch.float32 and 0 < relative_error(got, ref) < 3e-2, options


def test_cuda_graphs_give_the_eager_result_and_keep_earlier_outputs(exact_fp32):
    model = tiny_model().cuda()
    xs = [torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(s)).cuda() * 2 - 1 for s in (1, 2)]

    def denoise(x, options):
        return model.denoise(x, steps=4, t_start="auto", sigma=0.1, inference=options)

    refs = [denoise(x, None) for x in xs]
    outs = [denoise(x, {"cuda_graphs": True}) for x in xs]  # records, then replays the same shapes
    outs.append(denoise(xs[0], {"cuda_graphs": True}))
    for got, ref in zip(outs, refs + refs[:1]):  # the first output is not overwritten by later replays
        assert relative_error(got, ref) < 1e-4
    assert all(p.is_contiguous() for p in model.parameters()) and "forward" not in model.unet_ema.__dict__


def test_cuda_ddim_loop_makes_no_host_synchronisation():
    """Every step of the sampler stays on the device: torch raises on any synchronising call
    (an .item(), a bool of a CUDA tensor, a copy to the host) inside the loop."""
    model = tiny_model().cuda()
    cond = torch.rand(2, 1, 32, 32, device="cuda") * 2 - 1
    t_star = matched_timestep(model.diffusion, 0.1)
    x = model.diffusion.sqrt_alphas_cumprod[t_star] * cond
    g = torch.Generator(device="cuda").manual_seed(0)
    fn = model.model_fn(cond)
    with torch.no_grad():
        run_chain(fn, model.diffusion, x, steps=4, eta=1.0, t_start=t_star, generator=g)  # warm-up
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = run_chain(fn, model.diffusion, x, steps=4, eta=1.0, t_start=t_star, generator=g)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out).all()


@pytest.mark.skipif(not SHIPPED.is_file(), reason="the shipped model is not in this checkout")
def test_cuda_bf16_stays_within_0_05_db_of_fp32_on_two_bundled_test_slices():
    model = load_checkpoint(ConditionDDPM, SHIPPED, map_location="cuda").eval()
    for name, scores in bf16_against_fp32(model, {"precision": "bf16", "channels_last": True}).items():
        assert abs(scores["bf16"] - scores["fp32"]) <= 0.05, (name, scores)


@pytest.mark.skipif(not SHIPPED.is_file(), reason="the shipped model is not in this checkout")
def test_cuda_denoise_cli_with_bf16_channels_last_and_cuda_graphs(tmp_path):
    import nibabel as nib

    from synthetic import load_script, make_volume

    volume = make_volume(tmp_path / "ct.nii.gz", "ct", n_slices=4)
    outs = {}
    for name, flags in (("fp32", []), ("fast", ["--precision", "bf16", "--channels-last", "--cuda-graphs"])):
        info = load_script("denoise.py").main(["--ckpt", str(SHIPPED), "--input", str(volume), "--output",
                                               str(tmp_path / f"{name}.nii.gz"), "--device", "cuda", "--sigma", "0.05",
                                               "--steps", "5", "--batch-size", "2", *flags])
        assert info["slices"] == 4
        outs[name] = np.asarray(nib.load(str(tmp_path / f"{name}.nii.gz")).dataobj)
    assert np.abs(outs["fast"] - outs["fp32"]).max() < 0.05 * 4095  # HU: within bf16's rounding of the window
