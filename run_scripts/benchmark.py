"""Training and denoising speed of a config's model on this machine, one Markdown table row per option.

    python run_scripts/benchmark.py --config run_scripts/configs/ddpm-cond/bundled_ct_mr.yaml \
        [--device cuda] [--batch-size 32] [--steps 20] [--slice-size 512] [--out bench.md] [key=value ...]
    python run_scripts/benchmark.py --config run_scripts/configs/ddpm-cond/exp01_brain_1BA001_ct_config.yaml \
        --peer [--sizes 64 256] [--options fp32 bf16 bf16+cl+fused] [--denoise-options fp32 bf16+cl+compile] \
        [--slice-size 512] [--nfe 10] [--peak-tflops 989] [--out bench.md]
    python run_scripts/benchmark.py --config my_data.yaml --data [--data-workers 0 1 2 4] [--steps 10]

Options (a row each, '+'-joined tokens): ``fp32`` / ``bf16`` (autocast), ``cl`` (channels_last
weights and inputs), ``fused`` (fused AdamW; training), ``compile`` (torch.compile: of the
network for training, of its forward for denoising), ``graphs`` (CUDA graphs: compile mode
reduce-overhead; denoising, CUDA only). Denoising rows use
``diffusion_modules.diffusion_utils.inference`` exactly as ``ConditionDDPM.denoise(inference=...)``.

Training: optimizer steps per second and images per second on random 1-channel batches
of the model's patch size (forward, backward, AdamW step, EMA update). Denoising: seconds
per slice of ``slice-size`` squared with the config's ``sampling`` settings, ``--denoise-batch``
slices per call. ``--peer``: our UNet against diffusers' ``UNet2DModel`` of the same size (same
widths, blocks per level and attention levels, one head: 15,723,201 parameters each for the
reference config), both with the same options in the same run: training images/s per image
size and option row, with the ratio and the FLOP rate from torch's FLOP counter (and MFU with
--peak-tflops), and both networks through the same ``--nfe``-step DDIM loop from the matched
start (sigma 0.1) on ``--slice-size`` squared slices. Defaults: larger batches and the 512 x
512 slice on CUDA, small ones on CPU. The table is printed and, with ``--out``, written as
Markdown. Figures only; nothing is asserted. ``--data``: the config's training loader instead
(full augmentation): patches/s per worker count and per worker, with the peak resident and
proportional memory of the process tree, to size ``num_workers``; a configuration whose
loaders would not fit in memory is refused first (loader_check.py).
"""
from __future__ import annotations

import argparse
import copy
import platform
import time
from pathlib import Path

import torch

from diffusion_modules.diffusion_utils.beta_schedule import make_beta_schedule
from diffusion_modules.diffusion_utils.gaussian_diffusion import GaussianDiffusion
from diffusion_modules.diffusion_utils.inference import InferenceOptions, optimized_networks
from diffusion_modules.diffusion_utils.loader_check import data_benchmark
from diffusion_modules.diffusion_utils.sampling import matched_timestep, run_chain
from utils.initialize_configs import instantiate_from_configs, load_config

#: training option tokens (InferenceOptions.parse reads the denoising ones)
TRAIN_TOKENS = ("fp32", "bf16", "cl", "fused", "compile")
DEFAULT_OPTIONS = {"cpu": (["fp32", "bf16", "bf16+cl", "bf16+cl+fused"], ["fp32", "bf16", "bf16+cl"]),
                   "cuda": (["fp32", "bf16", "bf16+fused", "bf16+cl+fused", "bf16+cl+fused+compile"],
                            ["fp32", "bf16", "bf16+cl", "bf16+cl+compile", "bf16+cl+graphs"])}


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


def train_options(text: str) -> dict:
    """A training row name ('bf16+cl+fused') as {precision, channels_last, fused, compile}."""
    tokens = [t for t in text.split("+") if t]
    unknown = [t for t in tokens if t not in TRAIN_TOKENS]
    if unknown:
        raise ValueError(f"training option(s) {unknown} unknown in {text!r}; expected '+'-joined {TRAIN_TOKENS}")
    return {"precision": "bf16" if "bf16" in tokens else "fp32", "channels_last": "cl" in tokens,
            "fused": "fused" in tokens, "compile": "compile" in tokens}


def count_flops(net, call, x, t) -> int:
    """FLOPs of one eager forward + backward (torch's FLOP counter), whatever the options."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        call(net, x, t).float().pow(2).mean().backward()
    net.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def time_training(base, call, size: int, batch: int, steps: int, options: dict, device: torch.device) -> float:
    """Images/s of forward + backward + AdamW on random data, on a copy of ``base`` with the
    row's options: bf16 autocast, channels_last weights and inputs, fused AdamW, torch.compile."""
    net = copy.deepcopy(base)
    fmt = torch.channels_last if options["channels_last"] else torch.contiguous_format
    net = net.to(memory_format=fmt)
    x = torch.randn(batch, net_in_channels(net), size, size, device=device).contiguous(memory_format=fmt)
    t = torch.randint(0, 1000, (batch,), device=device)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, **({"fused": True} if options["fused"] else {}))
    run = torch.compile(net) if options["compile"] else net
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=options["precision"] == "bf16")

    def step():
        with autocast:
            loss = call(run, x, t).float().pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2):  # warm-up (compilation, kernel choice)
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return batch * steps / (time.perf_counter() - start)


def net_in_channels(net) -> int:
    conv = getattr(net, "conv_in", None)
    return conv.in_channels if conv is not None else 2


class PeerNet(torch.nn.Module):
    """diffusers' UNet2DModel called like ours: ``forward(x, t)`` returns the output tensor."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, t):
        return self.net(x, t).sample


def schedule(cfg) -> GaussianDiffusion:
    """The config's noise schedule and parameterization (the model's own defaults otherwise)."""
    p = cfg.model.params
    betas = make_beta_schedule(p.get("beta_schedule", "linear"), p.get("timesteps", 1000),
                               p.get("linear_start", 1e-4), p.get("linear_end", 2e-2))
    return GaussianDiffusion(betas, p.get("parameterization", "eps"))


def time_ddim(net, diffusion, size: int, batch: int, nfe: int, options: InferenceOptions, device,
              repeats: int = 1) -> float:
    """Seconds per call (the fastest of ``repeats``) of ``nfe`` DDIM steps from the matched start
    of sigma 0.1 (x_t and the noisy condition concatenated) on a copy of ``net`` run with
    ``options``, after a warm-up call."""
    net = copy.deepcopy(net).eval().requires_grad_(False)  # inference: channels_last weights converted once
    diffusion = diffusion.to(device)
    cond = torch.rand(batch, 1, size, size, device=device) * 2 - 1
    t_star = matched_timestep(diffusion, 0.1)
    x_start = diffusion.sqrt_alphas_cumprod[t_star] * cond

    def model_fn(x, t):
        return net(torch.cat([x, cond], dim=1), t)

    with torch.no_grad(), optimized_networks([net], options, device):
        run_chain(model_fn, diffusion, x_start, steps=nfe, t_start=t_star)
        return best_seconds(lambda: run_chain(model_fn, diffusion, x_start, steps=nfe, t_start=t_star), device,
                              repeats)


def best_seconds(call, device, repeats: int) -> float:
    """The shortest wall time of ``repeats`` calls, the device synchronised around each: on a
    shared machine the others measure the neighbours as well (as timeit reports the minimum)."""
    times = []
    for _ in range(max(1, repeats)):
        _sync(device)
        start = time.perf_counter()
        call()
        _sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def default_batch(device: torch.device, size: int) -> int:
    """Training batch: 128 at 64 x 64 and 32 at 256 x 256 on CUDA; 8 and 2 on CPU."""
    if device.type == "cuda":
        return min(128, max(4, int(32 * (256 / size) ** 2)))
    return min(8, max(1, int(2 * (256 / size) ** 2)))


def compare_with_peer(cfg, device: torch.device, args):
    """Markdown lines, one at a time as measured: training and denoising rows, ours against
    diffusers' UNet2DModel."""
    unet_cfg = cfg.model.params.unet_rosinality_config
    ours = instantiate_from_configs(unet_cfg, "model.params.unet_rosinality_config").to(device).train()
    peer = PeerNet(peer_unet(dict(unet_cfg.params))).to(device).train()
    n_ours, n_peer = (sum(p.numel() for p in m.parameters()) for m in (ours, peer))
    yield f"ours {n_ours:,} parameters, diffusers UNet2DModel {n_peer:,}"
    if args.sizes:
        yield from ["", "Training (forward, backward, AdamW step):", "",
                    "| case | options | batch | ours img/s | peer img/s | ratio ours / peer | our TFLOP/s | our MFU |",
                    "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    call = lambda n, x, t: n(x, t)
    for size in args.sizes:
        batch = args.batch_size or default_batch(device, size)
        x, t = torch.randn(batch, 2, size, size, device=device), torch.randint(0, 1000, (batch,), device=device)
        flops = count_flops(ours, call, x, t)
        for row in args.options:
            options = train_options(row)
            ours_ips = time_training(ours, call, size, batch, args.steps, options, device)
            peer_ips = time_training(peer, call, size, batch, args.steps, options, device)
            tflops = flops / batch * ours_ips / 1e12
            mfu = f"{100 * tflops / args.peak_tflops:.1f} %" if args.peak_tflops else "n/a"
            yield (f"| {size} x {size} | {row} | {batch} | {ours_ips:.3g} | {peer_ips:.3g} | "
                   f"{ours_ips / peer_ips:.2f} | {tflops:.3f} | {mfu} |")
    diffusion, size, batch = schedule(cfg), args.slice_size, args.denoise_batch
    if args.denoise_options:
        yield from ["", f"Denoising: {args.nfe}-step DDIM from the matched start (sigma 0.1), {size} x {size}, "
                    f"batch {batch}, the same loop for both:", "",
                    "| options | ours ms / slice | peer ms / slice | speed ours / peer |", "| --- | --- | --- | --- |"]
    for row in args.denoise_options:
        options = InferenceOptions.parse(row)
        if options.cuda_graphs and device.type != "cuda":
            yield f"| {row} | skipped: CUDA graphs need CUDA | | |"
            continue
        ours_s = time_ddim(ours, diffusion, size, batch, args.nfe, options, device, args.repeats)
        peer_s = time_ddim(peer, diffusion, size, batch, args.nfe, options, device, args.repeats)
        yield f"| {row} | {1000 * ours_s / batch:.4g} | {1000 * peer_s / batch:.4g} | {peer_s / ours_s:.2f} |"


def training_step(base, options: dict, batch_size: int, size: int, device: torch.device):
    """A function running one optimizer step (shared_step, AdamW, EMA update) of a copy of
    ``base`` with the row's options, on a fixed random batch."""
    model = copy.deepcopy(base).train()
    if options["channels_last"]:
        model.unet.to(memory_format=torch.channels_last)
    if options["compile"]:
        model.unet.compile()
    opt = torch.optim.AdamW(model.unet.parameters(), lr=1e-4, **({"fused": True} if options["fused"] else {}))
    batch = {k: torch.rand(batch_size, c, size, size, device=device) * 2 - 1
             for k, c in (("x_prior", 1), ("x_cond", getattr(base, "condition_channels", 1)))}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=options["precision"] == "bf16")

    def step():
        with autocast:
            loss = model.shared_step(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if getattr(model, "use_ema", False):
            model.update_ema()
    return step


def interleaved(calls: dict, device: torch.device, repeats: int, n: int = 1) -> dict:
    """row -> the shortest time of ``n`` calls of its function, over ``repeats`` rounds that
    visit every row in turn (after one warm-up call each), so that a slow spell of a shared
    machine does not fall on one row alone."""
    for call in calls.values():
        call()
    best = {row: float("inf") for row in calls}
    for _ in range(max(1, repeats)):
        for row, call in calls.items():
            best[row] = min(best[row], best_seconds(lambda: [call() for _ in range(n)], device, 1))
    return best


def model_tables(cfg, device: torch.device, args):
    """Markdown lines: the config's whole model, training steps and ``denoise()`` per option
    row, each table printed when its rows, measured in interleaved rounds, are done."""
    base = instantiate_from_configs(cfg.model, "model", allow_targets=cfg.get("allow_targets")).to(device)
    size = cfg.model.params.get("image_size", 64)
    batch_size = args.batch_size or default_batch(device, size)
    n_params = sum(p.numel() for p in base.unet.parameters())
    yield f"UNet {n_params / 1e6:.2f} M parameters"
    if args.options:
        yield from ["", f"Training (shared_step, AdamW, EMA update; {args.steps} steps, fastest of {args.repeats} "
                    "interleaved rounds):", "",
                    "| options | batch | size | steps/s | images/s |", "| --- | --- | --- | --- | --- |"]
        steps = {row: training_step(base, train_options(row), batch_size, size, device) for row in args.options}
        for row, seconds in interleaved(steps, device, args.repeats, args.steps).items():
            train_s = seconds / args.steps
            yield f"| {row} | {batch_size} | {size} x {size} | {1 / train_s:.3g} | {batch_size / train_s:.3g} |"
    if not hasattr(base, "denoise") or not args.denoise_options:
        return
    sampling = dict(cfg.get("sampling") or {})
    kwargs = {**sampling, "sigma": 0.1} if sampling.get("t_start") == "auto" else sampling
    kwargs.pop("inference", None)
    n = args.denoise_batch
    channels = getattr(base, "condition_channels", 1)  # the slice and its neighbours for a 2.5D model
    noisy = torch.rand(n, channels, args.slice_size, args.slice_size, device=device) * 2 - 1
    yield from ["", f"Denoising ({type(base).__name__}.denoise with sampling {sampling}), {n} slice(s) of "
                f"{args.slice_size} x {args.slice_size} per call, fastest of {args.repeats} interleaved rounds:", "",
                "| options | s per call | ms per slice |", "| --- | --- | --- |"]
    calls = {}
    for row in args.denoise_options:
        options = InferenceOptions.parse(row)
        if options.cuda_graphs and device.type != "cuda":
            continue
        model = copy.deepcopy(base).eval().requires_grad_(False)  # as denoise.py loads it
        calls[row] = lambda model=model, options=options: model.denoise(noisy, **kwargs, batch_size=n,
                                                                        inference=options)
    times = interleaved(calls, device, args.repeats)
    for row in args.denoise_options:
        if row not in times:
            yield f"| {row} | skipped: CUDA graphs need CUDA | |"
            continue
        yield f"| {row} | {times[row]:.3g} | {1000 * times[row] / n:.4g} |"


class Echo(list):
    """Output lines that are printed as they are added, so the rows measured so far survive a
    run stopped by a time limit."""

    def append(self, line) -> None:
        print(line, flush=True)
        super().append(line)

    def extend(self, lines) -> None:
        for line in lines:
            self.append(line)

    def __iadd__(self, lines):
        self.extend(lines)
        return self


def cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def header(cfg_path: str, device: torch.device) -> list[str]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return [f"# Benchmark: {Path(cfg_path).name}", "",
            f"device {device} ({name}), torch {torch.__version__}, {torch.get_num_threads()} CPU threads", ""]


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, help="training batch (default: by device and size)")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps (after 2 warm-up steps)")
    parser.add_argument("--slice-size", type=int, help="denoised slice side (default 512 on CUDA, 128 on CPU)")
    parser.add_argument("--denoise-batch", type=int, help="slices per denoising call (default 8 on CUDA, 1 on CPU)")
    parser.add_argument("--nfe", type=int, default=10, help="DDIM steps of the --peer denoising loop")
    parser.add_argument("--repeats", type=int, default=1,
                        help="timing rounds per row (the fastest counts; interleaved over the rows without --peer)")
    parser.add_argument("--options", nargs="*",
                        help="training rows, '+'-joined of fp32 bf16 cl fused compile (none given: no training)")
    parser.add_argument("--denoise-options", nargs="*",
                        help="denoising rows, '+'-joined of fp32 bf16 cl compile graphs (none given: no denoising)")
    parser.add_argument("--peer", action="store_true", help="compare our UNet with diffusers' UNet2DModel")
    parser.add_argument("--sizes", type=int, nargs="*", default=[64, 256],
                        help="image sides for --peer's training rows (none given: no training rows)")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak (e.g. 989 for H100 bf16) for MFU")
    parser.add_argument("--out", help="also write the Markdown table to this file")
    parser.add_argument("--data", action="store_true", help="instead: the training loader's patches/s per worker "
                        "(full augmentation) and memory per worker count (--data-workers), 5 x --steps batches each")
    parser.add_argument("--data-workers", type=int, nargs="+", default=[0, 1, 2], help="worker counts for --data")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    device = torch.device(args.device)
    kind = "cuda" if device.type == "cuda" else "cpu"
    args.options = DEFAULT_OPTIONS[kind][0] if args.options is None else args.options
    args.denoise_options = DEFAULT_OPTIONS[kind][1] if args.denoise_options is None else args.denoise_options
    for row in args.options:
        train_options(row)  # refuse a bad row before any timing
    for row in args.denoise_options:
        InferenceOptions.parse(row)
    args.slice_size = args.slice_size or (512 if kind == "cuda" else 128)
    args.denoise_batch = args.denoise_batch or (8 if kind == "cuda" else 1)
    lines = Echo()
    lines += header(args.config, device)
    if args.data:  # the data loader alone (diffusion_modules/diffusion_utils/loader_check.py)
        datamodule = instantiate_from_configs(cfg.data, "data", allow_targets=cfg.get("allow_targets"))
        lines += data_benchmark(datamodule, args.data_workers, max_batches=5 * args.steps)
    else:
        lines += compare_with_peer(cfg, device, args) if args.peer else model_tables(cfg, device, args)
    text = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    return text


if __name__ == "__main__":
    main()
