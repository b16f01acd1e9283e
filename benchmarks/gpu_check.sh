#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): one GPU, offline, under 8 minutes.
#   benchmarks/gpu_check.sh                 on a GPU machine (make bench-gpu)
#   benchmarks/gpu_check.sh --cpu --tiny    the dry run, on any machine (in make test)
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 WANDB_MODE="${WANDB_MODE:-disabled}"
exec timeout 480 "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
