"""experiments/analysis and experiments/publish.py: the scripts behind statements in the
results files, and the one that refreshes them from a sweep's report."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from conftest import REPO


def load(name: str, folder: str = "analysis"):
    spec = importlib.util.spec_from_file_location(name, REPO / "experiments" / folder
                                                  / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_range_latent_fires_inside_a_run_of_positions_and_a_position_blind_one_does_not():
    ranges = load("position_ranges")
    rate = np.zeros((16, 5))
    rate[3:9, 0] = 0.95         # a range latent: positions 3-8
    rate[:, 1] = 0.9            # fires at every position: no range
    rate[3:6, 2] = 0.95         # too short a range (3 < MIN_LENGTH)
    rate[3:9, 3] = 0.95
    rate[12:, 3] = 0.6          # fires outside its range as well
    rate[:14, 4] = 0.9          # nearly everywhere, and the rest above OUTSIDE
    rate[14:, 4] = 0.3
    assert ranges.range_latents(rate) == [(0, 3, 6)]
    assert ranges.longest_run(np.array([1, 0, 1, 1, 1, 0, 1], dtype=bool)) == (2, 3)


def test_a_latent_with_most_of_its_importance_weight_on_one_position_counts_as_collapsed():
    import torch

    collapse = load("importance_collapse")
    ema = torch.zeros(8, 3)     # uniform: L·w = 1 everywhere
    ema[2, 1] = 20.0            # latent 1: nearly all of its weight on position 2
    ema[5, 2] = 1.0             # latent 2: heavier at position 5, far from half
    count, largest = collapse.collapsed_latents(ema)
    assert count == 1 and largest > 7.99


def test_publish_keeps_the_hand_written_part_and_replaces_the_report_below_the_marker(tmp_path):
    publish = load("publish", ".")
    sweep, paper = tmp_path / "sweep", tmp_path / "paper"
    (sweep / "plots").mkdir(parents=True)
    paper.mkdir()
    (sweep / "report.md").write_text("# Title\n\nTrained at: x.\n\n## Standard metrics\n| a |\n")
    (sweep / "report.csv").write_text("run,EV\n")
    (sweep / "plots" / "frontier.png").write_bytes(b"png")
    results = paper / "results.md"
    results.write_text("# 004\n\nWhat we find.\n")
    with pytest.raises(SystemExit, match="no marker line"):
        publish.publish(sweep, paper)
    assert results.read_text() == "# 004\n\nWhat we find.\n"  # left as it was
    results.write_text(f"# 004\n\nWhat we find.\n\n{publish.MARKER}\n\nan older report\n")
    for _ in range(2):  # a second refresh gives the same file
        publish.publish(sweep, paper)
        assert results.read_text() == (f"# 004\n\nWhat we find.\n\n{publish.MARKER}\n\n"
                                       "Trained at: x.\n\n### Standard metrics\n| a |\n")
    assert (paper / "results.csv").read_text() == "run,EV\n"
    assert (paper / "plots" / "frontier.png").read_bytes() == b"png"


def test_matched_runs_averages_each_methods_seeds_at_one_target(tmp_path, capsys):
    runs = load("matched_runs")
    for name, ev, coef in [("relu@l0_32_seed0", 0.5, 3.0), ("relu@l0_32_seed1", 0.7, 5.0),
                           ("relu@l0_16_seed0", 0.1, 9.0), ("topk@l0_32_seed0", 0.9, None)]:
        job = tmp_path / name
        job.mkdir()
        (job / "metrics.json").write_text(json.dumps({"core": {"explained_variance": ev}}))
        mechanisms = {} if coef is None else {"coef/l1": coef}
        (job / "train_summary.json").write_text(json.dumps({"mechanisms": mechanisms}))
    (tmp_path / "unfinished@l0_32_seed0").mkdir()  # no metrics.json: left out
    found = runs.collect(tmp_path, 32, runs.COLUMNS)
    assert set(found) == {"relu", "topk"}
    assert found["relu"]["EV"] == [0.5, 0.7] and found["relu"]["final L1 coefficient"] == [3, 5]
    runs.main([str(tmp_path)])
    table = capsys.readouterr().out
    assert "| `relu` | 2 | 0.6 ± 0.14 |" in table and "| `topk` | 1 | 0.9 |" in table


def test_shrinkage_scales_recover_the_codes_true_sizes():
    """Codes shrunk by known per-latent factors: the fitted scales undo them exactly, and
    the one global scale is the least-squares compromise between them."""
    shrinkage = load("shrinkage")
    gen = torch.Generator().manual_seed(0)
    m, d, n = 12, 8, 400
    W = torch.randn(m, d, generator=gen, dtype=torch.float64)
    true = torch.rand(n, m, generator=gen, dtype=torch.float64)
    true *= torch.rand(n, m, generator=gen, dtype=torch.float64) < 0.3  # sparse codes
    true[:, -1] = 0  # a latent that never fires keeps its scale of 1
    shrunk_by = torch.linspace(1.2, 3.0, m, dtype=torch.float64)
    b = torch.randn(d, generator=gen, dtype=torch.float64)
    x = true @ W + b
    f = true / shrunk_by
    fit = shrinkage.Sums(m, d)
    fit.add(x, f, b.expand(n, d), W)
    s, global_s = shrinkage.solve_scales(fit, W)
    assert torch.allclose(s[:-1], shrunk_by[:-1], rtol=1e-6) and s[-1] == 1
    assert 1.2 < global_s < 3.0
    assert fit.total_variance() == pytest.approx(float(((x - x.mean(0)) ** 2).sum()))
