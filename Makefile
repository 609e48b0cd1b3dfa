# Quick start: `make demo` (train and test on the embedded synthetic benchmark), `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
TORCH_PAIR := torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test test-fast lint bench

# Installs into the active Python. torch and torchvision first, as one matching pair: where no pair
# that loads together is installed, the pinned pair (the ranges of requirements.txt where it is not
# available). torchvision's operators only load against the torch build it was made for.
install:
	@$(PYTHON) -c "import torch, torchvision.ops" 2>/dev/null || $(PIP) install -q $(TORCH_PAIR) || \
		$(PIP) install -q "torch>=2.1,<3" "torchvision>=0.16"
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-deps -e .

demo: install
	$(PYTHON) main.py --mode demo

# everything (the reference-fidelity, fault and torchrun tests included); about 7 minutes on 2 cores
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
	$(PYTHON) bench/bench_extract.py
