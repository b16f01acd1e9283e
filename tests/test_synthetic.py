"""dataset=synthetic: the generator's statistics match its config, it goes through the
activation cache like real activations, and recovery metrics find a planted dictionary."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import compose_config, run_module

from posae.config import ConfigError, SyntheticConfig, cache_request
from posae.data.cache_format import CacheSpec
from posae.data.cache_reader import ActivationCache
from posae.data.cache_writer import build_cache
from posae.data.synthetic import SyntheticActivations
from posae.eval.recovery import recovery
from posae.sae import REGISTRY, build_sae

T = 64


def generate(cfg: SyntheticConfig, n_seq: int = 2000, shard: int = 0):
    source = SyntheticActivations(cfg, T)
    x, codes = source.shard(shard, n_seq)
    return source, x, codes > 0


def family(source, z, name):
    index = ("invariant", "position_specific", "persistent").index(name)
    return z[..., source.family == index]


def test_firing_rates_ranges_and_run_lengths_match_the_config():
    cfg = SyntheticConfig(invariant_rate=0.03, specific_rate=0.4, range_length=12,
                          on_rate=0.02, mean_run=6.0)
    source, _, z = generate(cfg)
    assert family(source, z, "invariant").mean() == pytest.approx(0.03, rel=0.03)
    specific = family(source, z, "position_specific")                 # [n, T, 32]
    inside = source.in_range()                                         # [T, 32]
    assert inside.sum(0).tolist() == [12] * 32
    assert not specific[:, ~inside].any()                              # never outside its range
    assert specific[:, inside].mean() == pytest.approx(0.4, rel=0.03)
    persistent = family(source, z, "persistent")
    off = 1 / 6.0
    assert persistent.mean() == pytest.approx(0.02 / (0.02 + off), rel=0.05)  # stationary
    # runs: P(on -> off) = 1 / mean_run, i.e. geometric run lengths of mean mean_run
    was_on, now_on = persistent[:, :-1], persistent[:, 1:]
    assert (~now_on[was_on]).mean() == pytest.approx(off, rel=0.03)
    assert now_on[~was_on].mean() == pytest.approx(0.02, rel=0.05)


def test_correlated_pairs_fire_together():
    cfg = SyntheticConfig(invariant_rate=0.05, correlated_pairs=3, correlation=0.6)
    source, _, z = generate(cfg)
    inv = family(source, z, "invariant")
    for j in range(3):
        follower_given_leader = inv[..., 2 * j + 1][inv[..., 2 * j]].mean()
        assert follower_given_leader == pytest.approx(0.05 + 0.95 * 0.6, rel=0.05)
    assert inv[..., 7][inv[..., 6]].mean() == pytest.approx(0.05, abs=0.02)  # not paired


def test_activations_are_the_planted_sum_and_deterministic():
    cfg = SyntheticConfig(noise_std=0.0)
    source, x, _ = generate(cfg, n_seq=50, shard=3)
    _, codes = source.shard(3, 50)
    np.testing.assert_allclose(x, codes @ source.dictionary + source.position_code, atol=1e-4)
    again = SyntheticActivations(cfg, T)
    np.testing.assert_array_equal(again.shard(3, 50)[0], x)
    assert not np.array_equal(again.shard(4, 50)[0], x)
    assert np.linalg.norm(source.dictionary, axis=1) == pytest.approx(1.0)
    heavy = codes[codes > 0]
    assert heavy.max() / np.median(heavy) > 3                        # log-normal tail


def synthetic_request(root, extra=()):
    cfg = compose_config("cache", ["dataset=synthetic", f"cache.root={root}", "n_tokens=40960",
                                   "cache.shard_sequences=128", *extra])
    return cache_request(cfg, "layers")


def test_synthetic_activations_go_through_the_activation_cache(tmp_path):
    req = synthetic_request(tmp_path)
    build_cache(req)
    cache = ActivationCache.open(CacheSpec.from_request(req), 0)
    assert len(cache) == 640 and cache.context_size == T and cache.special_token_ids == []
    x, _ = SyntheticActivations(req.dataset.synthetic, T).shard(2, 128)
    stored = cache.sequences(np.arange(256, 384))
    np.testing.assert_allclose(np.asarray(stored.acts, np.float32), x, atol=2e-3, rtol=1e-3)
    assert stored.mask.all()
    other = synthetic_request(tmp_path, ["dataset.synthetic.seed=1"])   # another cache folder
    assert CacheSpec.from_request(other).group_dir() != CacheSpec.from_request(req).group_dir()


@pytest.mark.parametrize("override, key", [
    ("dataset.synthetic.range_length=100", "dataset.synthetic.range_length"),
    ("dataset.synthetic.correlated_pairs=40", "dataset.synthetic.correlated_pairs"),
    ("dataset.synthetic.on_rate=1.5", "dataset.synthetic.on_rate"),
    ("model=minilm", "model"),
])
def test_bad_synthetic_settings_name_the_key(tmp_path, override, key):
    with pytest.raises(ConfigError, match=key):
        synthetic_request(tmp_path, [override])


def planted_sae(source: SyntheticActivations, extra: int):
    """A ReLU SAE whose first decoder rows are the true dictionary."""
    n, d = source.dictionary.shape
    sae = build_sae(REGISTRY["relu"].config_class(name="relu", d_in=d, width=n + extra))
    with torch.no_grad():
        sae.W_dec[:n] = torch.as_tensor(source.dictionary, dtype=torch.float32)
    return sae


def test_recovery_is_complete_for_the_planted_dictionary_and_near_zero_untrained():
    source = SyntheticActivations(SyntheticConfig(), T)
    positions = np.arange(T)
    n_specific = source.cfg.n_position_specific
    firing = np.zeros((T, 128 + 16))
    firing[:, 64:64 + n_specific] = source.in_range()                # fires where planted
    activation = firing * 2.0
    activation[:, 64:64 + n_specific] += 0.01 * ~source.in_range()   # weak firing elsewhere
    firing[:, 64:64 + n_specific] += 0.2 * ~source.in_range()
    found = recovery(planted_sae(source, 16), source, firing, activation, positions)
    for name in ("invariant", "position_specific", "persistent", "all"):
        assert found[name]["recovered_fraction"] == 1.0
        assert found[name]["mean_max_cosine"] == pytest.approx(1.0)
    specific = found["position_specific"]
    # firing spread thinly everywhere: the firing share falls below 90 %, the activation
    # mass stays in range (TopK with k above the planted L0 behaves so)
    assert specific["in_range_share"] < 0.9 and specific["fires_in_range_fraction"] == 0.0
    assert specific["activation_in_range_share"] > 0.9
    assert specific["activation_in_range_fraction"] == 1.0
    untrained = build_sae(REGISTRY["relu"].config_class(name="relu", d_in=64, width=512))
    ones = np.ones((T, 512))
    found = recovery(untrained, source, ones, ones, positions)
    assert found["all"]["recovered_fraction"] == 0.0
    assert found["all"]["mean_max_cosine"] < 0.6
    assert found["position_specific"]["in_range_share"] is None


EASY = ["dataset=synthetic", "dataset.synthetic.n_position_specific=0",
        "dataset.synthetic.n_persistent=0", "dataset.synthetic.n_invariant=48",
        "dataset.synthetic.invariant_rate=0.04", "dataset.synthetic.position_code_scale=0",
        "dataset.synthetic.magnitude_sigma=0.2", "n_tokens=131072", "trainer.n_tokens=1000000",
        "variant=topk", "variant.k=4", "variant.width=256", "trainer.cpu=true",
        "cache.device=cpu", "eval.families=[]", "eval.plots=false"]


@pytest.mark.slow
def test_topk_recovers_the_invariant_features_of_an_easy_setting(tmp_path):
    result = run_module("posae.train", *EASY, f"cache.root={tmp_path / 'cache'}",
                        f"hydra.run.dir={tmp_path / 'run'}", timeout=900)
    assert result.returncode == 0, result.output[-3000:]
    found = json.loads((tmp_path / "run" / "metrics.json").read_text())["recovery"]
    assert found["invariant"]["recovered_fraction"] >= 0.9, found
