"""A paper's sweep end to end at a tiny scale, then `python -m posae.report` on it."""

from __future__ import annotations

import csv

import pytest
from conftest import run_module

TINY = ["context_size=32", "n_tokens=6400", "cache.shard_sequences=64", "cache.device=cpu",
        "trainer.batch_tokens=512", "trainer.n_tokens=5120", "trainer.cpu=true",
        "variant.expansion_factor=2", "optim.warmup_steps=5", "layer=2",
        "eval.families=[structure]", "eval.plots=false"]
TC_SAE_RUNS = ["baseline_relu", "tc_sae", "no_temporal", "window_3", "lambda2_high"]


@pytest.mark.slow
def test_tc_sae_sweep_runs_and_reports_one_row_per_run(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_module("posae.train", "-m", "+experiment=tc_sae_runs", *TINY,
                        f"cache.root={tmp_path / 'cache'}", f"hydra.sweep.dir={sweep}",
                        timeout=900)
    assert result.returncode == 0, result.output[-3000:]
    (sweep / "3" / "metrics.json").unlink()  # a run that has not finished yet
    report = run_module("posae.report", str(sweep))
    assert report.returncode == 0, report.output
    assert "4 runs reported, 1 missing: window_3" in report.output
    rows = list(csv.reader(open(sweep / "report.csv")))
    assert [r[0] for r in rows[1:]] == [r for r in TC_SAE_RUNS if r != "window_3"]
    assert [r[1] for r in rows[1:]] == ["relu", "tc_sae", "tc_sae", "tc_sae"]
    assert "Missing runs (no metrics.json yet): window_3." in (sweep / "report.md").read_text()
    assert (sweep / "plots" / "metrics_by_run.png").exists()
    assert (sweep / "plots" / "position_curves_by_run.png").exists()


def test_report_refuses_a_folder_that_is_not_a_sweep(tmp_path):
    result = run_module("posae.report", str(tmp_path))
    assert result.returncode != 0 and "not a Hydra multirun folder" in result.output
