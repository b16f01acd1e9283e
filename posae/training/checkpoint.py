"""Training checkpoints: the whole trainer state, saved atomically, loaded without pickle code,
verified against a checksum.

`checkpoints/step_XXXXXXX/state.pt` holds only tensors, numbers, strings, lists and dicts
(`torch.save` of plain containers), read back with `torch.load(weights_only=True)`, which
refuses anything that would run code. Beside it, `state.pt.sha256` holds the file's
sha256, checked before it is loaded. A checkpoint is written to a temporary folder and
renamed; older ones beyond `keep` are removed. Resuming takes the newest checkpoint that
verifies and loads, and names every newer one it had to pass over.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from posae.hashing import file_sha256

STATE_FILE = "state.pt"
CHECKSUM_FILE = STATE_FILE + ".sha256"

log = logging.getLogger("posae")


class CheckpointCorrupt(Exception):
    """A checkpoint whose bytes differ from its checksum or that cannot be read."""


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
    (tmp / CHECKSUM_FILE).write_text(file_sha256(tmp / STATE_FILE) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in sorted(root.glob("step_*"))[:-keep]:
        shutil.rmtree(old)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint folder (not yet verified)."""
    done = sorted(p for p in checkpoint_dir(run_dir).glob("step_*") if (p / STATE_FILE).exists())
    return done[-1] if done else None


def load_checkpoint(path: Path, device: torch.device) -> dict:
    """The state in checkpoint folder `path`, after checking its sha256 (checkpoints written
    before checksums existed are only loaded); CheckpointCorrupt names the file."""
    state_file, checksum = path / STATE_FILE, path / CHECKSUM_FILE
    if checksum.exists() and file_sha256(state_file) != checksum.read_text().strip():
        raise CheckpointCorrupt(f"{state_file}: its sha256 differs from the one saved with it "
                                f"({checksum})")
    try:
        return torch.load(state_file, map_location=device, weights_only=True)
    except Exception as err:  # truncated, empty, garbage: torch raises many kinds
        raise CheckpointCorrupt(f"{state_file}: cannot be read ({type(err).__name__}: "
                                f"{str(err).splitlines()[0] if str(err) else ''})") from None


def resume_state(run_dir: Path, device: torch.device) -> tuple[Path, dict] | None:
    """(folder, state) of the newest checkpoint that verifies and loads, warning about each
    newer one passed over; None without checkpoints; CheckpointCorrupt if none is intact."""
    found = sorted((p for p in checkpoint_dir(run_dir).glob("step_*")
                    if (p / STATE_FILE).exists()), reverse=True)
    bad = []
    for path in found:
        try:
            state = load_checkpoint(path, device)
        except CheckpointCorrupt as err:
            bad.append((path, str(err)))
            continue
        for corrupt, reason in bad:  # set aside: kept for inspection, out of the rotation
            aside = corrupt.with_name(f".corrupt_{corrupt.name}")
            shutil.rmtree(aside, ignore_errors=True)
            corrupt.rename(aside)
            log.warning("skipped a corrupt checkpoint: %s; moved to %s; resuming from %s",
                        reason, aside, path)
        return path, state
    if bad:
        raise CheckpointCorrupt("no intact checkpoint to resume from: "
                                + "; ".join(reason for _, reason in bad))
    return None
