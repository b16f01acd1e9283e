"""The GPU check's dry run (`benchmarks/gpu_check.sh --cpu --tiny`): every step the GPU
check runs (random Gemma-2-architecture model, bf16 cache, bf16 and fp32 training of relu,
topk, atr and hierarchical, the table and the drift check) at toy sizes on CPU."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import REPO


@pytest.mark.slow
def test_the_gpu_check_dry_run_passes_then_fails_on_drift_beyond_its_tolerance(tmp_path):
    args = ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--cpu", "--tiny", "--out",
            str(tmp_path)]
    result = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    table = result.stdout[result.stdout.index("Gemma-2 architecture"):]
    for variant, precision in [("relu", "bf16"), ("topk", "bf16"), ("atr", "bf16"),
                               ("hierarchical", "bf16"), ("relu", "fp32"), ("topk", "fp32")]:
        assert any(line.split()[:2] == [variant, precision] for line in table.splitlines())
    assert "relu: |EV(bf16) - EV(fp32)| = " in table and "GPU check passed" in table
    # the same runs' report against a tolerance of 0 fails, naming the drift
    sys.path.insert(0, str(REPO / "benchmarks"))
    from gpu_check import SIZES, report

    with pytest.raises(SystemExit, match="bf16 drifts from fp32"):
        report(tmp_path, SIZES["tiny"], torch.device("cpu"), tolerance=0.0)
