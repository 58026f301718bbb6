"""Inference options of denoise() on CPU: bf16 autocast, channels_last, torch.compile, the
CUDA-graph code path; typed in the sampling section; the model is left as it was found.
The CUDA versions of these checks are in tests/test_gpu_cuda.py."""
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from diffusion_modules.diffusion_utils import inference
from diffusion_modules.diffusion_utils.context import context_indices
from diffusion_modules.diffusion_utils.inference import InferenceOptions, optimized_networks
from diffusion_modules.diffusion_utils.sampling import SamplingOptions
from models.ddpm_conditioned import ConditionDDPM
from orchestration.checkpoints import load_checkpoint
from orchestration.config_checks import check_methods
from synthetic import load_script, make_volume, tiny_model_cfg
from utils.initialize_configs import ConfigError, instantiate_from_configs
from utils.intensity import intensity_window, to_model_units, to_unit_range

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "pretrained" / "cdm4mi_bundled_ct_mr.ckpt"


def tiny_model(attention: bool = True) -> ConditionDDPM:
    """The tiny ConditionDDPM with every weight perturbed (its output convs start at zero)."""
    cfg = tiny_model_cfg()
    cfg["params"]["unet_rosinality_config"]["params"]["attn_strides"] = [2] if attention else []
    model = instantiate_from_configs(cfg, "model").eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.unet.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    model.unet_ema.load_state_dict(model.unet.state_dict())
    return model


def noisy_batch(n=2, size=16, seed=1):
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def run(model, options, x=None):
    x = noisy_batch() if x is None else x
    g = torch.Generator().manual_seed(0)
    return model.denoise(x, steps=3, t_start="auto", sigma=0.1, generator=g, inference=options)


def assert_untouched(model, params_before):
    """No wrapper left on the networks, the trained weights back in the standard layout (the EMA
    copy, which takes no gradient, may keep channels_last), the same Parameter objects."""
    for net in (model.unet, model.unet_ema):
        assert "forward" not in net.__dict__
    assert all(p.is_contiguous() for p in model.unet.parameters())
    assert [id(p) for p in model.parameters()] == params_before


# ----------------------------------------------------------------------------- the options object
def test_options_parse_describe_and_refuse_bad_values_naming_the_key():
    opts = InferenceOptions.parse("bf16+cl+compile")
    assert opts == InferenceOptions("bf16", channels_last=True, compile=True) and opts.describe() == "bf16+cl+compile"
    assert InferenceOptions.parse("fp32").plain and not opts.plain
    assert InferenceOptions(cuda_graphs=True).compile_mode == "reduce-overhead"
    assert InferenceOptions(compile=True).compile_mode == "default" and InferenceOptions().compile_mode is None
    with pytest.raises(ValueError, match="option 'fp16' unknown"):
        InferenceOptions.parse("fp16")
    with pytest.raises(ValueError, match="precision 'fp16' unknown"):
        InferenceOptions("fp16")
    with pytest.raises(ValueError, match="channels_last must be true or false"):
        InferenceOptions(channels_last=1)
    for values, match in [({"precison": "bf16"}, r"x\.precison: unknown key; did you mean 'precision'"),
                          ({"compile": "yes"}, r"x\.compile: expected bool, got 'yes'"),
                          ({"precision": "fp16"}, r"x: precision 'fp16' unknown")]:
        with pytest.raises(ConfigError, match=match):
            InferenceOptions.from_mapping(values, "x")
    with pytest.raises(ConfigError, match="x: expected a mapping"):
        InferenceOptions.coerce("bf16", "x")


def test_the_sampling_section_and_method_params_take_inference_options():
    opts = SamplingOptions.from_mapping({"steps": 10, "inference": {"precision": "bf16"}})
    assert opts.inference == InferenceOptions("bf16")
    assert opts.as_kwargs()["inference"] == {"precision": "bf16", "channels_last": False, "compile": False,
                                             "cuda_graphs": False}  # plain values: YAML, JSON, denoise()
    assert SamplingOptions().as_kwargs()["inference"] is None
    merged = opts.updated({"inference": {"channels_last": True}}, "evaluation.methods[1].params")
    assert merged.inference == InferenceOptions("bf16", channels_last=True) and merged.steps == 10
    with pytest.raises(ConfigError, match=r"sampling\.inference\.precison: unknown key"):
        SamplingOptions.from_mapping({"inference": {"precison": "bf16"}})
    with pytest.raises(ConfigError, match=r"sampling\.inference: expected dict or InferenceOptions or null"):
        SamplingOptions.from_mapping({"inference": "bf16"})
    node = OmegaConf.create({"inference": {"compile": True}})  # a merged config's node (the study)
    assert opts.updated({"inference": node.inference}).inference == InferenceOptions("bf16", compile=True)
    check_methods([{"type": "ddpm", "params": {"inference": {"precision": "bf16", "channels_last": True}}}])
    with pytest.raises(ConfigError, match=r"evaluation\.methods\[0\]\.params\.inference: precision 'int8'"):
        check_methods([{"type": "ddpm", "params": {"inference": {"precision": "int8"}}}], {"steps": 2})


# ----------------------------------------------------------------------------- numbers
def test_channels_last_gives_the_fp32_result_and_leaves_the_model_as_found():
    model = tiny_model()
    before = [id(p) for p in model.parameters()]
    ref = run(model, None)
    got = run(model, {"channels_last": True})
    assert got.dtype == torch.float32 and got.is_contiguous()
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)  # the same maths, another memory order
    assert_untouched(model, before)
    conv = model.unet_ema.conv_in.weight  # the EMA weights sampled from: no gradient, the layout is kept
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    pointer = conv.data_ptr()
    torch.testing.assert_close(run(model, {"channels_last": True}), got, rtol=0, atol=0)
    assert model.unet_ema.conv_in.weight.data_ptr() == pointer  # not converted again (CUDA graphs replay)


def test_bf16_runs_the_network_in_bf16_and_returns_float32_close_to_fp32(monkeypatch):
    model = tiny_model()
    seen = []
    conv2d = torch.nn.Conv2d._conv_forward

    def spy(self, x, weight, bias):
        out = conv2d(self, x, weight, bias)
        seen.append(out.dtype)
        return out

    monkeypatch.setattr(torch.nn.Conv2d, "_conv_forward", spy)
    ref = run(model, None)
    assert set(seen) == {torch.float32}
    seen.clear()
    got = run(model, {"precision": "bf16"})
    assert set(seen) == {torch.bfloat16}  # every convolution under autocast
    assert got.dtype == torch.float32
    err = (got - ref).abs().max().item()
    assert 0 < err < 0.02 * ref.abs().max().item()  # bf16's 8 mantissa bits through 3 steps, not garbage


def test_the_model_is_restored_after_an_error_inside_the_call():
    model = tiny_model()
    before = [id(p) for p in model.parameters()]
    with pytest.raises(RuntimeError, match="boom"):
        with optimized_networks([model.unet, model.unet_ema], {"precision": "bf16", "channels_last": True}):
            assert "forward" in model.unet.__dict__ and model.unet.conv_in.weight.is_contiguous(
                memory_format=torch.channels_last)
            raise RuntimeError("boom")
    assert_untouched(model, before)


def test_the_compiled_and_cuda_graph_paths_give_the_eager_result(monkeypatch):
    """The compiled path with torch.compile's aot_eager backend (graph capture and AOT autograd,
    no code generation: seconds on CPU); the CUDA-graph path on CPU is that same compile, with
    a warning. The inductor kernels themselves: the next test and tests/test_gpu_cuda.py."""
    monkeypatch.setattr(inference, "COMPILE_BACKEND", "aot_eager")
    model = tiny_model()
    before = [id(p) for p in model.parameters()]
    ref = run(model, None)
    torch.testing.assert_close(run(model, {"compile": True, "channels_last": True}), ref, rtol=0, atol=1e-5)
    with pytest.warns(UserWarning, match="cuda_graphs on a cpu device"):
        torch.testing.assert_close(run(model, {"cuda_graphs": True}), ref, rtol=0, atol=1e-5)
    assert_untouched(model, before)


def test_inductor_compiled_network_matches_eager_on_cpu():
    """The real torch.compile (inductor, C++ kernels) on the smallest UNet: tens of seconds."""
    model = tiny_model(attention=False)
    x = noisy_batch(n=1, size=8)
    ref = run(model, None, x)
    torch.testing.assert_close(run(model, {"compile": True}, x), ref, rtol=0, atol=1e-5)


def bundled_test_stack(name: str, modality: str, k: int, z: int = 44, crop: int = 96) -> np.ndarray:
    """(1+2k, crop, crop): a held-out test slice (the slab split's test slices are 42-47 of
    48) of a bundled volume on the [0,1] scale, its centre pixels, then its k neighbours on
    each side in context order."""
    ras = np.asarray(nib.load(str(ROOT / "run_scripts" / "data" / f"{name}.nii.gz")).dataobj, dtype=np.float32)
    low, high = intensity_window(ras, modality)
    r, c = (ras.shape[0] - crop) // 2, (ras.shape[1] - crop) // 2
    return np.stack([to_unit_range(ras[r:r + crop, c:c + crop, j], low, high)
                     for j in context_indices(z, k, ras.shape[2])])


def psnr(clean01: np.ndarray, pred01: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / np.mean((clean01 - pred01) ** 2)))


def bf16_against_fp32(model, bf16_options: dict) -> dict:
    """{volume: {"noisy", "fp32", "bf16": PSNR}} of ``model`` (on its device), 10 DDIM steps
    from the matched start at sigma 0.1, on a held-out MR and CT slice with its neighbours
    (each slice its own noise, seed 0), in fp32 and with ``bf16_options``."""
    rng = np.random.default_rng(0)
    scores = {}
    for name, modality in (("mr_colin27_t1", "mr"), ("ct_cranium", "ct")):
        stack = bundled_test_stack(name, modality, model.context_slices)
        clean = stack[0]
        noisy = torch.from_numpy(to_model_units(stack + 0.1 * rng.standard_normal(stack.shape)))[None].float()
        scores[name] = {"noisy": psnr(clean, clean + 0.1)}
        for key, options in (("fp32", None), ("bf16", bf16_options)):
            out = model.denoise(noisy.to(model.device), steps=10, t_start="auto", sigma=0.1, inference=options)
            scores[name][key] = psnr(clean, ((out[0, 0].cpu().numpy() + 1) / 2).clip(0, 1))
    return scores


@pytest.mark.skipif(not SHIPPED.is_file(), reason="the shipped model is not in this checkout")
def test_bf16_stays_within_0_05_db_of_fp32_on_two_bundled_test_slices():
    """The shipped model on a held-out MR and CT slice: PSNR of the bf16 result within
    0.05 dB of the fp32 result's, per slice."""
    model = load_checkpoint(ConditionDDPM, SHIPPED, map_location="cpu").eval()
    for name, scores in bf16_against_fp32(model, {"precision": "bf16"}).items():
        assert scores["fp32"] > scores["noisy"] + 5  # it denoises
        assert abs(scores["bf16"] - scores["fp32"]) <= 0.05, (name, scores)


# ----------------------------------------------------------------------------- volumes and the CLI
def test_denoise_volume_takes_the_options_and_gives_the_fp32_volume(tmp_path):
    from orchestration.volume_denoiser import denoise_volume

    model = tiny_model(attention=False)
    volume = make_volume(tmp_path / "ct.nii.gz", "ct", n_slices=3)
    outs = {}
    for name, options in (("fp32", None), ("cl", InferenceOptions(channels_last=True))):
        denoise_volume(model, volume, tmp_path / f"{name}.nii.gz", modality="ct", sigma=0.1, steps=2,
                       tile=32, overlap=4, progress=False, inference=options)
        outs[name] = np.asarray(nib.load(str(tmp_path / f"{name}.nii.gz")).dataobj)
    np.testing.assert_allclose(outs["cl"], outs["fp32"], rtol=0, atol=0.05)  # HU: float32 rounding only


@pytest.mark.parametrize("flags, match", [(["--precision", "fp16"], "invalid choice: 'fp16'"),
                                          (["--cuda-graphs"], "--cuda-graphs needs --device cuda")])
def test_denoise_cli_refuses_bad_inference_flags_before_the_checkpoint(tmp_path, capsys, flags, match):
    volume = make_volume(tmp_path / "ct.nii.gz", "ct", n_slices=2)
    with pytest.raises(SystemExit) as exit_info:
        load_script("denoise.py").main(["--ckpt", str(tmp_path / "missing.ckpt"), "--input", str(volume),
                                        "--output", str(tmp_path / "out.nii.gz"), *flags])
    assert exit_info.value.code == 2 and match in capsys.readouterr().err
