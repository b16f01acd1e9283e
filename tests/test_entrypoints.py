"""The `python -m posae.*` entry points, run as a user runs them."""

from __future__ import annotations

import json

import pytest
from conftest import run_module

SMALL = ["context_size=32", "n_tokens=2048", "cache.shard_sequences=16", "cache.device=cpu"]
TRAIN = ["trainer.n_tokens=2048", "trainer.batch_tokens=512", "trainer.cpu=true"]


@pytest.mark.slow
def test_train_builds_the_cache_when_missing_then_reuses_it(tmp_path):
    args = [*SMALL, *TRAIN, "layer=2", f"cache.root={tmp_path / 'cache'}"]
    first = run_module("posae.train", *args, f"hydra.run.dir={tmp_path / 'run1'}")
    assert first.returncode == 0, first.output
    assert "loading minilm" in first.output and "held-out: explained variance" in first.output
    manifests = list((tmp_path / "cache").rglob("layer02/manifest.json"))
    assert len(manifests) == 1
    assert json.loads(manifests[0].read_text())["n_sequences"] == 64
    second = run_module("posae.train", *args, f"hydra.run.dir={tmp_path / 'run2'}")
    assert second.returncode == 0, second.output
    assert "activation cache complete" in second.output and "loading minilm" not in second.output
    assert (tmp_path / "run1" / ".hydra" / "config.yaml").exists()


@pytest.mark.slow
def test_cache_entry_point_writes_every_requested_layer_in_one_pass(tmp_path):
    result = run_module("posae.cache", *SMALL, "layers=[0,5]", f"cache.root={tmp_path}",
                        f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.output
    assert result.output.count("loading minilm") == 1
    assert {p.parent.name for p in tmp_path.rglob("manifest.json")} == {"layer00", "layer05"}
