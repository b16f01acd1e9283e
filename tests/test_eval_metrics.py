"""Evaluation metrics with known answers (issue: evaluation)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import identity_sae
from test_hooks import build as build_tiny_lm

from posae.eval.held_out import held_out_pass
from posae.eval.preservation import model_preservation
from posae.eval.structure import (
    position_decodability,
    position_specificity,
    profile_clusters,
    specificity_summary,
)
from posae.sae import REGISTRY, build_sae
from posae.training.batches import Batch


def zero_sae(d: int):
    """Reconstructs nothing: x̂ = 0."""
    sae = build_sae(REGISTRY["relu"].config_class(name="relu", d_in=d, width=2 * d))
    with torch.no_grad():
        sae.W_dec.zero_()
        sae.b_dec.zero_()
    return sae.eval()


def random_batches(n=3, b=4, t=16, d=8):
    torch.manual_seed(0)
    out = []
    for _ in range(n):
        mask = torch.ones(b, t, dtype=torch.bool)
        mask[0, -3:] = False
        out.append(Batch(torch.randn(b, t, d) + 2, torch.arange(t).expand(b, t), mask,
                         torch.zeros(b, t, dtype=torch.long)))
    return out


def test_perfect_reconstruction_scores_one_and_zero_sae_at_most_zero():
    perfect = held_out_pass(identity_sae(8), random_batches(), 16)["core"]
    assert perfect["explained_variance"] == pytest.approx(1.0, abs=1e-6)
    assert perfect["cosine_similarity"] == pytest.approx(1.0, abs=1e-6)
    assert perfect["l2_ratio"] == pytest.approx(1.0, abs=1e-6)
    assert perfect["relative_reconstruction_bias"] == pytest.approx(1.0, abs=1e-6)
    assert perfect["n_tokens"] == 3 * (4 * 16 - 3)
    zero = held_out_pass(zero_sae(8), random_batches(), 16)["core"]
    assert zero["explained_variance"] <= 0
    assert perfect["mse"] == pytest.approx(0, abs=1e-12) and zero["mse"] > 1
    assert perfect["l0"] == 8  # one of ReLU(x_j), ReLU(-x_j) per input dimension


def test_adjacent_stability_counts_only_consecutive_counted_pairs():
    sae = identity_sae(2)
    # codes are [relu(x), relu(-x)]: active sets {0}, {0}, {1}, {0} at t = 0..3
    x = torch.tensor([[[1.0, 0.0], [2.0, 0.0], [-1.0, 0.0], [1.0, 0.0]]])
    mask = torch.tensor([[True, True, True, False]])  # the pair (2, 3) does not count
    batch = Batch(x, torch.arange(4)[None], mask, torch.zeros(1, 4, dtype=torch.long))
    temporal = held_out_pass(sae, [batch], 4)["temporal"]
    assert temporal["n_pairs"] == 2
    # pair (0,1): Jaccard 1, cosine 1; pair (1,2): Jaccard 0, cosine 0
    assert temporal["adjacent_jaccard"] == pytest.approx(0.5)
    assert temporal["adjacent_code_cosine"] == pytest.approx(0.5)


def test_per_position_curves_follow_the_error_at_each_position():
    batches = random_batches(n=1)
    batches[0].x[:, 5] *= 10  # x̂ = 0: the error is largest where x is
    curves = held_out_pass(zero_sae(8), batches, 16)["by_position"]
    assert curves["position"] == list(range(16))
    assert int(np.argmax(curves["mse"])) == 5
    x = batches[0].x.double()
    assert curves["mse"][2] == pytest.approx(x[:, 2].pow(2).sum(-1).mean().item())
    assert curves["mse"][15] == pytest.approx(x[1:, 15].pow(2).sum(-1).mean().item())  # masked
    assert max(curves["explained_variance"]) <= 0
    assert held_out_pass(identity_sae(8), batches, 16)["by_position"]["l0"][0] == 8


def test_specificity_is_one_minus_normalised_entropy():
    T, mean_activation = 128, np.zeros((128, 3))
    mean_activation[10:21, 0] = 1.0            # active only at positions 10-20
    mean_activation[:, 1] = 0.7                # the same at every position
    spec = position_specificity(mean_activation)
    assert spec[0] == pytest.approx(1 - math.log(11) / math.log(T))
    assert spec[0] > 0.5  # counted as position-specialised
    assert spec[1] == pytest.approx(0.0, abs=1e-12)
    assert np.isnan(spec[2])  # never active
    one_position = np.zeros((T, 1))
    one_position[40] = 2.0
    assert position_specificity(one_position)[0] == pytest.approx(1.0)
    summary = specificity_summary(spec)
    assert summary["position_specialised_fraction"] == 0.5 and summary["n_scored_latents"] == 2
    # a latent seen on fewer than MIN_FIRES tokens is not scored: one firing looks specific
    rare = position_specificity(one_position, fires=np.array([3]))
    assert np.isnan(rare[0])
    assert position_specificity(one_position, fires=np.array([50]))[0] == pytest.approx(1.0)


def test_profile_clusters_find_planted_groups():
    rng = np.random.default_rng(0)
    T, groups = 64, [(0, 16), (24, 40), (48, 64)]
    profiles = []
    for start, end in groups:
        for _ in range(20):
            p = rng.uniform(0, 0.05, T)
            p[start:end] += 1
            profiles.append(p)
    result = profile_clusters(np.array(profiles).T, np.ones(len(profiles)))
    assert result["n_clusters"] == 3


def planted_codes(position_code: bool, n_seq=60, T=32, d=16, seed=0):
    rng = np.random.default_rng(seed)
    positions = np.tile(np.arange(T), n_seq)
    sequences = np.repeat(np.arange(n_seq), T)
    codes = rng.normal(size=(n_seq * T, d))
    if position_code:  # a direction whose coefficient grows with position
        codes[:, 0] += 3 * positions / T
        codes[:, 1] += 3 * np.cos(np.pi * positions / T)
    return codes, positions, sequences


def test_position_probe_finds_a_planted_code_and_only_chance_without():
    raw = np.random.default_rng(1).normal(size=(60 * 32, 16))
    codes, positions, sequences = planted_codes(True)
    found = position_decodability(codes, raw, positions, sequences, 32, n_buckets=4)
    assert found["chance_accuracy"] == pytest.approx(0.25)
    assert found["codes_accuracy"] > 0.6
    assert abs(found["raw_accuracy"] - 0.25) < 0.08
    codes, positions, sequences = planted_codes(False)
    none = position_decodability(codes, raw, positions, sequences, 32, n_buckets=4)
    assert abs(none["codes_accuracy"] - 0.25) < 0.08


def texts_as_sequences(lm, texts, T=24):
    enc = lm.tokenizer(texts, padding="max_length", truncation=True, max_length=T,
                       return_tensors="pt")
    ids, attention = enc["input_ids"], enc["attention_mask"].bool()
    special = torch.tensor(lm.tokenizer.all_special_ids)
    return [(ids, attention, attention & ~torch.isin(ids, special))]


TEXTS = ["Return the number of items in a container.",
         "Open the file and return a stream; raise OSError on failure.",
         "A dictionary mapping names to their values, kept in insertion order."]


def test_preservation_scores_on_the_embedded_encoder(minilm):
    sequences = texts_as_sequences(minilm, TEXTS)
    perfect = model_preservation(identity_sae(384), minilm, 3, sequences)
    assert perfect["kind"] == "encoder"
    assert perfect["embedding_score"] == pytest.approx(1.0, abs=1e-5)
    assert perfect["token_embedding_score"] == pytest.approx(1.0, abs=1e-5)
    zero = model_preservation(zero_sae(384), minilm, 3, sequences)
    assert zero["embedding_score"] == pytest.approx(0.0, abs=1e-6)
    assert zero["token_embedding_score"] == pytest.approx(0.0, abs=1e-6)
    assert zero["sentence_distance_zero"] > 0.1  # zero ablation really changes the output


@pytest.mark.parametrize("name", ["gpt2", "gemma2"])
def test_preservation_scores_on_a_tiny_causal_lm(name):
    lm = build_tiny_lm(name)
    torch.manual_seed(0)
    ids = torch.randint(3, 128, (4, 20))
    attention = torch.ones_like(ids, dtype=torch.bool)
    attention[1, 15:] = False
    counted = attention.clone()
    counted[:, 0] = False  # a "BOS" keeps its activation
    sequences = [(ids, attention, counted)]
    perfect = model_preservation(identity_sae(32), lm, 1, sequences)
    assert perfect["kind"] == "causal_lm"
    assert perfect["kl_score"] == pytest.approx(1.0, abs=1e-4)
    assert perfect["ce_score"] == pytest.approx(1.0, abs=1e-3)
    zero = model_preservation(zero_sae(32), lm, 1, sequences)
    assert zero["kl_score"] == pytest.approx(0.0, abs=1e-6)
    assert zero["ce_score"] == pytest.approx(0.0, abs=1e-6)
    assert zero["kl_zero"] > 0
