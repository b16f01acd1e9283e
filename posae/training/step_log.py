"""The run folder's per-step record: `train_log.jsonl`, one JSON object per log step with
every logged statistic (losses, coefficients, L0, `mech/...` mechanism state, resampling
events); the coefficients and mechanism state also go to the text log `train.log` (file
only, not the console, where the progress bar is).

A resumed run first drops the records after its checkpoint's step, so that the file never
holds two histories.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

STEP_LOG = "train_log.jsonl"
TEXT_LOG = "train.log"  # Hydra's log of `python -m posae.train`


class StepLog:
    def __init__(self, run_dir: Path, enabled: bool):
        self.path = run_dir / STEP_LOG
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        """Keep the records of steps ≤ `step` (the checkpoint a run resumes from)."""
        if not (self.enabled and self.path.exists()):
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                break  # a line cut by a crash ends the readable history
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(f"{line}\n" for line in kept))
        tmp.replace(self.path)

    def write(self, step: int, stats: dict[str, float]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **stats}) + "\n")
        mechanisms = {k: v for k, v in stats.items() if k.startswith(("mech/", "coef/",
                                                                        "resample/"))}
        if mechanisms:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            line = " ".join(f"{k}={v:.4g}" for k, v in mechanisms.items())
            with (self.path.parent / TEXT_LOG).open("a") as f:
                f.write(f"[{stamp}][posae.mechanisms][INFO] - step {step}: {line}\n")
