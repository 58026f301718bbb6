"""A rosinality-style diffusion UNet.

Residual blocks with GroupNorm(32) and SiLU, a sinusoidal time embedding followed by a
4x MLP, self-attention (torch SDPA, heads split the channels) at the down-sampling
factors listed in ``attn_strides`` and in the middle block, and an optional space-to-depth
``fold`` of the input. Inputs are (B, in_channel, H, W); H and W must be divisible by
``fold * 2 ** (len(channel_multiplier) - 1)``.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def _norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups, or the largest group count dividing ``channels``."""
    return nn.GroupNorm(math.gcd(32, channels), channels)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, shape (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def pad_to_multiple(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Reflect-pad H and W at the bottom/right up to multiples of ``factor``."""
    h, w = x.shape[-2:]
    pad = (0, (-w) % factor, 0, (-h) % factor)
    return F.pad(x, pad, mode="reflect") if any(pad) else x


def run_padded(fn, x: torch.Tensor, factor: int) -> torch.Tensor:
    """``fn`` on ``x`` reflect-padded to multiples of ``factor`` (``pad_to_multiple``), its
    output cropped back to x's H and W: a UNet's size factor for images of any size."""
    h, w = x.shape[-2:]
    return fn(pad_to_multiple(x, factor))[..., :h, :w]


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, time_dim: int, dropout: float, use_affine_time: bool):
        super().__init__()
        self.use_affine_time = use_affine_time
        self.norm1 = _norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time = nn.Linear(time_dim, out_ch * (2 if use_affine_time else 1))
        self.norm2 = _norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        t = self.time(F.silu(temb))[:, :, None, None]
        # The time signal enters after the norm: added before a GroupNorm with one channel
        # per group it would be normalised away.
        if self.use_affine_time:
            scale, shift = t.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h) + t
        h = self.conv2(self.dropout(F.silu(h)))
        return h + self.skip(x)


class SelfAttention(nn.Module):
    """Multi-head self-attention over pixels; ``n_heads`` must divide the channels."""

    def __init__(self, channels: int, n_heads: int):
        super().__init__()
        if channels % n_heads:
            raise ValueError(f"attn_heads={n_heads} does not divide {channels} channels")
        self.n_heads = n_heads
        self.norm = _norm(channels)
        self.qkv = nn.Conv2d(channels, channels * 3, 1)
        self.out = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.n_heads, c // self.n_heads, h * w)
        # (B, heads, tokens, dim) with the last dimension contiguous: the layout the fused
        # flash / memory-efficient SDPA kernels accept (a strided one falls back to the math
        # kernel, which builds the whole tokens x tokens score matrix)
        q, k, v = qkv.permute(1, 0, 2, 4, 3).contiguous().unbind(0)
        y = F.scaled_dot_product_attention(q, k, v)
        return x + self.out(y.transpose(-1, -2).reshape(b, c, h, w))


class ResAttnBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, time_dim: int, dropout: float, use_affine_time: bool,
                 use_attention: bool, attn_heads: int):
        super().__init__()
        self.res = ResBlock(in_ch, out_ch, time_dim, dropout, use_affine_time)
        self.attn = SelfAttention(out_ch, attn_heads) if use_attention else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        x = self.res(x, temb)
        return self.attn(x) if self.attn is not None else x


class UNet(nn.Module):
    """Diffusion UNet: ``forward(x, t)`` with x (B, in_channel, H, W) and t (B,) timesteps."""

    def __init__(self, in_channel: int = 2, channel: int = 64, out_channel: int = 1,
                 channel_multiplier: Sequence[int] = (1, 2, 4), n_res_blocks: int = 2,
                 attn_strides: Sequence[int] = (4,), attn_heads: int = 1, use_affine_time: bool = False,
                 dropout: float = 0.1, fold: int = 1, use_checkpoint: bool = False):
        super().__init__()
        self.fold = fold
        self.use_checkpoint = use_checkpoint
        self.size_factor = fold * 2 ** (len(channel_multiplier) - 1)
        time_dim = channel * 4
        self.channel = channel
        self.time_mlp = nn.Sequential(nn.Linear(channel, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))

        def block(cin: int, cout: int, attn: bool) -> ResAttnBlock:
            return ResAttnBlock(cin, cout, time_dim, dropout, use_affine_time, attn, attn_heads)

        self.conv_in = nn.Conv2d(in_channel * fold ** 2, channel, 3, padding=1)
        self.down = nn.ModuleList()
        skip_channels = [channel]
        ch, stride = channel, 1
        for level, mult in enumerate(channel_multiplier):
            for _ in range(n_res_blocks):
                self.down.append(block(ch, channel * mult, stride in attn_strides))
                ch = channel * mult
                skip_channels.append(ch)
            if level != len(channel_multiplier) - 1:
                self.down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skip_channels.append(ch)
                stride *= 2
        self.mid = nn.ModuleList([block(ch, ch, True), block(ch, ch, False)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_multiplier))):
            for _ in range(n_res_blocks + 1):
                self.up.append(block(ch + skip_channels.pop(), channel * mult, stride in attn_strides))
                ch = channel * mult
            if level != 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                             nn.Conv2d(ch, ch, 3, padding=1)))
                stride //= 2
        self.out = nn.Sequential(_norm(ch), nn.SiLU(), _zero(nn.Conv2d(ch, out_channel * fold ** 2, 3, padding=1)))

    def _run(self, block: nn.Module, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        if isinstance(block, ResAttnBlock):
            if self.use_checkpoint and self.training:
                return checkpoint(block, h, temb, use_reentrant=False)
            return block(h, temb)
        return block(h)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h_in, w_in = x.shape[-2:]
        if h_in % self.size_factor or w_in % self.size_factor:
            raise ValueError(f"UNet input size {h_in}x{w_in} is not divisible by {self.size_factor} "
                             f"(fold * 2**(levels-1)); pad or crop the image first")
        temb = self.time_mlp(timestep_embedding(t, self.channel))
        if self.fold > 1:
            x = F.pixel_unshuffle(x, self.fold)
        h = self.conv_in(x)
        skips = [h]
        for block in self.down:
            h = self._run(block, h, temb)
            skips.append(h)
        for block in self.mid:
            h = self._run(block, h, temb)
        for block in self.up:
            if isinstance(block, ResAttnBlock):
                h = self._run(block, torch.cat([h, skips.pop()], dim=1), temb)
            else:
                h = block(h)
        h = self.out(h)
        if self.fold > 1:
            h = F.pixel_shuffle(h, self.fold)
        return h
