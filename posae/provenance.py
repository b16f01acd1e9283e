"""Where a run's numbers come from: the code's git commit, the libraries and the hardware,
saved in each run's train_summary.json and listed by posae.report beside its tables."""
from __future__ import annotations

import functools
import os
import platform
import subprocess
from pathlib import Path

import torch

PACKAGE_DIR = Path(__file__).resolve().parent


def git_commit(directory: Path = PACKAGE_DIR) -> dict:
    """The commit of the checkout that holds posae, and whether the tracked files that set a
    run's numbers (the package, posae/conf/, the experiment yaml files) differ from it or hold
    files git does not track yet (`dirty`); both None outside a git checkout (a wheel). The
    sweeps' own run folders (experiments/runs/, their saved configs) are results, not code."""
    def git(*args):
        return subprocess.run(["git", "-C", str(directory), *args], capture_output=True,
                              text=True, timeout=30)
    try:
        head = git("rev-parse", "HEAD")
        status = git("status", "--porcelain", "--untracked-files=all", "--", str(directory),
                     ":(top,glob)experiments/**/*.yaml", ":(top,exclude)experiments/runs")
    except (OSError, subprocess.TimeoutExpired):
        return {"commit": None, "dirty": None}
    if head.returncode != 0:
        return {"commit": None, "dirty": None}
    return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo on Linux, else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.cache
def code_at_first_run(directory: Path = PACKAGE_DIR) -> dict:
    """`git_commit()` read once per process, at its first run: a Hydra multirun trains
    every job in one process, on the code it imported then, so a commit made while the
    sweep runs must not be credited to its later jobs."""
    return git_commit(directory)


def provenance(device: torch.device) -> dict:
    """Commit (as the process found it at its first run), versions and hardware of the
    process that trains on `device`."""
    accelerator = (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else device.type)
    return {**code_at_first_run(), "torch": torch.__version__,
            "python": platform.python_version(), "device": accelerator,
            "cpu": cpu_name(), "cpu_count": os.cpu_count()}
