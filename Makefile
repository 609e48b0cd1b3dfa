# Quick start: `make demo` (train and test on the embedded synthetic benchmark), `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
TORCH_CPU := torch==2.13.0

.PHONY: install demo test test-fast lint bench

# Installs into the active Python. torch first: on a machine without CUDA the pinned
# CPU build is taken when available; elsewhere the range in requirements.txt applies.
install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q $(TORCH_CPU) || $(PIP) install -q "torch>=2.1,<3"
	$(PIP) install -q -r requirements.txt

demo: install
	$(PYTHON) main.py --mode demo

# everything (the reference-fidelity, fault and torchrun tests included); 6-7 minutes on 2 cores
test: install
	$(PYTHON) -m pytest -q tests

# the edit-test loop: everything not marked slow, about a minute
test-fast: install
	$(PYTHON) -m pytest -q -m "not slow" tests

lint: install
	$(PYTHON) -m ruff check .

bench: install
	$(PYTHON) bench/bench_eval.py
	$(PYTHON) bench/bench_mining.py
	$(PYTHON) bench/bench_train.py
