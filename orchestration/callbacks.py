"""Lightning callbacks of this project: image rows to the experiment logger, training speed
and GPU memory per logging interval, a stop on NaN."""
from __future__ import annotations

import time

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger


class ImageLogger(pl.Callback):
    """Every ``every_n_steps`` optimizer steps, log ``pl_module.log_images(batch)`` rows.

    Each named row (B, 1, H, W) in [-1, 1] becomes one image strip mapped to [0, 1], logged
    as ``images/<name>`` to wandb or TensorBoard; with the CSV logger nothing is drawn.
    """

    def __init__(self, every_n_steps: int = 500, n: int = 4, steps: int = 20):
        super().__init__()
        self.every_n_steps, self.n, self.steps = every_n_steps, n, steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if self.every_n_steps <= 0 or step == 0 or step % self.every_n_steps or not trainer.is_global_zero:
            return
        log_image = getattr(trainer.logger, "log_image", None)  # WandbLogger
        if isinstance(trainer.logger, TensorBoardLogger):
            def log_image(key, images, step):
                trainer.logger.experiment.add_image(key, images[0], global_step=step)  # (1, H, W): CHW
        if log_image is None or not hasattr(pl_module, "log_images"):
            return
        was_training = pl_module.training
        pl_module.eval()
        rows = pl_module.log_images(batch, n=self.n, steps=self.steps)
        pl_module.train(was_training)
        for name, row in rows.items():
            strip = torch.cat(list(((row.float().clamp(-1, 1) + 1) / 2).cpu()), dim=-1)
            log_image(key=f"images/{name}", images=[strip], step=step)


def _batch_size(batch) -> int:
    """Images in a batch: the first dimension of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else ()
    return next((_batch_size(item) for item in items if isinstance(item, (torch.Tensor, dict, list, tuple))), 0)


class TrainingSpeed(pl.Callback):
    """Training throughput and, on CUDA, peak GPU memory, per logging interval.

    Logged with ``pl_module.log`` at every logged step (``trainer.log_every_n_steps``), in the
    same rows as the loss:

    - ``train/images_per_sec``: training images per second of wall time since the previous
      logged step, all processes together (batch size x world size), validation time left
      out (data loading, optimizer step, checkpoints and image rows counted in);
    - ``train/gpu_mem_peak_gib``: the most memory torch allocated on this process's GPU in
      the interval (``torch.cuda.max_memory_allocated``, GiB = 2**30 bytes); CUDA only.
    """

    def __init__(self):
        super().__init__()
        self._t0 = self._val_t0 = self._step = None
        self._images = 0

    def _restart(self, trainer, pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        self._t0, self._images, self._step = time.perf_counter(), 0, trainer.global_step

    def on_train_start(self, trainer, pl_module):
        self._restart(trainer, pl_module)

    def on_validation_start(self, trainer, pl_module):
        self._val_t0 = time.perf_counter() if self._t0 is not None and not trainer.sanity_checking else None

    def on_validation_end(self, trainer, pl_module):
        if self._val_t0 is not None:
            self._t0 += time.perf_counter() - self._val_t0  # validation is not training time
            self._val_t0 = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._t0 is None:
            self._restart(trainer, pl_module)
        self._images += _batch_size(batch) * trainer.world_size
        stepped, self._step = trainer.global_step != self._step, trainer.global_step
        # Lightning writes the logged values after an optimizer step whose number is a
        # multiple of log_every_n_steps (and at the last step); the interval restarts there
        logged = stepped and trainer.log_every_n_steps > 0 and (
            trainer.global_step % trainer.log_every_n_steps == 0 or trainer.should_stop)
        cuda = pl_module.device.type == "cuda"
        if logged and cuda:
            torch.cuda.synchronize(pl_module.device)  # the interval's kernels are done
        elapsed = time.perf_counter() - self._t0
        if elapsed > 0 and self._images:
            pl_module.log("train/images_per_sec", self._images / elapsed, on_step=True, on_epoch=False)
        if cuda:
            peak = torch.cuda.max_memory_allocated(pl_module.device) / 2 ** 30
            pl_module.log("train/gpu_mem_peak_gib", peak, on_step=True, on_epoch=False)
        if logged:
            self._restart(trainer, pl_module)


class NonFiniteGuard(pl.Callback):
    """Stop training at the first NaN or inf loss or gradient, naming the step.

    The gradients are checked before the optimizer step, so the weights, the EMA and every
    checkpoint written so far stay finite; the raised FloatingPointError ends the run with
    a non-zero exit status. Under fp16 mixed precision the grad scaler skips steps with
    inf gradients by design, so only the loss is checked there.
    """

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if "16-mixed" in str(trainer.precision) and "bf16" not in str(trainer.precision):
            return
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        if grads and not torch.isfinite(torch.stack(torch._foreach_norm(grads))).all():
            bad = next(n for n, p in pl_module.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all())
            raise FloatingPointError(f"non-finite gradient at step {trainer.global_step} (first in {bad}); "
                                     "training stopped before the optimizer step, checkpoints written so far are kept")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor) and not torch.isfinite(loss).all():
            raise FloatingPointError(f"non-finite loss {float(loss)} at step {trainer.global_step}; training stopped, "
                                     "checkpoints written so far are kept")
