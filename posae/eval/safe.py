"""Divisions whose denominator can be zero in an evaluation: the documented answer is null."""

from __future__ import annotations


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, NaN (written as null in metrics.json) when the denominator
    is 0 or not finite."""
    if not denominator or denominator != denominator or abs(denominator) == float("inf"):
        return float("nan")
    return numerator / denominator
