"""Print training and denoising speed of a config's model on this machine.

    python run_scripts/benchmark.py --config run_scripts/configs/ddpm-cond/bundled_ct_mr.yaml \
        [--device cuda] [--batch-size 32] [--steps 20] [--slice-size 256] [key=value ...]
    python run_scripts/benchmark.py --config run_scripts/configs/ddpm-cond/exp01_brain_1BA001_ct_config.yaml \
        --peer [--sizes 64 256] [--dtypes fp32 bf16] [--peak-tflops 989] ...

Training: optimizer steps per second and images per second on random 1-channel batches
of the model's patch size (forward, backward, AdamW step, EMA update). Denoising:
seconds per slice of ``slice-size`` squared with the config's ``sampling`` settings.
``--peer``: our UNet against diffusers' ``UNet2DModel`` of the same size (same widths,
blocks per level and attention levels, one head: 15,723,201 parameters each for the
reference config), training images/s per image size and precision, measured in one run,
with the ratio and the FLOP rate from torch's FLOP counter (and MFU with --peak-tflops).
Figures only; nothing is asserted.
"""
from __future__ import annotations

import argparse
import time


import torch

from utils.initialize_configs import instantiate_from_configs, load_config


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peer_unet(unet_params: dict) -> torch.nn.Module:
    """diffusers' UNet2DModel with our UNet's widths, blocks per level and attention levels."""
    from diffusers import UNet2DModel

    mults = list(unet_params["channel_multiplier"])
    attn = {int(s) for s in unet_params.get("attn_strides", [])}
    with_attn = [2 ** level in attn for level in range(len(mults))]
    widths = tuple(unet_params["channel"] * m for m in mults)
    return UNet2DModel(
        in_channels=unet_params["in_channel"], out_channels=unet_params.get("out_channel", 1),
        block_out_channels=widths, layers_per_block=unet_params["n_res_blocks"],
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in with_attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(with_attn)),
        attention_head_dim=widths[-1] // unet_params.get("attn_heads", 1))


def time_training(net, call, size: int, batch: int, steps: int, dtype: str, device: torch.device):
    """(images/s, FLOPs per step) of forward + backward + AdamW on random data."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(batch, net_in_channels(net), size, size, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")

    def step():
        with autocast:
            loss = call(net, x, t).float().pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    with FlopCounterMode(display=False) as counter:
        step()
    step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return batch * steps / (time.perf_counter() - start), counter.get_total_flops()


def net_in_channels(net) -> int:
    conv = getattr(net, "conv_in", None)
    return conv.in_channels if conv is not None else 2


def compare_with_peer(cfg, device: torch.device, sizes, dtypes, batch: int, steps: int, peak_tflops) -> None:
    unet_cfg = cfg.model.params.unet_rosinality_config
    ours = instantiate_from_configs(unet_cfg, "model.params.unet_rosinality_config").to(device).train()
    peer = peer_unet(dict(unet_cfg.params)).to(device).train()
    n_ours, n_peer = (sum(p.numel() for p in m.parameters()) for m in (ours, peer))
    print(f"ours {n_ours:,} parameters, diffusers UNet2DModel {n_peer:,}; device {device}, batch {batch}")
    print("| case | ours img/s | peer img/s | ratio | our TFLOP/s | our MFU |\n| --- | --- | --- | --- | --- | --- |")
    for size in sizes:
        for dtype in dtypes:
            ours_ips, flops = time_training(ours, lambda n, x, t: n(x, t), size, batch, steps, dtype, device)
            peer_ips, _ = time_training(peer, lambda n, x, t: n(x, t).sample, size, batch, steps, dtype, device)
            tflops = flops / batch * ours_ips / 1e12
            mfu = f"{100 * tflops / peak_tflops:.1f} %" if peak_tflops else "n/a"
            print(f"| {size} x {size}, {dtype} | {ours_ips:.3g} | {peer_ips:.3g} | {ours_ips / peer_ips:.2f} | "
                  f"{tflops:.3f} | {mfu} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10, help="timed training steps (after 2 warm-up steps)")
    parser.add_argument("--slice-size", type=int, default=256)
    parser.add_argument("--peer", action="store_true", help="compare our UNet with diffusers' UNet2DModel")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256], help="image sides for --peer")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=("fp32", "bf16"))
    parser.add_argument("--peak-tflops", type=float, help="the device's peak (e.g. 989 for H100 bf16) for MFU")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    device = torch.device(args.device)
    if args.peer:
        compare_with_peer(cfg, device, args.sizes, args.dtypes, args.batch_size, args.steps, args.peak_tflops)
        return
    model = instantiate_from_configs(cfg.model, "model", allow_targets=cfg.get("allow_targets")).to(device)
    n_params = sum(p.numel() for p in model.unet.parameters())
    opt = torch.optim.AdamW(model.unet.parameters(), lr=1e-4)
    size = cfg.model.params.get("image_size", 64)
    batch = {k: torch.rand(args.batch_size, 1, size, size, device=device) * 2 - 1 for k in ("x_prior", "x_cond")}
    model.train()
    for i in range(args.steps + 2):
        if i == 2:
            _sync(device)
            start = time.perf_counter()
        loss = model.shared_step(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if getattr(model, "use_ema", False):
            model.update_ema()
    _sync(device)
    train_s = (time.perf_counter() - start) / args.steps
    print(f"device {device}, {torch.get_num_threads()} CPU threads, UNet {n_params / 1e6:.2f} M parameters")
    print(f"training: {1 / train_s:.2f} steps/s, {args.batch_size / train_s:.1f} images/s "
          f"(batch {args.batch_size}, {size}x{size})")
    if not hasattr(model, "denoise"):
        return
    model.eval()
    sampling = dict(cfg.get("sampling") or {})
    noisy = torch.rand(1, 1, args.slice_size, args.slice_size, device=device) * 2 - 1
    kwargs = {**sampling, "sigma": 0.1} if sampling.get("t_start") == "auto" else sampling
    model.denoise(noisy, **kwargs)
    _sync(device)
    start = time.perf_counter()
    model.denoise(noisy, **kwargs)
    _sync(device)
    print(f"denoising: {time.perf_counter() - start:.2f} s per {args.slice_size}x{args.slice_size} slice "
          f"with sampling {sampling}")


if __name__ == "__main__":
    main()
