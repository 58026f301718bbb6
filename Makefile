# The two commands of the README: `make demo` and `make test`. Both create the virtual
# environment .venv on first use (idempotent: re-run only when pyproject.toml changes).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# CPU build by default; on a CUDA machine: make setup TORCH="torch==2.13.0 --index-url ..."
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

# Main job on the bundled real MR + CT: short training, U-Net baseline, evaluation of
# NLM, BM3D, U-Net, this run's DDPM and the shipped pretrained DDPM (results table + figures).
demo: setup
	WANDB_MODE=offline $(PY) run_scripts/dm4mi-conditional.py --config run_scripts/configs/ddpm-cond/bundled_ct_mr.yaml

test: setup
	WANDB_MODE=offline $(PY) -m pytest -q

clean:
	rm -rf runs cache outputs
