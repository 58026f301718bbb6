"""The device check of issue 18, run by ``run_scripts/gpu_check.sh [--dry-run] OUT_DIR``.

On one CUDA GPU, in at most 8 minutes, with no network (a CUDA PyTorch with Lightning and the
wheels of ../shared/gpu/wheels.sh): the CUDA-only tests, the benchmark table (the 15.7 M
reference UNet against diffusers' UNet2DModel: eager rows, then compiled and CUDA-graph rows),
denoise.py on a bundled CT volume with added noise in float32 and with the faster options
(PSNR of each against the clean volume and the difference to float32), a 2-minute training of
the default config and a smoke run of the study. Each stage runs as a subprocess with its own
time limit (a stage that overruns is stopped and reported, the next one starts); the whole
check keeps a deadline. It writes ``report.md`` (the results), ``benchmark.md`` and ``logs.txt``
(every stage's output, each cut to its last 256 KB) into OUT_DIR, prints the report and exits 0
when every stage passed, 1 otherwise, 2 without a usable CUDA device.

``--dry-run``: the same stages on the CPU with tiny sizes (about a minute on 2 cores), run by
tests/test_gpu_check.py so that the script cannot rot between GPU runs.
"""
from __future__ import annotations

import argparse
import csv
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "run_scripts"
CKPT = ROOT / "pretrained" / "cdm4mi_bundled_ct_mr.ckpt"
REFERENCE = SCRIPTS / "configs" / "ddpm-cond" / "exp01_brain_1BA001_ct_config.yaml"
DEFAULT = SCRIPTS / "configs" / "ddpm-cond" / "bundled_ct_mr.yaml"
CT = SCRIPTS / "data" / "ct_cranium.nii.gz"
#: tests that need CUDA (skipped on a CPU); test_gpu_check.py itself is not one of them
CUDA_TESTS = ["tests/test_gpu_cuda.py", "tests/test_gpu_training.py", "tests/test_unet.py", "tests/test_checkpoint.py",
              "tests/test_logging.py"]
DEADLINE_S = 470  # of the 480 s allowed; the stages' limits are cut to what is left
LOG_TAIL = 256 * 1024
SIGMA = 0.05  # noise added to the CT volume, [0,1] scale (205 HU)


def run(cmd: list[str], log: Path, limit: float, env: dict) -> dict:
    """Run ``cmd`` from the repository root with stdout and stderr to ``log``, stopped (its
    whole process group) after ``limit`` seconds. {rc, seconds, timed_out, out}."""
    start = time.time()
    with open(log, "w") as f:
        f.write(f"$ {' '.join(map(str, cmd))}\n")
        f.flush()
        proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc, timed_out = proc.wait(timeout=max(1.0, limit)), False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc, timed_out = proc.wait(), True
    return {"rc": rc, "seconds": time.time() - start, "timed_out": timed_out,
            "out": log.read_text(errors="replace")}


class Check:
    """The stages, their results and the report."""

    def __init__(self, out_dir: Path, work: Path, dry_run: bool, python: str):
        self.out_dir, self.work, self.dry, self.python = out_dir, work, dry_run, python
        self.device = "cpu" if dry_run else "cuda"
        self.start = time.time()
        self.results, self.sections = [], []
        self.env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
        paths = [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        self.env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))

    def left(self) -> float:
        return (2 * DEADLINE_S if self.dry else DEADLINE_S) - (time.time() - self.start)  # a shared CPU is slow

    def stage(self, name: str, cmd: list[str], budget: float, minimum: float = 10.0) -> dict | None:
        """Run one command within min(budget, time left); None (and a 'skipped' row) when
        less than ``minimum`` seconds are left."""
        limit = min(budget, self.left())
        if limit < minimum:
            self.results.append((name, "skipped: no time left", 0.0))
            return None
        result = run(cmd, self.work / f"{len(self.results):02d}_{name.split()[0]}.log", limit, self.env)
        status = ("ok" if result["rc"] == 0 else f"timed out after {limit:.0f} s" if result["timed_out"]
                  else f"failed (exit status {result['rc']})")
        self.results.append((name, status, result["seconds"]))
        return result

    # ------------------------------------------------------------------ stages
    def cuda_tests(self) -> None:
        try:
            import pytest  # noqa: F401
        except ImportError:
            self.results.append(("CUDA tests", "skipped: pytest is not installed (put its wheels, with pluggy and "
                                 "iniconfig, into the wheel folder)", 0.0))
            return
        r = self.stage("CUDA tests", [self.python, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *CUDA_TESTS,
                                      "-k", "cuda or on_gpu"], budget=40)
        if r:
            summary = [line for line in r["out"].splitlines() if " passed" in line or " failed" in line
                       or " skipped" in line or "error" in line.lower()]
            self.sections.append(("CUDA tests", f"`pytest {' '.join(CUDA_TESTS)} -k 'cuda or on_gpu'`: "
                                  f"{summary[-1].strip('= ') if summary else 'no summary line'}"))

    def benchmark(self) -> None:
        """The eager rows first (kept whatever happens later); the compiled rows last, with the
        time that is left: ``more_benchmarks``."""
        bench = [self.python, SCRIPTS / "benchmark.py", "--device", self.device]
        if self.dry:
            runs = [("benchmark (eager)", [*bench, "--config", DEFAULT, "--peer", "--sizes", "16", "--options", "fp32",
                                           "bf16+cl+fused", "--denoise-options", "fp32", "bf16", "--batch-size", "2",
                                           "--steps", "1", "--slice-size", "32", "--nfe", "2"], 60),
                    ("benchmark (denoise(), model)", [*bench, "--config", DEFAULT, "--options", "--denoise-options",
                                                      "bf16+cl", "--slice-size", "32", "sampling.steps=2"], 40)]
        else:
            import torch

            name = torch.cuda.get_device_name(0)
            peak = ["--peak-tflops", "989"] if ("H100" in name or "H200" in name) else []
            ref = [*bench, "--config", REFERENCE, "--steps", "5"]
            runs = [("benchmark (eager)", [*ref, "--peer", *peak, "--sizes", "64", "256", "--options", "fp32", "bf16",
                                           "bf16+cl+fused", "--denoise-options", "fp32", "bf16", "bf16+cl"], 80),
                    ("benchmark (compiled denoise(), model)", [*ref, "--options", "--denoise-options", "bf16+cl+compile",
                                                               "bf16+cl+graphs"], 90),  # its sampling: 10 steps from t*
                    ("benchmark (compiled, against the peer)", [*ref, "--peer", *peak, "--sizes", "256", "--options",
                                                                "bf16+cl+fused+compile", "--denoise-options",
                                                                "bf16+cl+graphs"], 120)]
        self.pending_benchmarks = runs[1:]
        self._bench(*runs[0])

    def _bench(self, name: str, cmd: list, budget: float) -> None:
        r = self.stage(name, cmd, budget, minimum=30)
        if r:  # the rows measured until it ended (benchmark.py prints each as it comes)
            rows = []
            for line in r["out"].splitlines()[1:]:
                if line.startswith(("Training", "Denoising")):
                    rows += ["", line, ""]
                elif line.startswith(("|", "device", "ours", "UNet")):
                    rows.append(line)
            self.sections.append((name, "\n".join(rows).strip() or "no rows"))

    def more_benchmarks(self) -> None:
        for run_args in getattr(self, "pending_benchmarks", []):
            self._bench(*run_args)

    def denoise(self) -> None:
        import nibabel as nib

        img = nib.load(str(CT))
        clean = np.asarray(img.dataobj, dtype=np.float32)
        if self.dry:
            clean = clean[96:160, 96:160, 22:25]
        noisy = clean + np.random.default_rng(0).normal(0.0, SIGMA * 4095.0, clean.shape).astype(np.float32)
        nib.save(nib.Nifti1Image(noisy, img.affine), str(self.work / "ct_noisy.nii.gz"))
        body = clean > -500  # tissue and bone, HU
        to01 = lambda hu: np.clip((hu + 1024.0) / 4095.0, 0.0, 1.0)  # the CT window, utils.intensity
        options = (["fp32", "bf16"] if self.dry else ["fp32", "bf16+cl", "bf16+cl+graphs"])
        flags = {"bf16": ["--precision", "bf16"], "cl": ["--channels-last"], "compile": ["--compile"],
                 "graphs": ["--cuda-graphs"], "fp32": []}
        rows, budget = [], 120 if self.dry else 75
        for opt in options:
            out = self.work / f"ct_{opt.replace('+', '_')}.nii.gz"
            cmd = [self.python, SCRIPTS / "denoise.py", "--ckpt", CKPT, "--input", self.work / "ct_noisy.nii.gz",
                   "--output", out, "--device", self.device, "--sigma", str(SIGMA), "--modality", "ct",
                   "--steps", "10", "--batch-size", "16", *[f for token in opt.split("+") for f in flags[token]]]
            r = self.stage(f"denoise.py {opt}", cmd, budget - sum(row[2] for row in rows), minimum=10)
            if not r or r["rc"]:
                rows.append((opt, None, r["seconds"] if r else 0.0, None))
                continue
            said = re.findall(r"slices.* in ([0-9.]+) s; wrote", r["out"])
            inner = float(said[-1]) if said else float("nan")
            den = np.asarray(nib.load(str(out)).dataobj, dtype=np.float32)
            mse = float(np.mean((to01(den[body]) - to01(clean[body])) ** 2))
            rows.append((opt, 10 * np.log10(1.0 / mse), r["seconds"], inner))
        noisy_mse = float(np.mean((to01(noisy[body]) - to01(clean[body])) ** 2))
        ref = rows[0][1] if rows and rows[0][1] is not None else None
        timed = [row for row in rows[1:] if row[1] is not None]
        fastest = min(timed, key=lambda row: row[3])[0] if timed else "none"
        lines = [f"Bundled CT {clean.shape[0]} x {clean.shape[1]} x {clean.shape[2]} with Gaussian noise sigma "
                 f"{SIGMA} ([0,1] scale, {SIGMA * 4095:.0f} HU; body PSNR of the noisy input "
                 f"{10 * np.log10(1.0 / noisy_mse):.2f} dB), shipped model, 10 DDIM steps, batch 16, "
                 f"--device {self.device}. Fastest option by denoise.py's own time: {fastest}.", "",
                 "| options | body PSNR dB | difference to fp32 dB | denoise.py s (its own count) | "
                 "process s (with start-up) |", "| --- | --- | --- | --- | --- |"]
        for opt, psnr, seconds, inner in rows:
            if psnr is None:
                lines.append(f"| {opt} | failed | | | {seconds:.1f} |")
                continue
            diff = f"{psnr - ref:+.3f}" if ref is not None else "n/a"
            lines.append(f"| {opt} | {psnr:.3f} | {diff} | {inner:.1f} | {seconds:.1f} |")
        self.sections.append(("denoise.py", "\n".join(lines)))

    def training(self) -> None:
        common = [f"data.params.cache_dir={self.work / 'cache'}", f"logging.save_dir={self.work / 'runs'}",
                  "logging.logger=csv", "logging.name=gpu_check", "logging.checkpoint_every_n_steps=100000",
                  "evaluation.enabled=false", "trainer.enable_progress_bar=false"]
        if self.dry:
            extra = ["trainer.max_steps=2", "trainer.accelerator=cpu", "trainer.val_check_interval=2",
                     "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1", "data.params.batch_size=4"]
        else:
            extra = ["trainer.max_steps=1000000", "trainer.max_time=00:00:02:00", "trainer.val_check_interval=2000",
                     "trainer.limit_val_batches=2", "trainer.log_every_n_steps=50", "trainer.precision=bf16-mixed",
                     "data.params.batch_size=128", "data.params.num_workers=8"]
        cmd = [self.python, SCRIPTS / "dm4mi-conditional.py", "--config", DEFAULT, *common, *extra]
        r = self.stage("training (default config)", cmd, budget=60 if self.dry else 135)
        metrics = sorted((self.work / "runs").glob("gpu_check-*/csv/version_0/metrics.csv"))
        if not r or not metrics:
            return
        with open(metrics[-1], newline="") as f:
            rows = list(csv.DictReader(f))
        values = lambda key: [float(row[key]) for row in rows if row.get(key) not in (None, "")]
        speed, loss, mem = values("train/images_per_sec"), values("train/loss"), values("train/gpu_mem_peak_gib")
        steps = max((int(row["step"]) + 1 for row in rows if row.get("step")), default=0)
        text = (f"`dm4mi-conditional.py --config {DEFAULT.relative_to(ROOT)} {' '.join(extra)}`: {steps} optimizer "
                f"steps logged; images/s per logging interval: median {np.median(speed[1:] or speed):.0f}, last "
                f"{speed[-1]:.0f}" if speed else "no images/s logged")
        text += f"; last train/loss {loss[-1]:.4f}" if loss else ""
        text += f"; peak GPU memory {max(mem):.2f} GiB" if mem else ""
        self.sections.append(("training", text))

    def study(self) -> None:
        """run_scripts/configs/study/smoke_gpu.yaml, shortened to fit: its run config with this
        check's data cache, 100 training steps (2 in the dry run), one Gaussian level."""
        from omegaconf import OmegaConf

        smoke = SCRIPTS / "configs" / "study" / "smoke_gpu.yaml"
        run_cfg = self.work / "study_run.yaml"
        run_cfg.write_text(f"base: {ROOT / OmegaConf.load(smoke).run}\n"
                           f"data:\n  params:\n    cache_dir: {self.work / 'cache'}\n")
        steps = 2 if self.dry else 100
        train = [f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}", "trainer.limit_val_batches=1",
                 "trainer.enable_progress_bar=false", f"logging.checkpoint_every_n_steps={steps}"]
        train += ["model.params.unet_rosinality_config.params.channel=16"] if self.dry else [
            "trainer.precision=bf16-mixed", "data.params.batch_size=128", "data.params.num_workers=8"]
        cmd = [self.python, SCRIPTS / "study.py", "--config", smoke, "--out", self.work / "study", "--device",
               self.device, f"run={run_cfg}", f"train_overrides=[{','.join(train)}]",
               "noise=[{type: gaussian, levels: [0.1]}]"]
        if self.dry:  # no BM3D, no unseen volumes: seconds on a CPU
            cmd += ["evaluation.test_volumes=null", "references=[noisy input]",
                    'strategies=[{name: "matched start", model: concat, params: {t_start: auto}, nfe: [2]}, '
                    '{name: "matched start, bf16", model: concat, params: {t_start: auto, inference: {precision: bf16}},'
                    ' nfe: [2]}, {name: noisy input, type: noisy}]']
        r = self.stage("study smoke", cmd, budget=90 if self.dry else 80)
        scores = self.work / "study" / "gaussian" / "scores.csv"
        if r and scores.is_file():
            with open(scores, newline="") as f:
                rows = list(csv.DictReader(f))
            lines = [f"`study.py --config {smoke.relative_to(ROOT)}` with {steps} training steps, Gaussian sigma 0.1:",
                     "", "| method | slices | mean PSNR dB |", "| --- | --- | --- |"]
            for m in sorted({row["method"] for row in rows}):
                psnr = [float(row["psnr"]) for row in rows if row["method"] == m and row.get("psnr")]
                lines.append(f"| {m.replace('|', '/')} | {len(psnr)} | {np.mean(psnr):.2f} |")
            self.sections.append(("study smoke", "\n".join(lines)))

    # ------------------------------------------------------------------ report
    def environment(self) -> str:
        import torch

        lines = [f"python {sys.version.split()[0]}, torch {torch.__version__}"]
        try:
            import lightning

            lines[0] += f", lightning {lightning.__version__}"
        except ImportError:
            lines[0] += ", no lightning"
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            lines.append(f"GPU: {props.name}, {props.total_memory / 2 ** 30:.0f} GiB, CUDA {torch.version.cuda}, "
                         f"{torch.cuda.device_count()} device(s)")
        lines.append(f"CPU cores: {os.cpu_count()}; mode: {'dry run on the CPU' if self.dry else 'CUDA'}")
        git = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        lines.append(f"code: git {git.stdout.strip() if git.returncode == 0 else 'unknown (no git checkout)'}")
        return "\n".join(f"- {line}" for line in lines)

    def report(self) -> str:
        lines = ["# GPU check (run_scripts/gpu_check.sh)", "", self.environment(), "",
                 "| stage | status | seconds |", "| --- | --- | --- |"]
        lines += [f"| {name} | {status} | {seconds:.1f} |" for name, status, seconds in self.results]
        lines.append(f"| total | | {time.time() - self.start:.1f} |")
        for title, body in self.sections:
            lines += ["", f"## {title}", "", body]
        return "\n".join(lines) + "\n"

    def write(self) -> str:
        text = self.report()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "report.md").write_text(text)
        bench = [body for title, body in self.sections if title.startswith("benchmark")]
        (self.out_dir / "benchmark.md").write_text("\n\n".join(bench) + "\n")
        with open(self.out_dir / "logs.txt", "w") as f:
            for log in sorted(self.work.glob("*.log")):
                body = log.read_text(errors="replace")
                cut = f"[... first {len(body) - LOG_TAIL} characters left out ...]\n" if len(body) > LOG_TAIL else ""
                f.write(f"\n===== {log.name} =====\n{cut}{body[-LOG_TAIL:]}")
        return text

    @property
    def passed(self) -> bool:
        return all(status == "ok" or status.startswith("skipped") for _, status, _ in self.results)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="folder for report.md, benchmark.md and logs.txt")
    parser.add_argument("--dry-run", action="store_true", help="the same stages on the CPU with tiny sizes")
    parser.add_argument("--work", help="folder for the stages' files (default: a new temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args(argv)
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            print("gpu_check.sh: no usable CUDA device (use --dry-run on a CPU)", file=sys.stderr)
            return 2
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu_check-"))
    work.mkdir(parents=True, exist_ok=True)
    check = Check(Path(args.out_dir), work, args.dry_run, sys.executable)
    try:
        for stage in (check.cuda_tests, check.benchmark, check.denoise, check.training, check.study,
                      check.more_benchmarks):
            try:
                stage()
            except Exception as err:  # a stage's own bookkeeping failed: report it, go on
                check.results.append((stage.__name__, f"failed in gpu_check.py: {type(err).__name__}: {err}", 0.0))
        print(check.write(), end="")
    finally:
        if not (args.keep or args.work):
            shutil.rmtree(work, ignore_errors=True)
    return 0 if check.passed else 1


if __name__ == "__main__":
    sys.exit(main())
