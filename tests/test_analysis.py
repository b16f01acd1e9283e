"""experiments/analysis: the scripts behind statements in the results files."""

from __future__ import annotations

import importlib.util

import numpy as np
from conftest import REPO


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "experiments" / "analysis"
                                                  / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_range_latent_fires_inside_a_run_of_positions_and_a_position_blind_one_does_not():
    ranges = load("position_ranges")
    rate = np.zeros((16, 4))
    rate[3:9, 0] = 0.95         # a range latent: positions 3-8
    rate[:, 1] = 0.9            # position-blind, just as frequent: not a range
    rate[3:6, 2] = 0.95         # too short a range (3 < MIN_LENGTH)
    rate[3:9, 3] = 0.95
    rate[12:, 3] = 0.6          # fires outside its range as well
    assert ranges.range_latents(rate) == [(0, 3, 6)]
    assert ranges.longest_run(np.array([1, 0, 1, 1, 1, 0, 1], dtype=bool)) == (2, 3)
