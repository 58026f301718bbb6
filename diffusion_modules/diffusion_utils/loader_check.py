"""What the DataModule's loaders hold in memory, and how fast they serve patches.

``estimate_loader_memory``: the bytes the train and validation loaders will hold, per
process and in all, from the HDF5 files' shapes (no pixels read):
  - ``in_memory``: counted as if every process that reads a dataset kept its own copy of
    each of its files' ``patches`` (an upper bound: HDF5PatchDataset maps contiguous files
    read-only, shared through the page cache) (N x S x S x 2 bytes), and of ``volume`` (slices x H x W x 2 bytes)
    when the voxel-size rescale or neighbouring slices (``context_slices``) read whole slices;
    a file of the train and the val set (a slab split) is held by both loaders' processes;
  - per-slice noise (low-dose CT): each training process keeps up to ``lowdose_cache``
    realisations of every training slice it meets (H x W x 4 bytes, times 1 + 2 k with
    neighbouring slices), each validation process one per slice.
Processes: with ``num_workers`` = 0 the main process reads both sets; with w > 0 each loader
has w workers (persistent); under DDP every device has its own. ``check_loader_memory``
refuses (ValueError with the estimate) a configuration that needs more than
``MEMORY_FRACTION`` of the memory available now.

``measure_loader``: patches per second of the training loader with a given worker count,
and the peak resident (RSS) and proportional (PSS) memory of the process tree meanwhile.
"""
from __future__ import annotations

import time

import h5py

from utils.process_memory import GIB, MemorySampler, available_bytes

#: refuse when the estimate exceeds this fraction of the available memory
MEMORY_FRACTION = 0.9


def _file_bytes(path) -> tuple[int, int, int, int]:
    """(patch bytes, volume bytes, slice pixels, slices) of one HDF5 patch file."""
    with h5py.File(path, "r") as f:
        patches, volume = f["patches"], f["volume"]
        return (patches.size * patches.dtype.itemsize, volume.size * volume.dtype.itemsize,
                int(volume.shape[1] * volume.shape[2]), int(volume.shape[0]))


def estimate_loader_memory(datamodule, parts: dict, devices: int = 1) -> dict:
    """The bytes the loaders of ``datamodule`` will hold for the split ``parts``
    (``split_slices()``): {"train_process", "val_process" (bytes per process), "processes"
    (train, val), "total", "lines" (the terms, as text)} (see the module docstring)."""
    whole_slices = getattr(datamodule.augment, "rescale", None) is not None or getattr(datamodule, "context_slices", 0) > 0
    per_slice = bool(getattr(datamodule.noise, "per_slice", False))
    stack = 1 + 2 * int(getattr(datamodule, "context_slices", 0))
    held, lines = {}, []
    for name in ("train", "val"):
        copy = noise = 0
        for path, slices in parts[name].items():
            patch_bytes, volume_bytes, pixels, _ = _file_bytes(path)
            if datamodule.in_memory:
                copy += patch_bytes + (volume_bytes if whole_slices else 0)
            if per_slice:
                noise += len(slices) * pixels * 4 * stack * (datamodule.lowdose_cache if name == "train" else 1)
        held[name] = (copy, noise)
    workers = datamodule.num_workers
    processes = (max(1, workers) * devices, (workers if workers else 0) * devices)
    train, val = sum(held["train"]), sum(held["val"])
    if workers == 0:  # the main process reads both sets
        train, val = train + val, 0
    total = processes[0] * train + processes[1] * val
    for (name, (copy, noise)), n in zip(held.items(), processes if workers else (processes[0], processes[0])):
        if copy or noise:
            lines.append(f"{name}: {n} process(es) x ({copy / GIB:.2f} GiB of in-memory patches"
                         f"{' and slices' if whole_slices else ''} + {noise / GIB:.2f} GiB of per-slice noise)")
    return {"train_process": train, "val_process": val, "processes": processes, "total": total, "lines": lines}


def check_loader_memory(datamodule, parts: dict, devices: int = 1, available: int | None = None) -> dict:
    """``estimate_loader_memory``; ValueError naming the estimate when it exceeds
    MEMORY_FRACTION of ``available`` (default: MemAvailable now; no check where unknown)."""
    estimate = estimate_loader_memory(datamodule, parts, devices)
    available = available_bytes() if available is None else available
    if available is not None and estimate["total"] > MEMORY_FRACTION * available:
        raise ValueError(
            f"the data loaders would hold about {estimate['total'] / GIB:.1f} GiB "
            f"({'; '.join(estimate['lines'])}; num_workers={datamodule.num_workers}"
            f"{f', {devices} devices' if devices > 1 else ''}), more than {MEMORY_FRACTION:.0%} of the "
            f"{available / GIB:.1f} GiB of memory available: set in_memory: false (one HDF5 read per item), "
            "fewer num_workers, a smaller lowdose_cache, or a larger stride / slice_step")
    return estimate


def measure_loader(datamodule, num_workers: int, max_batches: int | None = None) -> dict:
    """Iterate the training loader of ``datamodule`` (set up) with ``num_workers`` workers for
    one epoch or 1 + ``max_batches`` batches: {"workers", "batches", "patches" (all read),
    "seconds", "patches_per_s" (after the first batch), "per_worker" (that divided by
    max(1, workers)), "startup_s" (to the first batch), "peak" ({processes, rss, pss} bytes
    of the process tree, or None)}."""
    datamodule.num_workers = int(num_workers)
    loader = datamodule.train_dataloader()
    batches = patches = 0
    with MemorySampler() as memory:
        start = time.perf_counter()
        iterator = iter(loader)
        first = next(iterator)
        startup = time.perf_counter() - start
        total = int(first["x_prior"].shape[0])
        start = time.perf_counter()
        for batch in iterator:
            batches += 1
            patches += int(batch["x_prior"].shape[0])
            if max_batches is not None and batches >= max_batches:
                break
        seconds = time.perf_counter() - start
        del first, iterator
    rate = patches / seconds if seconds > 0 else float("nan")
    return {"workers": int(num_workers), "batches": batches + 1, "patches": total + patches, "seconds": seconds,
            "patches_per_s": rate, "per_worker": rate / max(1, int(num_workers)), "startup_s": startup,
            "peak": memory.peak}


#: the full training augmentation of docs/data.md (the suggested ranges of every key)
FULL_AUGMENT = {"flips": True, "rescale": [0.5, 2.0], "gamma": [0.7, 1.4], "contrast": [0.9, 1.1],
                "brightness": [-0.05, 0.05]}


def data_benchmark(datamodule, workers=(0, 1, 2), max_batches: int = 50, augment="full") -> list[str]:
    """Markdown lines: patches/s of the training loader of ``datamodule`` (built, not set up)
    per worker count, per worker, and the peak RSS / PSS of the process tree, with the full
    augmentation (``augment="full"``) or the config's (``"config"``); ``setup`` refuses a
    configuration that would not fit in memory first."""
    from diffusion_modules.diffusion_utils.augment import Augmentation

    if augment == "full":
        datamodule.augment = Augmentation.from_config(FULL_AUGMENT)
    datamodule.prepare_data()
    datamodule.setup()
    size = datamodule.image_size
    lines = [f"training loader: {len(datamodule.train_set)} patches of {size} x {size} from "
             f"{len(datamodule.train_set.files)} files, batch {datamodule.batch_size}, in_memory "
             f"{datamodule.in_memory}, augmentation {'full' if augment == 'full' else 'of the config'}, "
             f"{max_batches} batches per row after the first", "",
             "| workers | patches/s | per worker | to the first batch (s) | tree RSS (GiB) | tree PSS (GiB) | "
             "estimated loader memory (GiB) |", "| --- | --- | --- | --- | --- | --- | --- |"]
    parts = datamodule.split_slices()
    for w in workers:
        datamodule.num_workers = int(w)
        estimate = estimate_loader_memory(datamodule, parts)["total"]
        r = measure_loader(datamodule, int(w), max_batches)
        peak = r["peak"] or {"rss": float("nan"), "pss": float("nan")}
        lines.append(f"| {w} | {r['patches_per_s']:.0f} | {r['per_worker']:.0f} | {r['startup_s']:.2f} | "
                     f"{peak['rss'] / GIB:.2f} | {peak['pss'] / GIB:.2f} | {estimate / GIB:.2f} |")
    return lines
