"""Lightning's DDP on CPU (gloo): two processes see different batches, and after every
optimizer step their UNet and EMA weights agree."""
import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from models.ddpm_conditioned import ConditionDDPM
from synthetic import tiny_model_cfg


class CheckedAcrossRanks(ConditionDDPM):
    """Compares the weights and the batch of every rank after each training step."""

    def on_train_batch_end(self, outputs, batch, batch_idx):
        weights = torch.cat([p.detach().flatten() for p in (*self.unet.parameters(), *self.unet_ema.parameters())])
        seen = self.all_gather(torch.stack([weights.sum(), weights.abs().sum(), batch["x_prior"].sum()]))
        assert seen.shape[0] == 2, seen.shape
        assert torch.equal(seen[0, :2], seen[1, :2]), f"rank weights differ after step {self.global_step}"
        assert not torch.equal(seen[0, 2], seen[1, 2]), "both ranks got the same batch: not data-parallel"
        assert int(self.ema_updates) == self.global_step


def test_two_gloo_processes_keep_identical_weights(tmp_path):
    g = torch.Generator().manual_seed(0)
    items = [{"x_prior": torch.rand(1, 16, 16, generator=g) * 2 - 1, "x_cond": torch.rand(1, 16, 16, generator=g) * 2 - 1}
             for _ in range(32)]
    torch.manual_seed(0)
    model = CheckedAcrossRanks(**tiny_model_cfg()["params"])
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=str(tmp_path))
    trainer.fit(model, train_dataloaders=DataLoader(items, batch_size=4))
    # ddp_spawn copies the trained weights back to this process
    assert int(model.ema_updates) == 3
