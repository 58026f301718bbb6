"""Print training and denoising speed of a config's model on this machine.

    python run_scripts/benchmark.py --config run_scripts/configs/ddpm-cond/bundled_ct_mr.yaml \
        [--device cuda] [--batch-size 32] [--steps 20] [--slice-size 256] [key=value ...]

Training: optimizer steps per second and images per second on random 1-channel batches
of the model's patch size (forward, backward, AdamW step, EMA update). Denoising:
seconds per slice of ``slice-size`` squared with the config's ``sampling`` settings.
Figures only; nothing is asserted.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from utils.initialize_configs import instantiate_from_configs, load_config  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10, help="timed training steps (after 2 warm-up steps)")
    parser.add_argument("--slice-size", type=int, default=256)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    device = torch.device(args.device)
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
