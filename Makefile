PYTHON ?= python3
PIP := $(PYTHON) -m pip
# Installed only when no torch is importable. On this project's CPU machines the pinned
# version resolves to the CPU wheel on local disk; on a GPU machine to the usual CUDA build.
# A cluster's own torch is kept. Override: make install TORCH='torch==2.5.1'.
TORCH ?= torch==2.13.0

.PHONY: install test run matched bench-cache bench-train bench-gpu bench-memory

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH)"
	$(PIP) install -e ".[dev]"

test:
	$(PYTHON) -m pytest

# The main job on the embedded default (MiniLM, stdlib docstrings).
run:
	$(PYTHON) -m posae.train

# Every matched-sparsity sweep, resumable (docs/protocol.md): about 9 CPU hours.
matched:
	PYTHON=$(PYTHON) experiments/run_matched.sh

bench-cache:
	$(PYTHON) benchmarks/bench_cache.py

bench-train:  # every variant vs relu and the roofline
	$(PYTHON) benchmarks/bench_train.py

bench-memory:  # peak RSS and tokens/s at d 2304, widths 16384 and 65536; GPU estimate
	$(PYTHON) benchmarks/bench_memory.py

bench-gpu:  # one GPU, offline, under 8 minutes (benchmarks/gpu_check.py)
	PYTHON=$(PYTHON) benchmarks/gpu_check.sh
