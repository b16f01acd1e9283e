"""Values an evaluation cannot write as computed: a division whose denominator can be zero,
numbers JSON has no word for. The documented answer for an undefined value is null
(docs/metrics.md, "Sections of metrics.json")."""

from __future__ import annotations

import math

import numpy as np


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, NaN (written as null in metrics.json) when the denominator
    is 0 or not finite."""
    if not denominator or denominator != denominator or abs(denominator) == float("inf"):
        return float("nan")
    return numerator / denominator


def json_safe(value):
    """`value` as plain JSON: numpy scalars as Python numbers, NaN and ±inf as null, and
    entries whose key starts with `_` (the arrays behind the plots) left out."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
