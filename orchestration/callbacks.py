"""Lightning callbacks of this project: image rows to the experiment logger, a stop on NaN."""
from __future__ import annotations

import lightning.pytorch as pl
import torch


class ImageLogger(pl.Callback):
    """Every ``every_n_steps`` optimizer steps, log ``pl_module.log_images(batch)`` rows.

    Each named row (B, 1, H, W) in [-1, 1] becomes one image strip mapped to [0, 1];
    rows go to wandb when a WandbLogger is active and are skipped otherwise.
    """

    def __init__(self, every_n_steps: int = 500, n: int = 4, steps: int = 20):
        super().__init__()
        self.every_n_steps, self.n, self.steps = every_n_steps, n, steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if self.every_n_steps <= 0 or step == 0 or step % self.every_n_steps or not trainer.is_global_zero:
            return
        log_image = getattr(trainer.logger, "log_image", None)
        if log_image is None or not hasattr(pl_module, "log_images"):
            return
        was_training = pl_module.training
        pl_module.eval()
        rows = pl_module.log_images(batch, n=self.n, steps=self.steps)
        pl_module.train(was_training)
        for name, row in rows.items():
            strip = torch.cat(list(((row.float().clamp(-1, 1) + 1) / 2).cpu()), dim=-1)
            log_image(key=f"images/{name}", images=[strip], step=step)


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
