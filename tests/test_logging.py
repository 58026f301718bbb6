"""What a run logs, and where: the logger chosen by ``logging.logger`` (csv, tensorboard,
wandb offline without a single network connection), training images/s per logging
interval, and the git commit of the code in ``<run>/run_info.yaml`` and in the logged
hyper-parameters. Every training here is a few steps of a tiny model on one synthetic
volume (seconds on CPU)."""
import csv
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from orchestration.callbacks import TrainingSpeed
from orchestration.config_checks import check_run_config
from orchestration.run_info import code_version
from synthetic import make_volume, tiny_model_cfg
from utils.initialize_configs import ConfigError
from utils.paths import REPO_ROOT

DATAMODULE = "diffusion_modules.diffusion_utils.datamodule.DenoisingDataModule"


def tiny_run_cfg(tmp_path: Path, logger: str, **logging) -> dict:
    """4 optimizer steps (batch 4) on one 20-slice CT volume, logged every 2 steps, validated
    after steps 2 and 4; no evaluation section."""
    volume = make_volume(tmp_path / "vol_ct.nii.gz", "ct")
    model = tiny_model_cfg()
    model["params"].update(warmup_steps=1)
    return {
        "seed": 0, "model": model,
        "data": {"target": DATAMODULE, "params": {
            "volumes": [{"path": str(volume), "modality": "ct", "name": "vol"}],
            "cache_dir": str(tmp_path / "cache"), "image_size": 16, "stride": 16, "batch_size": 4}},
        "trainer": {"max_steps": 4, "accelerator": "cpu", "val_check_interval": 2, "limit_val_batches": 1,
                    "log_every_n_steps": 2, "num_sanity_val_steps": 0, "enable_progress_bar": False,
                    "enable_model_summary": False},
        "sampling": {"steps": 2, "t_start": "auto"},  # val/psnr, val/ssim: 2 DDIM steps from t*
        "logging": {"logger": logger, "save_dir": str(tmp_path / "runs"), "name": "tiny", **logging},
    }


def run(cfg: dict) -> Path:
    from orchestration.run_job import run_job

    return run_job(OmegaConf.create(cfg))["run_dir"]


def git(*args) -> str:
    return subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True,
                          check=True).stdout.strip()


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize("value", ["tb", "mlflow", "WandB"])
def test_an_unknown_logger_is_refused_naming_the_key_and_the_choices(tmp_path, value):
    cfg = tiny_run_cfg(tmp_path, value)
    with pytest.raises(ConfigError, match=rf"logging\.logger: '{value}' is not one of wandb, tensorboard, csv"):
        check_run_config(cfg)
    from orchestration.training import build_logger  # the same refusal without the config check

    with pytest.raises(ConfigError, match=r"logging\.logger: .* is not one of wandb, tensorboard, csv"):
        build_logger(OmegaConf.create(cfg), tmp_path)


def test_the_old_wandb_key_says_what_replaced_it(tmp_path):
    cfg = tiny_run_cfg(tmp_path, "csv")
    cfg["logging"]["wandb"] = False
    with pytest.raises(ConfigError, match=r"logging\.wandb: replaced by logging\.logger"):
        check_run_config(cfg)


# ----------------------------------------------------------------------------- csv: metrics and run info
def test_csv_run_logs_images_per_second_and_the_git_commit(tmp_path):
    run_dir = run(tiny_run_cfg(tmp_path, "csv"))
    version = run_dir / "csv" / "version_0"
    with open(version / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    columns = set(rows[0])
    for column in ("train/loss", "lr-AdamW", "val/loss_ema", "val/psnr", "val/ssim",
                   "train/images_per_sec"):
        assert column in columns, (column, sorted(columns))
    assert "train/gpu_mem_peak_gib" not in columns  # CUDA only
    speeds = [float(r["train/images_per_sec"]) for r in rows if r["train/images_per_sec"]]
    assert len(speeds) == 2, rows  # one per logging interval: steps 2 and 4
    assert all(math.isfinite(s) and s > 0 for s in speeds), speeds

    # the git commit: in the run folder and in the logged hyper-parameters
    info = yaml.safe_load((run_dir / "run_info.yaml").read_text())
    expected = code_version()
    assert info["git_commit"] == expected["git_commit"] and info["git_dirty"] == expected["git_dirty"]
    if info["git_commit"] != "unknown":  # a checkout git can read: the same answers as git itself
        assert info["git_commit"] == git("rev-parse", "HEAD")
        assert info["git_dirty"] is bool(git("status", "--porcelain"))
    for key in ("started", "python", "torch", "lightning"):
        assert info[key], key
    hparams = yaml.safe_load((version / "hparams.yaml").read_text())
    assert hparams["run_info"]["git_commit"] == info["git_commit"]
    assert hparams["logging"]["logger"] == "csv"
    # the saved config stays a loadable run config (run_info is a file of its own)
    from utils.initialize_configs import load_config

    check_run_config(load_config(run_dir / "config.yaml"))


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_run_logs_peak_gpu_memory(tmp_path):
    cfg = tiny_run_cfg(tmp_path, "csv")
    cfg["trainer"].update(accelerator="gpu", devices=1)
    run_dir = run(cfg)
    with open(run_dir / "csv" / "version_0" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    peaks = [float(r["train/gpu_mem_peak_gib"]) for r in rows if r.get("train/gpu_mem_peak_gib")]
    assert len(peaks) == 2 and all(0 < p < 80 for p in peaks), peaks  # GiB: the tiny model needs a few MiB


def test_code_version_outside_a_checkout_is_unknown(tmp_path):
    assert code_version(tmp_path) == {"git_commit": "unknown", "git_dirty": None}
    # a folder inside a checkout is not the checkout's top: the code's own commit only
    (tmp_path / "inner").mkdir()
    if shutil.which("git"):
        subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
        assert code_version(tmp_path / "inner")["git_commit"] == "unknown"


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_code_version_marks_a_dirty_tree(tmp_path):
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}

    def g(*args):
        return subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True, text=True,
                              env=env).stdout.strip()

    g("init", "-q")
    assert code_version(tmp_path)["git_commit"] == "unknown"  # no commit yet
    (tmp_path / "a.py").write_text("x = 1\n")
    g("add", "a.py")
    g("commit", "-q", "-m", "one")
    assert code_version(tmp_path) == {"git_commit": g("rev-parse", "HEAD"), "git_dirty": False}
    (tmp_path / "a.py").write_text("x = 2\n")
    assert code_version(tmp_path) == {"git_commit": g("rev-parse", "HEAD"), "git_dirty": True}
    g("checkout", "-q", "a.py")
    (tmp_path / "new.py").write_text("")  # an untracked source file makes it dirty too
    assert code_version(tmp_path)["git_dirty"] is True


# ----------------------------------------------------------------------------- tensorboard
def test_tensorboard_run_writes_scalars_images_and_hparams(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = run(tiny_run_cfg(tmp_path, "tensorboard", image_every_n_steps=2))
    events = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1, list((run_dir / "tensorboard").iterdir())
    acc = EventAccumulator(str(events[0]), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    scalars, images = set(acc.Tags()["scalars"]), set(acc.Tags()["images"])
    assert {"train/loss", "train/images_per_sec", "val/loss_ema", "val/psnr", "val/ssim"} <= scalars, scalars
    assert all(e.value > 0 for e in acc.Scalars("train/images_per_sec"))
    assert {"images/inputs", "images/conditioning", "images/denoised_matched_start", "images/samples"} <= images, images
    hparams = yaml.safe_load((run_dir / "tensorboard" / "hparams.yaml").read_text())
    assert hparams["run_info"]["git_commit"] == code_version()["git_commit"]


# ----------------------------------------------------------------------------- wandb offline, no network
class Recorder:
    """A listening socket on 127.0.0.1 that records the first bytes of every connection."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.seen: list[bytes] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                try:
                    self.seen.append(conn.recv(200) or b"<connected>")
                except OSError:
                    self.seen.append(b"<connected>")

    def close(self):
        self.sock.close()


CHILD = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
seen = []
def audit(event, args):  # every socket connect and name lookup of this Python process
    if event == "socket.connect":
        address = args[1]
        host = address[0] if isinstance(address, tuple) else str(address)
        if isinstance(address, tuple) and not (host.startswith("127.") or host in ("::1", "localhost")):
            seen.append(f"connect {address}")
    elif event == "socket.getaddrinfo" and args[0] not in (None, "localhost", "127.0.0.1", "::1", b"localhost"):
        seen.append(f"getaddrinfo {args[0]}")
sys.addaudithook(audit)
from omegaconf import OmegaConf
from orchestration.run_job import run_job
run_dir = run_job(OmegaConf.create(json.loads(sys.argv[2])))["run_dir"]
print("RUN_DIR", run_dir)
print("AUDIT", json.dumps(seen))
sys.stdout.flush()
# positive control: a request that honours the proxy variables reaches the recorder
import urllib.request
try:
    urllib.request.urlopen("http://cdm4mi-control.invalid/probe", timeout=5)
except Exception:
    pass
"""


def test_wandb_offline_writes_its_files_and_opens_no_connection(tmp_path):
    pytest.importorskip("wandb")
    api, proxy = Recorder(), Recorder()
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(("WANDB_", "NO_PROXY"))}
    env.update({"WANDB_BASE_URL": api.url, "HTTP_PROXY": proxy.url, "HTTPS_PROXY": proxy.url,
                "http_proxy": proxy.url, "https_proxy": proxy.url, "ALL_PROXY": proxy.url,
                "WANDB_CONFIG_DIR": str(tmp_path / "wandb_config"), "WANDB_CACHE_DIR": str(tmp_path / "wandb_cache"),
                "WANDB_DATA_DIR": str(tmp_path / "wandb_data"), "OMP_NUM_THREADS": "1"})
    # WANDB_MODE is removed above: offline must come from the config (wandb_sync: false)
    cfg = tiny_run_cfg(tmp_path, "wandb", wandb_sync=False, project="cdm4mi-test")
    try:
        done = subprocess.run([sys.executable, "-c", CHILD, str(REPO_ROOT), json.dumps(cfg)], env=env,
                              capture_output=True, text=True, timeout=600, cwd=tmp_path)
    finally:
        api.close()
        proxy.close()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines() if line.startswith(("RUN_DIR", "AUDIT")))
    assert json.loads(lines["AUDIT"]) == []  # no connect / name lookup off this machine from Python
    assert api.seen == []  # nothing went to the wandb server address
    # the proxy saw exactly the control request, so a request through HTTP(S)_PROXY would have shown
    assert len(proxy.seen) == 1 and b"cdm4mi-control.invalid" in proxy.seen[0], proxy.seen

    run_dir = Path(lines["RUN_DIR"])
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1, list((run_dir / "wandb").iterdir())
    stores = list(offline[0].glob("run-*.wandb"))
    assert len(stores) == 1 and stores[0].stat().st_size > 0
    data = stores[0].read_bytes()
    for needle in (b"train/loss", b"train/images_per_sec", b"git_commit"):
        assert needle in data, needle
    assert not list((run_dir / "wandb").glob("run-*"))  # no online run folder


def test_peak_gpu_memory_is_per_interval_with_mocked_cuda(monkeypatch):
    """On CPU, with torch.cuda's counters mocked: a 10 GiB peak in the first logging interval
    does not show in the second one (the callback resets the peak at each logged step)."""
    mem = {"now": 0, "peak": 0}
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: mem.update(peak=mem["now"]))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: mem["peak"])
    logged = []
    module = SimpleNamespace(device=torch.device("cuda", 0),
                             log=lambda name, value, **kw: logged.append((name, value)))
    trainer = SimpleNamespace(global_step=0, log_every_n_steps=1, should_stop=False, world_size=1)
    cb = TrainingSpeed()
    cb.on_train_start(trainer, module)
    for step, gib in enumerate([10, 1], start=1):
        mem["peak"] = max(mem["peak"], gib * 2 ** 30)  # the step's activations, freed after it
        trainer.global_step = step
        cb.on_train_batch_end(trainer, module, None, torch.zeros(4, 1, 8, 8), step - 1)
    peaks = [v for name, v in logged if name == "train/gpu_mem_peak_gib"]
    assert peaks == [10, 1]
