"""Training checkpoints: the whole trainer state, saved atomically, loaded without pickle code.

`checkpoints/step_XXXXXXX/state.pt` holds only tensors, numbers, strings, lists and dicts
(`torch.save` of plain containers), read back with `torch.load(weights_only=True)`, which
refuses anything that would run code. A checkpoint is written to a temporary folder and
renamed; the newest complete one wins; older ones beyond `keep` are removed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

STATE_FILE = "state.pt"


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def save_checkpoint(run_dir: Path, step: int, state: dict, keep: int) -> Path:
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp_step_{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save(state, tmp / STATE_FILE)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in sorted(root.glob("step_*"))[:-keep]:
        shutil.rmtree(old)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    done = sorted(p for p in checkpoint_dir(run_dir).glob("step_*") if (p / STATE_FILE).exists())
    return done[-1] if done else None


def load_checkpoint(path: Path, device: torch.device) -> dict:
    return torch.load(path / STATE_FILE, map_location=device, weights_only=True)
