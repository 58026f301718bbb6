"""Lightning callbacks of this project: image rows to the experiment logger, validation PSNR
and SSIM with the configured sampler, training speed and GPU memory per logging interval, a
stop on NaN."""
from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Mapping

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from diffusion_modules.diffusion_utils.sampling import SamplingOptions
from metrics.image_metrics import ImageMetrics
from models.ddpm_conditioned import ConditionDDPM
from models.supervised_unet import SupervisedUNet
from utils.intensity import from_model_units


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
            strip = torch.cat(list(from_model_units(row.float().clamp(-1, 1)).cpu()), dim=-1)
            log_image(key=f"images/{name}", images=[strip], step=step)


class ValidationScores(pl.Callback):
    """``val/psnr`` and ``val/ssim`` of the model's ``denoise`` on a fixed validation batch.

    The batch is the first ``n_images`` images of the first validation batch global rank 0
    sees, captured once (on the CPU) and kept for the whole run; the validation noise is
    seeded, so it is the same batch after a resume. At the end of every validation (the
    sanity check too, so that bad ``sampling`` arguments fail before training) each image
    is denoised on its own by ``pl_module.denoise(noisy, **sampling)`` with the EMA weights,
    ``sigma`` set to the image's ``batch["sigma"]`` when ``t_start`` is ``"auto"`` (as the
    evaluation does), and one ``torch.Generator`` seeded with ``seed`` for all images, so
    the values are reproducible. ``sampling`` is the run config's ``sampling`` section
    (``SamplingOptions``, checked when the callback is made).

    Scores: ``metrics.image_metrics.ImageMetrics`` on the [0, 1] scale (data range 1), the
    clean image (x_prior + 1) / 2 against the prediction (y + 1) / 2 clipped to [0, 1],
    averaged over the images. Models: ``ConditionDDPM`` and ``SupervisedUNet`` (whose
    ``denoise(noisy)`` takes no sampling arguments); an unconditional ``DDPM`` is skipped.

    Under DDP only global rank 0 captures, denoises and logs (``rank_zero_only=True``, no
    ``sync_dist``): the other processes neither wait nor compute, and the two values are not
    available to callbacks of the other ranks (e.g. a ``ModelCheckpoint`` monitor).
    """

    def __init__(self, sampling: Mapping | None = None, n_images: int = 8, seed: int = 0):
        super().__init__()
        if n_images < 1:
            raise ValueError(f"n_images must be >= 1, got {n_images}")
        self.options = SamplingOptions.from_mapping(sampling)
        self.n_images, self.seed = n_images, seed
        self.batch: dict[str, torch.Tensor] | None = None

    @staticmethod
    def applies_to(pl_module) -> bool:
        return isinstance(pl_module, (ConditionDDPM, SupervisedUNet))

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if self.batch is not None or batch_idx or dataloader_idx or not trainer.is_global_zero:
            return
        if not self.applies_to(pl_module) or not all(k in batch for k in ("x_cond", "x_prior")):
            return
        n = self.n_images
        self.batch = {k: batch[k][:n].detach().cpu().clone() for k in ("x_cond", "x_prior")}
        if "sigma" in batch:
            sigma = torch.as_tensor(batch["sigma"]).detach().cpu().float().reshape(-1)
            self.batch["sigma"] = sigma.expand(batch["x_cond"].shape[0])[:n].clone()

    def scores(self, pl_module) -> dict:
        """{"psnr", "ssim"}: means over the fixed batch of ``ImageMetrics.image_scores``."""
        diffusion = isinstance(pl_module, ConditionDDPM)  # the U-Net's denoise takes no sampling options
        generator = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        sampling = {**self.options.as_kwargs(), "generator": generator} if diffusion else {}
        preds = []
        with getattr(pl_module, "ema_scope", nullcontext)():
            for i, noisy in enumerate(self.batch["x_cond"]):
                kw = dict(sampling)
                if diffusion and self.options.t_start == "auto" and "sigma" in self.batch:
                    kw["sigma"] = float(self.batch["sigma"][i])
                preds.append(pl_module.denoise(noisy[None].to(pl_module.device), **kw).float().cpu())
        pred01 = from_model_units(torch.cat(preds)).clamp(0, 1)
        scores = ImageMetrics().image_scores(from_model_units(self.batch["x_prior"]), pred01, dynamic_range=1.0)
        return {"psnr": scores["psnr"], "ssim": scores["ssim"]}

    def on_validation_epoch_end(self, trainer, pl_module):
        if self.batch is None or not trainer.is_global_zero:
            return
        for name, value in self.scores(pl_module).items():
            pl_module.log(f"val/{name}", value, prog_bar=name == "psnr", rank_zero_only=True)


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
