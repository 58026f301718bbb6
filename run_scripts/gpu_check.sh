#!/usr/bin/env bash
# The device check of issue 18: on one CUDA GPU, in at most 8 minutes and without network,
# the CUDA-only tests, the benchmark table, denoise.py on a bundled volume (float32 and the
# faster options, with the PSNR difference), a 2-minute training of the default config and a
# smoke run of the study; one Markdown report (report.md, with benchmark.md and logs.txt) in
# OUT_DIR, also printed. Exit status 0: every stage passed; 1: one failed; 2: no CUDA device.
#
#   bash run_scripts/gpu_check.sh OUT_DIR              # on the GPU machine
#   bash run_scripts/gpu_check.sh --dry-run OUT_DIR    # the same stages on a CPU, tiny sizes
#
# Needs a CUDA PyTorch with Lightning. The other packages come as wheels (no pip from a
# registry there): make them beforehand with `bash ../shared/gpu/wheels.sh .whl` (add pytest's:
# python3 -m pip download --no-deps --only-binary=:all: -d .whl pytest pluggy iniconfig); when
# omegaconf is not importable they are installed from $WHEELS (default .whl) into /tmp/site.
# $PYTHON picks the interpreter (default python3). Details: run_scripts/gpu_check.py.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
WHEELS="${WHEELS:-$ROOT/.whl}"
SITE="${SITE:-/tmp/site}"
if ! "$PY" -c "import omegaconf, nibabel" 2>/dev/null; then
    if [ -d "$SITE" ]; then
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    fi
    if ! "$PY" -c "import omegaconf, nibabel" 2>/dev/null; then
        if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
            echo "gpu_check.sh: omegaconf / nibabel missing and no wheels in $WHEELS (bash ../shared/gpu/wheels.sh .whl)" >&2
            exit 2
        fi
        "$PY" -m pip install -q --no-index --no-deps --target "$SITE" "$WHEELS"/*.whl
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" WANDB_MODE=disabled
cd "$ROOT"
exec "$PY" "$ROOT/run_scripts/gpu_check.py" "$@"
