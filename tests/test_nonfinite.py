"""Training fails loudly: a NaN batch or a runaway learning rate stops the run at that step,
before the optimizer step, and the checkpoints written so far stay finite."""
import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from models.ddpm_conditioned import ConditionDDPM
from orchestration.callbacks import NonFiniteGuard
from synthetic import tiny_model_cfg


def batches(n=12, nan_at=None):
    g = torch.Generator().manual_seed(0)
    items = []
    for i in range(n):
        x = torch.rand(1, 16, 16, generator=g) * 2 - 1
        cond = x.clone()
        if i == nan_at:
            cond[0, 3, 3] = float("nan")
        items.append({"x_prior": x, "x_cond": cond})
    return DataLoader(items, batch_size=1)


def fit(tmp_path, loader, **model_kw):
    torch.manual_seed(0)
    model = ConditionDDPM(**{**tiny_model_cfg()["params"], **model_kw})
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=2, save_top_k=-1)
    trainer = pl.Trainer(max_steps=12, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         accelerator="cpu", callbacks=[NonFiniteGuard(), ckpt], default_root_dir=str(tmp_path))
    return model, trainer


def test_a_nan_pixel_stops_training_at_its_step(tmp_path):
    model, trainer = fit(tmp_path, None)
    with pytest.raises(FloatingPointError, match="non-finite gradient at step 5"):
        trainer.fit(model, train_dataloaders=batches(nan_at=5))
    assert trainer.global_step == 5  # the bad step was not taken
    assert all(torch.isfinite(p).all() for p in model.parameters())
    saved = sorted((tmp_path / "ckpt").glob("*.ckpt"))
    assert saved, "the checkpoints written before the NaN are kept"
    for path in saved:
        state = torch.load(path, weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_a_runaway_learning_rate_stops_training(tmp_path):
    model, trainer = fit(tmp_path, None, learning_rate=1e30)
    with pytest.raises(FloatingPointError, match="non-finite (gradient|loss) at step"):
        trainer.fit(model, train_dataloaders=batches())
    assert trainer.global_step < 12


def test_finite_training_is_untouched(tmp_path):
    model, trainer = fit(tmp_path, None)
    trainer.fit(model, train_dataloaders=batches())
    assert trainer.global_step == 12
