"""Every schedule of a run in one place: the one ramp type (`Ramp`) behind the learning-rate
warmup, the loss coefficients' warmups, the curriculum's α (004) and the progressive mask
(004 runs 6-8); the learning-rate multiplier; and the check that every schedule of a run's
config finishes within the run."""

from __future__ import annotations

import math
from typing import Any

from omegaconf import DictConfig, OmegaConf

from posae.config import OptimConfig


class Ramp:
    """`value` × clip((step - delay) / length, 0, 1): 0 until `delay`, linear to `value` over
    `length` steps, then `value` (a step at `delay` when length is 0)."""

    def __init__(self, value: float = 1.0, delay: int = 0, length: int = 0):
        self.value, self.delay, self.length = float(value), int(delay), int(length)

    def __call__(self, step: int) -> float:
        if self.length <= 0:
            return self.value if step >= self.delay else 0.0
        return self.value * min(1.0, max(0.0, (step - self.delay) / self.length))


def lr_multiplier(cfg: OptimConfig, total_steps: int):
    """constant: 1. warmup: linear 0 → 1 over warmup_steps, then 1. cosine: the same warmup,
    then cosine decay to min_lr_ratio at the last step."""

    # the optimiser's first step is step 0 and must not have lr 0: the ramp starts one early
    warmup = Ramp(1.0, delay=-1, length=cfg.warmup_steps)

    def multiplier(step: int) -> float:
        if cfg.schedule == "constant":
            return 1.0
        if step < cfg.warmup_steps:
            return warmup(step)
        if cfg.schedule == "warmup":
            return 1.0
        span = max(1, total_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return multiplier


def schedule_ends(node: Any, prefix: str = "") -> dict[str, int]:
    """The step at which each ramp in a resolved config finishes, by the key that sets it:
    warmups (`*warmup_steps`), mask schedules (`schedule_steps`), curricula and ramps
    (`delay` + `length`, `curriculum_delay` + `curriculum_length`)."""
    ends: dict[str, int] = {}
    if not isinstance(node, dict):
        return ends
    for key, value in node.items():
        if isinstance(value, dict):
            ends.update(schedule_ends(value, f"{prefix}{key}."))
        elif isinstance(value, int) and not isinstance(value, bool) and value > 0:
            if key.endswith("warmup_steps") or key == "schedule_steps":
                ends[f"{prefix}{key}"] = value
            elif key.endswith("length") and isinstance(node.get(key.replace("length", "delay")),
                                                        int):
                delay = key.replace("length", "delay")
                ends[f"{prefix}{delay} + {prefix}{key}"] = node[delay] + value
    return ends


def unfinished_schedules(cfg: DictConfig, total_steps: int) -> list[str]:
    """Warnings for every ramp, curriculum or warmup of the run's config that ends after its
    last step, and for resampling that has no round to run (trainer.resample_every)."""
    tree = {group: OmegaConf.to_container(cfg[group], resolve=True)
            for group in ("optim", "loss", "variant")}
    if tree["optim"].get("schedule") == "constant":
        tree["optim"].pop("warmup_steps", None)
    warnings = [f"{key} = {end} steps, but the run has {total_steps}: this schedule never "
                f"finishes" for key, end in schedule_ends(tree).items() if end > total_steps]
    every = cfg.trainer.resample_every
    if every and 2 * every > total_steps:
        warnings.append(f"trainer.resample_every = {every}: no resampling round fits in this "
                        f"{total_steps}-step run (a round needs {every} steps of recovery "
                        f"before the end)")
    return warnings
