"""``study.py --estimate``: the predicted time of a study config on one GPU, before anything
runs (no volume is converted, no model trained; only headers and the small unseen test
volumes are read, and each UNet is built once on the CPU to count its FLOPs).

Figures used (printed with every estimate):
  - GPU training throughput: the issue-19 measurement of the 15.7 M-parameter UNet
    (``exp01_brain_1BA001_ct_config.yaml``) on one H200 at 64 x 64: ``REF_RATE`` images/s,
    fp32 and bf16 (H100 assumed alike). Another UNet trains at that rate times the ratio of
    training FLOPs per image (torch's FLOP counter, forward + backward at the model's
    patch size): FLOPs-bound, which flatters small networks on a GPU.
  - The loader: ``LOADER_RATE`` patches/s per worker (the issue's 2-core measurement, HDF5
    read per item): 1,130 with the voxel-size rescale augmentation, 5,650 without; a run
    trains at the smaller of the GPU and the loader rates.
  - Inference: a network call on an H x W slice costs H W / 64^2 patches of a third of a
    training step (forward only) at the fp32 rate, but no less than ``CALL_FLOOR_S`` (kernel
    launches of one eager call); K samples and a guidance pass are batched into one call.
  - CPU, measured on the 2-core development machine under load (``CPU_S_PER_MP``, seconds per
    megapixel): BM3D 58, NLM 1.1, one low-dose CT simulation 12.3 (0.8 s per 256^2 slice);
    ``SCORE_S`` per scored (slice, level, method); ``RUN_OVERHEAD_S`` per trained model
    (start, data, checkpoints). Low-dose training noise is simulated in the loader workers:
    train slices x ``lowdose_cache`` simulations over ``num_workers``.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

REF_CONFIG = "run_scripts/configs/ddpm-cond/exp01_brain_1BA001_ct_config.yaml"
REF_RATE = {"fp32": 1400.0, "bf16": 1900.0}  # images/s at 64 x 64 on one H200 (issue 19)
LOADER_RATE = {"rescale": 1130.0, "plain": 5650.0}  # patches/s per loader worker (issue 19, 2-core machine)
CALL_FLOOR_S = 0.003
CPU_S_PER_MP = {"bm3d": 58.0, "nlm": 1.1, "lowdose_sim": 12.3}
SCORE_S = 0.02
RUN_OVERHEAD_S = 30.0
VALIDATION_IMAGES = 8  # orchestration.callbacks.ValidationScores


def train_flops(model_cfg, size: int) -> float:
    """Training FLOPs (forward + backward) of one size x size image through the config's UNet."""
    from omegaconf import OmegaConf

    unet_cfg = OmegaConf.to_container(model_cfg.params.unet_rosinality_config, resolve=True)
    return _unet_flops(json.dumps(unet_cfg, sort_keys=True), int(size))


@functools.lru_cache(maxsize=None)
def _unet_flops(unet_json: str, size: int) -> float:
    import torch
    from omegaconf import OmegaConf
    from torch.utils.flop_counter import FlopCounterMode

    from utils.initialize_configs import instantiate_from_configs

    unet_cfg = OmegaConf.create(json.loads(unet_json))
    with torch.device("meta"):  # shapes only: FLOPs are counted, nothing is computed
        net = instantiate_from_configs(unet_cfg, "model.params.unet_rosinality_config")
        x = torch.randn(1, int(unet_cfg.params.in_channel), size, size)
        t = torch.zeros(1, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        net(x, t).sum().backward()
    return float(counter.get_total_flops())


def geometry(path: Path) -> tuple[int, int, int]:
    """(slices, rows, cols) of a volume in its acquisition plane, from the header only."""
    import h5py

    from utils.planes import PLANE_AXES, acquisition_plane

    path = Path(path)
    if path.suffix.lower() == ".h5":
        with h5py.File(path, "r") as f:
            return tuple(int(n) for n in f["volume"].shape)
    if path.is_dir():
        import pydicom

        files = [p for p in sorted(path.rglob("*")) if p.is_file()]
        ds = pydicom.dcmread(str(files[0]), stop_before_pixels=True)
        return len(files), int(ds.Rows), int(ds.Columns)
    import nibabel as nib

    img = nib.load(str(path))
    ornt = nib.io_orientation(img.affine)
    shape, zooms = [0, 0, 0], [0.0, 0.0, 0.0]
    for i in range(3):
        shape[int(ornt[i, 0])], zooms[int(ornt[i, 0])] = int(img.shape[i]), float(img.header.get_zooms()[i])
    axes = PLANE_AXES[acquisition_plane(zooms)]
    return tuple(shape[a] for a in axes)


def data_slices(params, max_per_source) -> tuple[list[tuple[int, int]], int]:
    """([(rows, cols) of every scored test slice], pixels of all training slices) of a data section."""
    from diffusion_modules.diffusion_utils.datamodule import slab_split
    from diffusion_modules.diffusion_utils.manifest import expand_volumes
    from diffusion_modules.diffusion_utils.splits import assign_volumes, check_split_config

    volumes = expand_volumes(params.get("volumes"))
    split = check_split_config(params.get("split"))
    assignment = assign_volumes(volumes, split, int(params.get("seed", 0)))
    tests, n_train = [], 0
    for v in volumes:
        n, rows, cols = geometry(v["path"])
        if split["mode"] == "slab":
            train, _, test = slab_split(n, split["fractions"], split["gap"])
            n_test, n_train = len(test), n_train + len(train) * rows * cols
        else:
            part = assignment[v["name"]]
            n_test, n_train = (n if part == "test" else 0), n_train + (n * rows * cols if part == "train" else 0)
        n_test = n_test if max_per_source is None else min(n_test, int(max_per_source))
        tests += [(rows, cols)] * n_test
    return tests, n_train


def unseen_slices(ev, ct_only: bool) -> list[tuple[int, int]]:
    from orchestration.evaluation_job import load_test_volume, parse_test_volumes
    from utils.planes import ACQUISITION, acquisition_plane, cut_plane

    out = []
    for t in parse_test_volumes(ev.get("test_volumes"), ev.get("max_slices_per_source")):
        ras, zooms, found = load_test_volume(t["path"])
        modality = t["modality"] or found or ("ct" if "ct" in t["name"].lower() else "mr")
        if ct_only and modality != "ct":
            continue
        volume, _ = cut_plane(ras, zooms, acquisition_plane(zooms) if t["plane"] == ACQUISITION else t["plane"])
        n = volume.shape[0] if t["max_slices"] is None else min(volume.shape[0], int(t["max_slices"]))
        out += [tuple(volume.shape[1:])] * n
    return out


def model_rates(cfg) -> dict:
    """Training FLOPs per image, GPU images/s (fp32 and the run's precision) and the loader's patches/s."""
    size = int(cfg.model.params.get("image_size", 64))
    flops = train_flops(cfg.model, size)
    precision = "bf16" if "bf16" in str((cfg.get("trainer") or {}).get("precision", "32")) else "fp32"
    scale = reference_flops() / flops  # FLOPs-bound: images/s in inverse proportion to FLOPs per image
    augment = cfg.data.params.get("augment")
    rescale = hasattr(augment, "get") and augment.get("rescale") not in (None, False)
    workers = int(cfg.data.params.get("num_workers", 0))
    loader = max(1, workers) * LOADER_RATE["rescale" if rescale else "plain"]
    return {"flops": flops, "fp32": REF_RATE["fp32"] * scale, "train": REF_RATE[precision] * scale,
            "precision": precision, "loader": loader, "workers": workers, "size": size}


@functools.lru_cache(maxsize=None)
def reference_flops() -> float:
    """Training FLOPs of one 64 x 64 image through the UNet of REF_CONFIG (51.1 GFLOP)."""
    from utils.initialize_configs import load_config
    from utils.paths import resolve_path

    return train_flops(load_config(resolve_path(REF_CONFIG)).model, 64)


def call_seconds(pixels: int, fp32_rate: float) -> float:
    return max(CALL_FLOOR_S, pixels / 4096 / (3 * fp32_rate))


def training_seconds(cfg, rates: dict, train_pixels: int) -> tuple[float, str]:
    trainer = cfg.get("trainer") or {}
    steps = int(trainer.get("max_steps", 0))
    batch = int(cfg.data.params.get("batch_size", 32)) * int(trainer.get("accumulate_grad_batches", 1))
    rate = min(rates["train"], rates["loader"])
    seconds = steps * batch / rate
    interval = trainer.get("val_check_interval")
    n_val = steps // int(interval) if isinstance(interval, int) and interval > 0 else 1
    val_batches = trainer.get("limit_val_batches", 4)
    val_batches = int(val_batches) if isinstance(val_batches, int) else 4
    sampling_steps = int((cfg.get("sampling") or {}).get("steps", 10))
    seconds += n_val * (val_batches * batch / (3 * rates["fp32"])
                        + VALIDATION_IMAGES * sampling_steps * call_seconds(rates["size"] ** 2, rates["fp32"]))
    noise = cfg.data.params.get("noise") or {}
    sims = 0.0
    if noise.get("type") == "lowdose_ct":
        sims = train_pixels / 1e6 * int(cfg.data.params.get("lowdose_cache", 4)) * CPU_S_PER_MP["lowdose_sim"] \
            / max(1, rates["workers"])
    bound = "loader" if rates["loader"] < rates["train"] else "GPU"
    return seconds + sims + RUN_OVERHEAD_S, (f"{steps} steps x {batch} = {steps * batch:,} patches at {rate:,.0f}/s "
                                             f"({bound}-bound, {rates['flops'] / 1e9:.1f} GFLOP per image, "
                                             f"{rates['precision']})" + (f", {sims:.0f} s of low-dose noise simulation"
                                                                         if sims else ""))


def estimate(study: dict) -> dict:
    """{"lines": [...], "training_s", "evaluation_s", "total_s"} of a loaded study config."""
    from omegaconf import OmegaConf

    from orchestration.study import _model_run_config, expand_strategies
    from utils.initialize_configs import load_config
    from utils.paths import resolve_path

    run_cfg = load_config(resolve_path(study["run"]))
    if study.get("evaluation"):
        run_cfg = OmegaConf.merge(run_cfg, {"evaluation": study["evaluation"]})
    ev = run_cfg.get("evaluation") or {}
    methods, info = expand_strategies(study["strategies"], study.get("k_params") or {"eta": 1.0})
    lines = ["Figures: H200 training " + ", ".join(f"{k} {v:,.0f}" for k, v in REF_RATE.items())
             + " images/s for the 15.7 M UNet at 64^2 (issue 19), scaled by training FLOPs; loader "
             + ", ".join(f"{k} {v:,.0f}" for k, v in LOADER_RATE.items()) + " patches/s per worker; network call >= "
             f"{CALL_FLOOR_S * 1000:.0f} ms; CPU s per megapixel " + ", ".join(f"{k} {v:g}" for k, v in CPU_S_PER_MP.items())
             + f"; {RUN_OVERHEAD_S:.0f} s per trained model.", ""]
    trained, rates_by_key, train_s, unknown = {}, {}, 0.0, set()
    eval_s = cpu_s = 0.0
    for noise in study["noise"]:
        train_noise = noise.get("train_noise")
        models = {}
        for key, raw in (study.get("models") or {}).items():
            entry = dict(raw)
            if entry.get("ckpt"):
                continue
            tag = json.dumps([key, train_noise, noise.get("volumes") if train_noise else None], sort_keys=True, default=str)
            cfg = _model_run_config(entry, run_cfg, study.get("train_overrides") or [], noise if train_noise else None, key)
            rates_by_key[key] = rates = model_rates(cfg)
            if tag not in trained:
                seconds, what = training_seconds(cfg, rates, data_slices(cfg.data.params, None)[1])
                trained[tag] = seconds
                train_s += seconds
                lines.append(f"train {key}{' on ' + noise['type'] if train_noise else ''}: {what}: {seconds / 60:.1f} min")
            models[key] = rates
        data = OmegaConf.merge(run_cfg.data.params, {"volumes": noise["volumes"]} if noise.get("volumes") else {})
        slices = data_slices(data, ev.get("max_slices_per_source"))[0] + unseen_slices(ev, noise["type"] == "lowdose_ct")
        levels = len(noise["levels"])
        net = cpu = 0.0
        for m in methods:
            kind, params = m["type"], m.get("params") or {}
            for rows, cols in slices:
                pixels = rows * cols
                if kind == "ddpm":
                    rate = models.get(m.get("model", "ddpm"), {}).get("fp32") or next(iter(rates_by_key.values()))["fp32"]
                    g = params.get("guidance_scale")
                    passes = int(params.get("n_samples", 1)) * (2 if g not in (None, 0.0, 1.0) else 1)
                    calls = int(params.get("steps", 10)) + (1 if params.get("start_noise") == "independent" else 0)
                    net += levels * calls * call_seconds(pixels * passes, rate)
                elif kind == "unet":
                    net += levels * call_seconds(pixels, models.get(m.get("model", "unet"), {}).get("fp32", REF_RATE["fp32"]))
                elif kind in ("bm3d", "nlm"):
                    cpu += levels * CPU_S_PER_MP[kind] * pixels / 1e6
                elif kind != "noisy":
                    unknown.add(kind)
        sims = levels * len(slices) * (CPU_S_PER_MP["lowdose_sim"] * sum(r * c for r, c in slices) / len(slices) / 1e6
                                       if noise["type"] == "lowdose_ct" and slices else 0.0)
        scores = levels * len(slices) * len(methods) * SCORE_S
        eval_s += net + scores + sims
        cpu_s += cpu
        lines.append(f"evaluate {noise['type']}: {len(slices)} slices x {levels} levels x {len(methods)} methods: "
                     f"network {net / 60:.1f} min, BM3D/NLM {cpu / 60:.1f} min (CPU), noise simulation "
                     f"{sims / 60:.1f} min, scoring {scores / 60:.1f} min")
    total = train_s + eval_s + cpu_s
    if unknown:
        lines.append(f"not counted (no figure for them): the methods of type {', '.join(sorted(unknown))}")
    lines += ["", f"predicted: {total / 3600:.2f} h on one GPU ({train_s / 60:.0f} min training "
                  f"{len(trained)} model(s), {(eval_s + cpu_s) / 60:.0f} min evaluation of which "
                  f"{cpu_s / 60:.0f} min CPU baselines)"]
    return {"lines": lines, "training_s": train_s, "evaluation_s": eval_s + cpu_s, "total_s": total,
            "trained": len(trained), "methods": len(methods), "info": info}
