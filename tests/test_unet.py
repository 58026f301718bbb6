"""The rosinality-style diffusion UNet: size, shapes, fold, attention heads, checkpointing."""

import contextlib
import copy

import pytest
import torch

from diffusion_modules.unet_arch.unet_rosinality import ResBlock, SelfAttention, UNet

REFERENCE = dict(in_channel=2, channel=64, out_channel=1, channel_multiplier=[1, 2, 4], n_res_blocks=2,
                 attn_strides=[4], dropout=0.1)
TINY = dict(in_channel=2, channel=16, out_channel=1, channel_multiplier=[1, 2], n_res_blocks=1, attn_strides=[],
            dropout=0.0)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def randomize(module: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Perturb every parameter (the output convs start at zero, which would hide errors)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(std * torch.randn(p.shape, generator=g))
    return module


def test_reference_config_has_15_7_million_parameters():
    assert abs(n_params(UNet(**REFERENCE)) - 15.7e6) <= 0.1e6


@pytest.mark.parametrize("size, out_channel", [(16, 1), (32, 3), (24, 1)])
def test_output_has_input_size_and_out_channel_channels(size, out_channel):
    net = randomize(UNet(**{**TINY, "out_channel": out_channel, "attn_strides": [2]})).eval()
    x = torch.randn(2, 2, size, size + 8)
    out = net(x, torch.tensor([3, 77]))
    assert out.shape == (2, out_channel, size, size + 8)
    assert torch.isfinite(out).all() and out.abs().sum() > 0


def test_fold_two_keeps_shapes_and_changes_the_first_conv():
    net = randomize(UNet(**{**TINY, "fold": 2})).eval()
    assert net.size_factor == 4
    assert net.conv_in.in_channels == 2 * 4 and net.out[-1].out_channels == 1 * 4
    x = torch.randn(3, 2, 32, 16)
    out = net(x, torch.tensor([0, 5, 9]))
    assert out.shape == (3, 1, 32, 16) and torch.isfinite(out).all()


@pytest.mark.parametrize("kw, size", [({}, 17), ({"fold": 2}, 18), ({"channel_multiplier": [1, 2, 2]}, 30)])
def test_size_not_divisible_by_downsampling_raises_naming_the_size(kw, size):
    net = UNet(**{**TINY, **kw})
    assert size % net.size_factor
    with pytest.raises(ValueError, match=rf"{size}x{size}.*{net.size_factor}"):
        net(torch.randn(1, 2, size, size), torch.tensor([1]))


def test_attention_heads_keep_shapes_and_must_divide_channels():
    net4 = randomize(UNet(**{**TINY, "attn_strides": [1, 2], "attn_heads": 4})).eval()
    net1 = UNet(**{**TINY, "attn_strides": [1, 2], "attn_heads": 1}).eval()
    assert n_params(net4) == n_params(net1)  # heads split channels, they add no weights
    net1.load_state_dict(net4.state_dict())
    x, t = torch.randn(2, 2, 16, 16), torch.tensor([4, 40])
    out4, out1 = net4(x, t), net1(x, t)
    assert out4.shape == out1.shape == (2, 1, 16, 16)
    assert not torch.allclose(out4, out1, atol=1e-6)  # same weights, different heads: different maths
    with pytest.raises(ValueError, match="attn_heads=3"):
        UNet(**{**TINY, "attn_strides": [1], "attn_heads": 3})  # 3 does not divide 16
    with pytest.raises(ValueError, match="attn_heads=5"):
        SelfAttention(16, 5)


def test_attention_heads_split_the_channels():
    """SelfAttention with 4 heads equals a hand-written multi-head attention over channel groups."""
    torch.manual_seed(0)
    c, heads, b, h, w = 16, 4, 2, 4, 5
    attn = randomize(SelfAttention(c, heads), seed=1, std=0.2).eval()
    x = torch.randn(b, c, h, w)
    qkv = attn.qkv(attn.norm(x)).reshape(b, 3 * c, h * w)
    q, k, v = qkv[:, :c], qkv[:, c:2 * c], qkv[:, 2 * c:]
    d = c // heads
    outs = []
    for i in range(heads):
        qi, ki, vi = (z[:, i * d:(i + 1) * d].transpose(1, 2) for z in (q, k, v))  # (b, hw, d)
        weights = torch.softmax(qi @ ki.transpose(1, 2) / d ** 0.5, dim=-1)
        outs.append((weights @ vi).transpose(1, 2))  # (b, d, hw)
    expected = x + attn.out(torch.cat(outs, dim=1).reshape(b, c, h, w))
    torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=1e-5)


def test_attention_hands_sdpa_contiguous_heads_tokens_dim(monkeypatch):
    """q, k, v reach SDPA as (B, heads, tokens, dim) with a contiguous last dimension, the
    layout the fused flash / memory-efficient kernels accept."""
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append([(tuple(z.shape), z.stride(-1), z.is_contiguous()) for z in (q, k, v)])
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    attn = randomize(SelfAttention(16, 4), seed=1, std=0.2).eval()
    attn(torch.randn(2, 16, 4, 5))
    assert seen == [[((2, 4, 20, 4), 1, True)] * 3]


def assert_matches_math_kernel(attn: SelfAttention, x: torch.Tensor, backends, ulps: float) -> None:
    """attn(x) with SDPA restricted to ``backends`` (None: torch's own choice) equals attn(x) on
    the MATH kernel, on the same module and inputs, to ``ulps`` epsilons of x's dtype times the
    output scale (the largest |output|). Restricted to kernels that do not accept the inputs,
    SDPA raises RuntimeError ("No available kernel") instead of falling back."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with torch.no_grad():
        with sdpa_kernel(backends) if backends is not None else contextlib.nullcontext():
            got = attn(x)
        with sdpa_kernel([SDPBackend.MATH]):
            ref = attn(x)
    assert got.dtype == ref.dtype == x.dtype
    tol = ulps * torch.finfo(x.dtype).eps * ref.float().abs().max().item()
    torch.testing.assert_close(got.float(), ref.float(), rtol=0, atol=tol)


@pytest.mark.parametrize("backends", [None, "fused"])
@pytest.mark.parametrize("heads", [1, 4])
def test_attention_kernels_agree_with_the_math_kernel_on_cpu(backends, heads):
    """The comparison of the GPU test below, here in fp32: torch's default kernel and the fused
    ones (on CPU: flash) against MATH. In fp32 the kernels differ by summation order over the
    64-long dot products and the 256 tokens, up to 8 eps x the output scale over 8 seeds, not by
    one rounding as in bf16: hence 32."""
    from torch.nn.attention import SDPBackend

    if backends == "fused":
        backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    attn = randomize(SelfAttention(64, heads), seed=1, std=0.2).eval()
    x = torch.randn(2, 64, 16, 16, generator=torch.Generator().manual_seed(0))
    assert_matches_math_kernel(attn, x, backends, ulps=32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fused SDPA kernels need a CUDA device")
@pytest.mark.parametrize("heads", [1, 4])
def test_attention_runs_with_the_flash_kernel_only_on_gpu(heads):
    """In bf16 the block's q, k, v are accepted by the fused kernels alone (flash /
    memory-efficient; restricted to them SDPA raises instead of falling back to MATH, which
    builds the tokens x tokens score matrix), and the fused result equals MATH's on the same
    bf16 module and inputs to a few bf16 epsilons of the output scale: both accumulate in fp32
    (MATH upcasts bf16), so they differ by roundings to bf16, about 1 eps x the output scale in a
    CPU emulation of flash; 8 leaves room. A bf16 run against an fp32 reference would measure
    bf16 rounding of the whole block (up to 0.2 here), not the kernel."""
    from torch.nn.attention import SDPBackend

    attn = randomize(SelfAttention(64, heads), seed=1, std=0.2).eval()
    bf16 = copy.deepcopy(attn).cuda().to(torch.bfloat16)  # a copy: .to() converts a module in place
    x = torch.randn(2, 64, 32, 32, generator=torch.Generator().manual_seed(0)).to("cuda", torch.bfloat16)
    assert_matches_math_kernel(bf16, x, [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION], ulps=8)
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in attn.parameters())


def test_gradient_checkpointing_gives_the_same_outputs_and_gradients():
    cfg = {**TINY, "attn_strides": [2], "attn_heads": 2, "dropout": 0.0}
    plain = randomize(UNet(**cfg, use_checkpoint=False)).train()
    ckpt = UNet(**cfg, use_checkpoint=True).train()
    ckpt.load_state_dict(plain.state_dict())
    x, t = torch.randn(2, 2, 16, 16), torch.tensor([2, 30])
    outs, grads = [], []
    for net in (plain, ckpt):
        xi = x.clone().requires_grad_(True)
        out = net(xi, t)
        (out ** 2).mean().backward()
        outs.append(out.detach())
        grads.append([p.grad.clone() for p in net.parameters()] + [xi.grad.clone()])
    torch.testing.assert_close(outs[0], outs[1], atol=1e-6, rtol=1e-5)
    assert len(grads[0]) == len(grads[1])
    assert sum(g.abs().sum() for g in grads[0]) > 0
    for g0, g1 in zip(grads[0], grads[1]):
        torch.testing.assert_close(g0, g1, atol=1e-6, rtol=1e-5)


def test_use_affine_time_adds_a_scale_per_resblock_channel():
    plain, affine = UNet(**TINY, use_affine_time=False), UNet(**TINY, use_affine_time=True)
    blocks = [m for m in plain.modules() if isinstance(m, ResBlock)]
    extra = sum(b.time.out_features * (b.time.in_features + 1) for b in blocks)
    assert n_params(affine) - n_params(plain) == extra > 0
    ref_plain, ref_affine = n_params(UNet(**REFERENCE)), n_params(UNet(**REFERENCE, use_affine_time=True))
    assert ref_affine > ref_plain


@pytest.mark.parametrize("kw", [{"channel": 64}, {"use_affine_time": True}])
def test_time_embedding_changes_the_output(kw):
    net = randomize(UNet(**{**TINY, **kw})).eval()
    x = torch.randn(1, 2, 16, 16)
    diff = (net(x, torch.tensor([0])) - net(x, torch.tensor([500]))).abs().max()
    assert diff > 1e-2


@pytest.mark.parametrize("channels", [16, 32])
def test_resblock_without_affine_time_sees_the_timestep(channels):
    block = randomize(ResBlock(channels, channels, time_dim=64, dropout=0.0, use_affine_time=False)).eval()
    x = torch.randn(1, channels, 8, 8)
    t0, t1 = torch.randn(1, 64), torch.randn(1, 64)
    assert (block(x, t0) - block(x, t1)).abs().max() > 1e-3


def test_dropout_only_acts_in_train_mode():
    """In eval mode the net equals an independent computation without dropout: a copy of it
    (same weights) whose Dropout modules are replaced by Identity. In train mode it differs
    from that copy, the mask follows the RNG seed, and the same seed gives the same mask."""
    net = randomize(UNet(**{**TINY, "dropout": 0.5}))
    dropouts = [n for n, m in net.named_modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(net.get_submodule(n).p == 0.5 for n in dropouts)
    without_dropout = copy.deepcopy(net).eval()
    for name in dropouts:
        parent, _, attr = name.rpartition(".")
        setattr(without_dropout.get_submodule(parent), attr, torch.nn.Identity())
    x, t = torch.randn(1, 2, 16, 16), torch.tensor([7])
    with torch.no_grad():
        expected = without_dropout(x, t)
        net.eval()
        torch.testing.assert_close(net(x, t), expected, rtol=0, atol=0)
        net.train()
        torch.manual_seed(0)
        a = net(x, t)
        torch.manual_seed(1)
        b = net(x, t)
        torch.manual_seed(0)
        torch.testing.assert_close(net(x, t), a, rtol=0, atol=0)
    assert not torch.allclose(a, expected) and not torch.allclose(a, b)
