"""Exact resume after a crash (orchestration/resume.py, diffusion_utils/resumable.py).

A real CPU run of run_scripts/dm4mi-conditional.py is killed with SIGKILL after its first
periodic checkpoint and resumed with --resume: its final UNet and EMA weights, EMA update
count and step equal those of an uninterrupted run of the same length and seed, and two
uninterrupted runs agree. A run that crashes right after the checkpoint at the end of its
first epoch, with two DataLoader workers, resumes to the same weights too. Checkpoints are
written atomically, and temporaries of a killed run are removed by the next one.
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from omegaconf import OmegaConf

from synthetic import load_script, make_volume

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "run_scripts" / "configs" / "ddpm-cond" / "bundled_ct_mr.yaml"
MAX_STEPS = 12
# one 40x36x16 CT volume: 32 training patches of 16x16, 8 batches of 4 an epoch, so the
# 12 steps cross an epoch boundary; checkpoints at steps 4 (mid-epoch), 8 (end of epoch 0), 12
OVERRIDES = [
    "model.params.image_size=16", "model.params.timesteps=50", "model.params.max_train_timestep=null",
    "model.params.warmup_steps=2", "sampling.steps=2",
    "model.params.unet_rosinality_config.params.channel=8",
    "model.params.unet_rosinality_config.params.channel_multiplier=[1,2]",
    "data.params.image_size=16", "data.params.stride=24", "data.params.batch_size=4", "data.params.split.gap=2",
    f"trainer.max_steps={MAX_STEPS}", "trainer.val_check_interval=3", "trainer.limit_val_batches=1",
    "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1",
    "logging.checkpoint_every_n_steps=4", "logging.logger=csv", "evaluation.enabled=false",
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Every run on one thread, as the killed subprocess (OMP_NUM_THREADS=1): the number of
    threads changes the order of float sums, and so the weights in their last bits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    cfg = OmegaConf.load(BUNDLED)
    cfg.data.params.volumes = [{"path": str(make_volume(tmp / "head_ct.nii.gz", "ct", n_slices=16)),
                                "modality": "ct", "name": "head_ct"}]
    cfg.data.params.cache_dir = str(tmp / "cache")
    cfg.logging.save_dir = str(tmp / "runs")
    OmegaConf.save(cfg, tmp / "run.yaml")
    script = load_script("dm4mi-conditional.py")
    reference = run(script, tmp, "reference")
    return {"tmp": tmp, "script": script, "reference": reference}


def args(tmp: Path, name: str, *extra: str) -> list[str]:
    return ["--config", str(tmp / "run.yaml"), *OVERRIDES, f"logging.name={name}", *extra]


def last_ckpt(tmp: Path, name: str) -> Path:
    runs = sorted((tmp / "runs").glob(f"{name}-*"))
    assert len(runs) == 1, runs
    return runs[0] / "checkpoints" / "last.ckpt"


def run(script, tmp: Path, name: str, *extra: str, resume: Path | None = None) -> dict:
    """One in-process run of dm4mi-conditional.py; its final checkpoint, loaded weights-only."""
    resume_args = ["--resume", str(resume)] if resume else []
    assert script.main([*resume_args, *args(tmp, name, *extra)]) == 0
    return torch.load(last_ckpt(tmp, name), map_location="cpu", weights_only=True)


def assert_same_training(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"] == MAX_STEPS
    sa, sb = a["state_dict"], b["state_dict"]
    assert int(sa["ema_updates"]) == int(sb["ema_updates"]) == MAX_STEPS
    keys = [k for k in sa if k.startswith(("unet.", "unet_ema."))]
    assert keys and sorted(keys) == sorted(k for k in sb if k.startswith(("unet.", "unet_ema.")))
    for k in keys:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


def test_two_uninterrupted_runs_agree(setup):
    again = run(setup["script"], setup["tmp"], "again")
    assert_same_training(setup["reference"], again)
    assert "rng_states" in again and again["loops"]["fit_loop"]["state_dict"]["combined_loader"]


def test_sigkilled_run_resumes_to_the_uninterrupted_weights(setup):
    from utils.atomic import temp_prefix

    tmp = setup["tmp"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "run_scripts" / "dm4mi-conditional.py"), *args(tmp, "killed")],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    try:
        while not list((tmp / "runs").glob("killed-*/checkpoints/last.ckpt")):
            assert proc.poll() is None, f"the run ended before a checkpoint: {proc.stderr.read().decode()[-2000:]}"
            assert time.time() < deadline, "no checkpoint after 300 s"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run was not killed (exit status {proc.returncode}): it ended first"
    ckpt = last_ckpt(tmp, "killed")
    killed_at = torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]  # loadable
    assert killed_at in (4, 8), killed_at
    # what a write cut off by the kill leaves: a temporary named after the dead process;
    # one of a live process (this one) is left alone
    stale = ckpt.parent / f"{temp_prefix(proc.pid)}abcdefgh.ckpt"
    live = ckpt.parent / f"{temp_prefix()}abcdefgh.ckpt"
    stale.write_bytes(b"partial")
    live.write_bytes(b"being written")
    resumed = run(setup["script"], tmp, "resumed", resume=ckpt)
    assert_same_training(setup["reference"], resumed)
    assert not stale.exists() and live.exists()


class CrashAfterStep(pl.Callback):
    """Raises at the start of the batch after optimizer step ``step`` (its checkpoint is written)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError(f"simulated crash after step {self.step}")


def test_crash_at_an_epoch_end_with_workers_resumes_to_the_same_weights(setup, monkeypatch):
    """Two DataLoader workers (noise and augmentation are drawn per item, not per worker)
    and a checkpoint at the end of epoch 0: the resumed run still ends on the reference weights."""
    import orchestration.training as training

    build = training.build_trainer

    def crashing(cfg, run_dir):
        trainer = build(cfg, run_dir)
        trainer.callbacks.append(CrashAfterStep(8))
        return trainer

    tmp, workers = setup["tmp"], "data.params.num_workers=2"
    monkeypatch.setattr(training, "build_trainer", crashing)
    with pytest.raises(RuntimeError, match="simulated crash after step 8"):
        setup["script"].main(args(tmp, "crashed", workers))
    monkeypatch.setattr(training, "build_trainer", build)
    ckpt = last_ckpt(tmp, "crashed")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["global_step"] == 8 and state["epoch"] == 0
    assert_same_training(setup["reference"], run(setup["script"], tmp, "crash_resumed", workers, resume=ckpt))


# ----------------------------------------------------------------------------- the loader alone
def test_loader_state_continues_the_epoch_and_the_next():
    from diffusion_modules.diffusion_utils.resumable import ResumableLoader, ResumableSampler

    class Items(torch.utils.data.Dataset):  # item index of a key (index, seed, epoch)
        def __len__(self):
            return 10

        def __getitem__(self, key):
            return key[0]

    data = Items()

    def loader():
        return ResumableLoader(data, batch_size=3, sampler=ResumableSampler(data, seed=5))

    def keys(batches):
        return [tuple(int(v) for v in b) for b in batches]

    whole = loader()
    epoch0 = list(whole)
    whole.sampler.set_epoch(1)
    epoch1 = list(whole)
    assert sorted(int(v) for b in epoch0 for v in b) == list(range(10)) and keys(epoch0) != keys(epoch1)
    first = loader()
    it = iter(first)
    seen = [next(it), next(it)]
    state = first.state_dict()
    assert state == {"epoch": 0, "batches": 2, "batch_size": 3}
    again = loader()
    again.load_state_dict(state)
    assert keys(seen + list(again)) == keys(epoch0)
    assert again.state_dict() == {"epoch": 1, "batches": 0, "batch_size": 3}  # a finished epoch: the next
    again.load_state_dict(again.state_dict())
    assert keys(again) == keys(epoch1)


def test_training_reads_follow_seed_epoch_and_item(tmp_path):
    """A keyed read (index, seed, epoch) gives the same noise in any process or worker and
    other noise for another seed or epoch."""
    from diffusion_modules.diffusion_utils.datamodule import DenoisingDataModule

    dm = DenoisingDataModule([str(make_volume(tmp_path / "head_ct.nii.gz", "ct", n_slices=16))],
                             cache_dir=str(tmp_path / "cache"), image_size=16, stride=24, augment=True,
                             split={"mode": "slab", "fractions": [0.7, 0.15, 0.15], "gap": 2})
    dm.setup()
    ds = dm.train_set

    def cond(*key):
        return ds[key]["x_cond"]

    assert torch.equal(cond(3, 0, 1), cond(3, 0, 1))
    assert not torch.equal(cond(3, 0, 1), cond(3, 0, 2)) and not torch.equal(cond(3, 0, 1), cond(3, 1, 1))
    dm.train_seed = 7
    one = torch.cat([b["x_cond"] for b in dm.train_dataloader()])
    dm.num_workers = 2
    two = torch.cat([b["x_cond"] for b in dm.train_dataloader()])
    assert torch.equal(one, two)


# ----------------------------------------------------------------------------- atomic checkpoints
def test_a_checkpoint_write_failing_midway_keeps_the_previous_one(tmp_path, monkeypatch):
    from orchestration.resume import AtomicCheckpointIO

    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 4, "w": torch.ones(1000)}, path)
    real_save = torch.save

    def disk_full(obj, f):  # half the bytes reach the file, then the write fails
        real_save(obj, f)
        data = Path(f).read_bytes()
        Path(f).write_bytes(data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"global_step": 8, "w": torch.zeros(1000)}, path)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary left
    assert torch.load(path, weights_only=True)["global_step"] == 4


KILLED_WRITER = """
import os, signal, sys, torch
sys.path.insert(0, sys.argv[1])
from orchestration.resume import AtomicCheckpointIO

class KillHere:  # pickled in the middle of the checkpoint
    def __reduce__(self):
        os.kill(os.getpid(), signal.SIGKILL)

AtomicCheckpointIO().save_checkpoint({"global_step": 8, "w": torch.zeros(10000), "x": KillHere()}, sys.argv[2])
"""


def test_a_checkpoint_write_killed_midway_keeps_the_previous_one_and_its_temporary_is_removed(tmp_path):
    from orchestration.resume import AtomicCheckpointIO
    from utils.atomic import remove_stale_temporaries

    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 4}, path)
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(ROOT), str(path)], capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert torch.load(path, weights_only=True)["global_step"] == 4
    left = [p for p in tmp_path.iterdir() if p != path]
    assert len(left) == 1 and left[0].name.startswith(".tmp-"), left  # the killed writer's
    assert remove_stale_temporaries(tmp_path) == left and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
