"""Exact resume after a crash, and checkpoints that a killed process cannot corrupt.

What a Lightning checkpoint restores by itself: weights (the EMA copy and its update count
``ema_updates`` are part of the model's state), optimizer, LR schedule, step and epoch
counters, callback states. What it does not: the random generators, and the place in an
epoch a plain DataLoader had reached (Lightning restarts such a loader's epoch from a fresh
shuffle). Here:

- ``ExactResume`` (a callback) writes the random generator states (torch CPU, the model's
  CUDA device, numpy's global, Python's ``random``) into every checkpoint at the moment it
  is taken, and sets them back when the resumed run starts training (after Lightning's
  sanity check and after the training loader is made). It also isolates validation: the
  states are saved before and restored after each validation run, so validating (or
  validating at other intervals) never shifts the training stream.
- The training loader's position is saved by the loader itself (the DataModule's
  ``ResumableLoader``, diffusion_modules/diffusion_utils/resumable.py), whose order, noise
  and augmentation are functions of (seed, epoch, item), not streams.
- ``AtomicCheckpointIO`` (a CheckpointIO plugin for the Trainer) writes each checkpoint
  (periodic ``last.ckpt``, ``trainer.save_checkpoint``) to a temporary file in the same
  folder and renames it into place (utils.atomic), so a process killed at any moment leaves
  the previous checkpoint loadable. It reads every checkpoint with
  ``torch.load(weights_only=True)`` (whatever Lightning asks, or TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD
  says), and refuses one whose model hyper-parameters differ from the module being trained in
  what the weights depend on (``orchestration.checkpoints.check_resume_hparams``: timesteps,
  beta schedule, parameterization, UNet config...), before any state is restored.
"""
from __future__ import annotations

import random

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_warn

from orchestration.checkpoints import check_resume_hparams
from utils.atomic import atomic_write

#: checkpoint key of the random generator states
RNG_KEY = "rng_states"


def rng_states(device: torch.device | None = None) -> dict:
    """The global random generator states, as tensors and plain data (a checkpoint holding
    them still loads with ``torch.load(weights_only=True)``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states = {"torch": torch.get_rng_state(),
              "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                        "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
              "python": random.getstate()}
    if device is not None and device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def set_rng_states(states: dict, device: torch.device | None = None) -> None:
    """Set the generators back to ``rng_states()``'s result."""
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(states["cuda"], device)


class ExactResume(pl.Callback):
    """Random generator states into every checkpoint and back on resume; validation leaves
    them untouched (module docstring). Under DDP the states of rank 0 are saved, and every
    rank starts from them (all ranks draw alike, as seed_everything seeds them alike)."""

    def __init__(self):
        super().__init__()
        self._pending: dict | None = None
        self._outside_validation: dict | None = None

    def setup(self, trainer, pl_module, stage):
        # Lightning restores a checkpoint after this hook: the checkpoint IO then checks it against the module
        io = getattr(trainer.strategy, "checkpoint_io", None)
        if isinstance(io, AtomicCheckpointIO):
            io.module = pl_module

    def teardown(self, trainer, pl_module, stage):
        io = getattr(trainer.strategy, "checkpoint_io", None)
        if isinstance(io, AtomicCheckpointIO):
            io.module = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        checkpoint[RNG_KEY] = rng_states(pl_module.device)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint):
        self._pending = checkpoint.get(RNG_KEY)
        if self._pending is None:
            rank_zero_warn("the checkpoint holds no random generator states (written before exact resume): "
                           "training noise after the resume differs from an uninterrupted run's")

    def on_train_start(self, trainer, pl_module):
        if self._pending is not None:
            set_rng_states(self._pending, pl_module.device)
            self._pending = None

    def on_validation_start(self, trainer, pl_module):
        self._outside_validation = rng_states(pl_module.device)

    def on_validation_end(self, trainer, pl_module):
        if self._outside_validation is not None:
            set_rng_states(self._outside_validation, pl_module.device)
            self._outside_validation = None


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose local checkpoints are written to a temporary file in the
    target's folder and renamed into place (utils.atomic.atomic_write); URLs (``s3://``...)
    go to Lightning's own writer. Checkpoints are read with ``weights_only=True`` only; once
    ExactResume has set ``module`` (the LightningModule being trained), a checkpoint whose
    model hyper-parameters differ from its own in what the weights depend on is refused."""

    module = None

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        if weights_only is False:
            raise ValueError(f"{path}: weights_only={weights_only!r} refused; checkpoints are read with weights_only=True only")
        kwargs = {} if map_location is None else {"map_location": map_location}
        checkpoint = super().load_checkpoint(path, weights_only=True, **kwargs)
        if self.module is not None:
            check_resume_hparams(self.module, checkpoint, path)
        return checkpoint

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))
        return None
