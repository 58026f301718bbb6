"""run_scripts/gpu_check.sh --dry-run: every stage of the GPU device check on the CPU with tiny
sizes, so the script cannot rot between GPU runs (2 to 3 minutes on 2 shared cores: seven
subprocesses that each start torch and Lightning)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["CUDA tests", "benchmark (eager)", "denoise.py fp32", "denoise.py bf16", "training (default config)",
          "study smoke", "benchmark (denoise(), model)"]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "out"
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "run_scripts" / "gpu_check.sh"), "--dry-run", str(out)], env=env,
                          capture_output=True, text=True, timeout=1200)
    return proc, out


def stage_rows(report: str) -> dict:
    rows = [line.split("|") for line in report.splitlines() if line.startswith("| ") and "---" not in line]
    return {r[1].strip(): r[2].strip() for r in rows[1:]}


def test_every_stage_runs_and_passes_on_the_cpu(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (out / "report.md").read_text()
    assert proc.stdout == report  # printed as written
    status = stage_rows(report.split("\n## ")[0])
    assert [s for s in STAGES if status.get(s) != "ok"] == [], status


def test_the_report_holds_each_stage_s_figures_and_fits_the_device_s_limits(dry_run):
    _, out = dry_run
    report = (out / "report.md").read_text()
    sections = {part.split("\n", 1)[0]: part for part in report.split("\n## ")[1:]}
    assert set(sections) >= {"CUDA tests", "benchmark (eager)", "denoise.py", "training", "study smoke",
                             "benchmark (denoise(), model)"}
    assert "skipped" in sections["CUDA tests"]  # no CUDA here: every CUDA test skips
    bench = sections["benchmark (eager)"]
    assert "| 16 x 16 | fp32 |" in bench and "| 16 x 16 | bf16+cl+fused |" in bench and "| bf16 |" in bench
    denoise = {r[1].strip(): r for r in (line.split("|") for line in sections["denoise.py"].splitlines()
                                         if line.startswith(("| fp32", "| bf16")))}
    assert abs(float(denoise["bf16"][3])) <= 0.05 and float(denoise["fp32"][2]) > 30  # dB
    assert "2 optimizer steps" in sections["training"]
    study = sections["study smoke"]
    assert "| matched start / NFE 2 | 2 |" in study and "| matched start, bf16 / NFE 2 | 2 |" in study
    assert "| bf16+cl |" in sections["benchmark (denoise(), model)"]
    files = sorted(p for p in out.rglob("*") if p.is_file())
    assert [p.name for p in files] == ["benchmark.md", "logs.txt", "report.md"]  # $OUT: at most 8 files
    assert all(p.stat().st_size < 16 * 2 ** 20 for p in files)  # of 16 MB each
    assert "===== 00_CUDA.log =====" in (out / "logs.txt").read_text()
