"""Learning-rate schedules as multipliers of optim.lr."""

from __future__ import annotations

import math

from posae.config import OptimConfig


def lr_multiplier(cfg: OptimConfig, total_steps: int):
    """constant: 1. warmup: linear 0 → 1 over warmup_steps, then 1. cosine: the same warmup,
    then cosine decay to min_lr_ratio at the last step."""

    def multiplier(step: int) -> float:
        if cfg.schedule == "constant":
            return 1.0
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "warmup":
            return 1.0
        span = max(1, total_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return multiplier
