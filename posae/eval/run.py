"""Evaluate the SAE saved in a training run's folder: `metrics.json` and `plots/` beside it.

Each family of posae/eval/families.py runs once, timed, in order; metrics.json holds their
sections under a header naming the run (schema: docs/metrics.md).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from posae.config import EvalConfig
from posae.eval.families import FAMILIES, LANGUAGE_MODEL_FAMILIES, families_to_run
from posae.eval.held_out import HeldOutPass
from posae.eval.inputs import EvalInputs, RunInputs
from posae.eval.safe import json_safe

SCHEMA_VERSION = 1
# The definitions behind the numbers (docs/metrics.md). 2: specificity against its null,
# chance-corrected adjacency, zero ablation of every position, raw-feature probes, document
# split, training-window dead fraction. posae.report refuses to mix versions.
METRIC_VERSION = 2

__all__ = ["METRIC_VERSION", "SCHEMA_VERSION", "RunInputs", "evaluate_run", "flat_scalars"]


@torch.no_grad()
def evaluate_run(run_dir: Path, cfg: EvalConfig, logger=None,
                 held_out: HeldOutPass | None = None) -> dict:
    """Evaluate `run_dir/sae`; write `metrics.json` and `plots/`; log a summary. `held_out`:
    the pass training's end ran on this SAE, used where it is the pass this evaluation
    would run (HeldOutPass.same_pass)."""
    inputs = EvalInputs(run_dir, cfg, held_out)
    sae = inputs.sae
    metrics = {"schema_version": SCHEMA_VERSION, "metric_version": METRIC_VERSION,
               "run_dir": str(inputs.run_dir),
               "sae": {"name": sae.cfg.name, "architecture": sae.cfg.arch, "d_in": sae.cfg.d_in,
                       "d_sae": sae.cfg.d_sae},
               "model": inputs.req.model.name, "layer": inputs.layer,
               "held_out_sequences": int(len(inputs.ids))}
    if cfg.plots:
        inputs.plot_dir.mkdir(exist_ok=True)
    names = families_to_run(inputs, cfg)
    if set(names) & set(LANGUAGE_MODEL_FAMILIES.values()):
        inputs.load_language_model()  # once, and outside the families' seconds
    timings: dict[str, float] = {}
    figures: dict[str, Path] = {}
    for name in names:
        start = time.perf_counter()
        sections, written = FAMILIES[name](inputs, cfg)
        timings[name] = time.perf_counter() - start
        metrics.update(sections)
        figures.update(written)
    metrics["seconds"] = timings
    metrics["plots"] = sorted(str(p.relative_to(inputs.run_dir)) for p in figures.values())
    metrics = json_safe(metrics)
    tmp = inputs.run_dir / "metrics.json.tmp"
    tmp.write_text(json.dumps(metrics, indent=1))
    tmp.replace(inputs.run_dir / "metrics.json")
    if logger is not None:
        logger.summary(flat_scalars(metrics))
        logger.images(figures)
    return metrics


def flat_scalars(metrics: dict, prefix: str = "eval") -> dict[str, float]:
    """Every scalar of the metrics as `eval/<section>/<name>` (curves and lists left out)."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            out.update(flat_scalars(value, f"{prefix}/{key}"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}/{key}"] = value
    return out
