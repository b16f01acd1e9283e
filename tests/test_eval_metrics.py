"""Evaluation metrics with known answers (issue: evaluation)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from conftest import identity_sae
from test_hooks import build as build_tiny_lm

from posae.eval.held_out import HeldOutPass, _pair_similarity, held_out_pass
from posae.eval.preservation import model_preservation
from posae.eval.structure import (
    position_decodability,
    position_specificity,
    profile_clusters,
    specificity,
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


def test_undefined_ratios_are_null_not_errors():
    from posae.eval.safe import ratio

    assert math.isnan(ratio(1.0, 0.0)) and math.isnan(ratio(0.0, 0)) and ratio(1.0, 4) == 0.25
    constant = Batch(torch.ones(4, 16, 8), torch.arange(16).expand(4, 16),
                     torch.ones(4, 16, dtype=bool), torch.zeros(4, 16, dtype=torch.long))
    result = held_out_pass(zero_sae(8), [constant] * 6, 16)  # no variance anywhere
    assert math.isnan(result["core"]["explained_variance"])
    assert all(math.isnan(v) for v in result["by_position"]["explained_variance"])


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


def planted_codes_batch(persistent: bool, b=64, t=64, k=200, rate=0.08, seed=0):
    """An SAE-free batch whose "codes" are the input itself: x = f, identity decoding."""
    g = torch.Generator().manual_seed(seed)
    if persistent:  # each latent holds its state for runs of ~10 tokens
        state = (torch.rand(b, 1, k, generator=g) < rate).float()
        steps = []
        for _ in range(t):
            flip = torch.rand(b, 1, k, generator=g) < 0.1
            fresh = (torch.rand(b, 1, k, generator=g) < rate).float()
            state = torch.where(flip, fresh, state)
            steps.append(state)
        on = torch.cat(steps, 1)
    else:
        on = (torch.rand(b, t, k, generator=g) < rate).float()
    f = on * torch.rand(b, t, k, generator=g)
    return Batch(f, torch.arange(t).expand(b, t), torch.ones(b, t, dtype=bool),
                 torch.zeros(b, t, dtype=torch.long))


class CodesAreInputs(torch.nn.Module):
    """f = x, x̂ = x: the held-out pass then measures the planted codes themselves."""

    def __init__(self, k):
        super().__init__()
        self.cfg = REGISTRY["relu"].config_class(name="relu", d_in=k, width=k)

    def forward(self, x, pos=None, mask=None):
        from posae.sae.base import SAEOutput

        return SAEOutput(x, x, x)


@pytest.mark.parametrize("persistent", [False, True])
def test_adjacent_stability_is_reported_against_chance(persistent):
    temporal = held_out_pass(CodesAreInputs(200), [planted_codes_batch(persistent)],
                             64)["temporal"]
    for name in ("adjacent_jaccard", "adjacent_code_cosine"):
        assert 0 < temporal[f"{name}_chance"] < 0.2  # independent tokens at density 0.08
        if persistent:
            assert temporal[f"{name}_corrected"] > 0.5
        else:
            assert abs(temporal[f"{name}_corrected"]) < 0.02


def test_per_position_curves_follow_the_error_at_each_position():
    batches = random_batches(n=1)
    batches[0].x[:, 5] *= 10  # x̂ = 0: the error is largest where x is
    curves = held_out_pass(zero_sae(8), batches, 16)["by_position"]
    assert curves["position"] == list(range(16))
    assert int(np.argmax(curves["mse"])) == 5
    x = batches[0].x.double()
    assert curves["mse"][2] == pytest.approx(x[:, 2].pow(2).sum(-1).mean().item())
    assert curves["mse"][15] == pytest.approx(x[1:, 15].pow(2).sum(-1).mean().item())  # masked
    assert all(math.isnan(ev) for ev in curves["explained_variance"])  # < 20 tokens each
    many = held_out_pass(zero_sae(8), random_batches(n=1, b=24), 16)["by_position"]
    assert max(many["explained_variance"]) <= 0  # 24 tokens at every position
    assert held_out_pass(identity_sae(8), batches, 16)["by_position"]["l0"][0] == 8


def test_specificity_is_one_minus_normalised_entropy_of_the_firing_rate():
    T = 128
    tokens = np.full(T, 100)
    counts = np.zeros((T, 2), int)
    counts[10:21, 0] = 30                      # fires only at positions 10-20
    counts[:, 1] = 7                           # the same rate at every position
    spec = specificity(counts.T, tokens)
    assert spec[0] == pytest.approx(1 - math.log(11) / math.log(T))
    assert spec[1] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("fires", [20, 100, 1000])
def test_a_position_independent_latent_is_at_its_null_and_never_specialised(fires):
    """The sampling-noise floor: raw specificity is well above 0 at few fires (about 0.45 at
    20), the corrected value is about 0 and no latent counts as specialised."""
    rng = np.random.default_rng(fires)
    T, latents = 128, 200
    tokens = rng.integers(150, 250, T)
    counts = rng.multinomial(fires, tokens / tokens.sum(), size=latents).T  # [T, latents]
    result = position_specificity(counts, tokens)
    summary = specificity_summary(result)
    if fires == 20:
        assert summary["mean_position_specificity"] > 0.3  # the floor the null removes
    assert abs(summary["mean_corrected_specificity"]) < 0.05
    assert summary["n_specialised_latents"] == 0


def test_a_latent_confined_to_positions_10_to_20_is_specialised():
    rng = np.random.default_rng(0)
    tokens = np.full(128, 200)
    counts = rng.multinomial(300, tokens / tokens.sum(), size=50).T
    counts[:, 0] = 0
    counts[10:21, 0] = rng.integers(5, 30, 11)  # fires at 11 positions of 128 only
    result = position_specificity(counts, tokens)
    assert result["specialised"][0] and result["corrected"][0] > 0.4
    assert not result["specialised"][1:].any()
    rare = counts.copy()
    rare[:, 0] = 0
    rare[40, 0] = 3  # fewer than MIN_FIRES fires: not scored, however specific it looks
    assert np.isnan(position_specificity(rare, tokens)["specificity"][0])


def test_fire_counts_are_integers_not_rates_times_tokens():
    """(26/25000)·25000 < 26 in floating point: counts must not be recomputed from rates."""
    assert (26 / 25000) * 25000 < 26
    counts = np.zeros((4, 1), int)
    counts[0, 0] = 26
    assert position_specificity(counts, np.array([25000, 1, 1, 1]))["specificity"][0] > 0


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
    assert perfect["kind"] == "causal"
    for key in ("kl_score", "kl_score_special_tokens_kept"):
        assert perfect[key] == pytest.approx(1.0, abs=1e-4)
    assert perfect["ce_score"] == pytest.approx(1.0, abs=1e-3)
    zero = model_preservation(zero_sae(32), lm, 1, sequences)
    for key in ("kl_score", "ce_score", "kl_score_special_tokens_kept",
                "ce_score_special_tokens_kept"):
        assert zero[key] == pytest.approx(0.0, abs=1e-6)
    assert zero["kl_zero"] > 0


def test_zero_ablation_covers_every_position_as_in_saelens():
    """An SAE that reconstructs every token but the BOS perfectly: with the BOS zeroed in
    the baseline too (SAELens, SAEBench) its score is below 1; kept aside (the old
    definition) it would be 1."""
    lm = build_tiny_lm("gpt2")
    torch.manual_seed(0)
    ids = torch.randint(3, 128, (4, 20))
    attention = torch.ones_like(ids, dtype=torch.bool)
    counted = attention.clone()
    counted[:, 0] = False

    class IdentityButFirst(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = identity_sae(32)

        def forward(self, x, pos=None, mask=None):
            out = self.inner(x, pos, mask)
            out.x_hat = torch.where(pos[..., None] == 0, torch.zeros_like(x), out.x_hat)
            return out

    scores = model_preservation(IdentityButFirst(), lm, 1, [(ids, attention, counted)])
    assert scores["kl_score_special_tokens_kept"] == pytest.approx(1.0, abs=1e-4)
    assert scores["kl_score"] < 0.999


def test_hierarchical_activity_is_measured_before_its_input_independent_offset():
    torch.manual_seed(0)
    sae = build_sae(REGISTRY["hierarchical"].config_class(
        name="hierarchical", d_in=8, width=16, context_size=16, heads=2, head_dim=4))
    with torch.no_grad():
        sae.output.weight.normal_()  # routing on: every positional code gets an offset
    batches = random_batches()
    core = held_out_pass(sae, batches, 16)["core"]
    out = sae(batches[0].x, batches[0].pos, batches[0].mask)
    assert (out.f[batches[0].mask] != 0).float().sum(-1).mean() > 12  # offset: nearly dense
    expected = sum((sae(b.x, b.pos, b.mask).extras["input_codes"][b.mask] != 0).sum().item()
                   for b in batches) / sum(b.mask.sum().item() for b in batches)
    assert core["l0"] == pytest.approx(expected)
    assert core["code_offset_norm"] > 0


def test_a_small_position_effect_on_a_dense_latent_is_not_specialisation():
    """Seen 50,000 times, a latent 50 % more likely to fire late in the context differs
    significantly from uniform, and is still not position-specialised."""
    rng = np.random.default_rng(0)
    tokens = np.full(128, 1000)
    share = tokens * np.linspace(1.0, 1.5, 128)
    counts = rng.multinomial(50000, share / share.sum(), size=3).T
    result = position_specificity(counts, tokens)
    assert (result["p_value"] < 1e-6).all() and not result["specialised"].any()


def test_chance_pairs_do_not_come_from_the_neighbouring_sequence():
    """Consecutive held-out sequences often continue one document. Codes that persist over
    hundreds of tokens, cut into consecutive rows: the chance value must match that of
    independent rows, not the inflated value of pairing a row with its neighbour."""
    g = torch.Generator().manual_seed(0)
    b, t, k = 32, 64, 100
    state, steps = (torch.rand(1, k, generator=g) < 0.1).float(), []
    for _ in range(b * t):  # one stream, runs of ~200 tokens
        flip = torch.rand(1, k, generator=g) < 0.005
        state = torch.where(flip, (torch.rand(1, k, generator=g) < 0.1).float(), state)
        steps.append(state)
    stream = torch.cat(steps).reshape(b, t, k)
    rows = Batch(stream, torch.arange(t).expand(b, t), torch.ones(b, t, dtype=bool),
                 torch.zeros(b, t, dtype=torch.long))
    chance = held_out_pass(CodesAreInputs(k), [rows], t)["temporal"]["adjacent_jaccard_chance"]
    # independent sets of ~10 of 100 latents: E|A ∩ B| = 1, E|A ∪ B| = 19
    assert chance == pytest.approx(1 / 19, abs=0.02)
    neighbour, _ = _pair_similarity(stream[1:, :-1].reshape(-1, k), stream[:-1, 1:].reshape(-1, k))
    assert neighbour.mean() > chance + 0.1  # what pairing with the previous row gave


def test_training_pass_stands_in_only_for_the_same_pass():
    """The chance pairs are half a batch of sequences apart, so the batch is part of what
    decides the numbers: training's held-out pass stands in for the evaluation's only with
    the same SAE, sequences, batch, device and full precision (HeldOutPass.same_pass)."""
    torch.manual_seed(0)
    sae = build_sae(REGISTRY["relu"].config_class(name="relu", d_in=8, width=32)).eval()
    rows = random_batches(n=1, b=8)[0]
    halves = [Batch(*(part[i:i + 4] for part in (rows.x, rows.pos, rows.mask, rows.tokens)))
              for i in (0, 4)]
    whole = held_out_pass(sae, [rows], 16)
    split = held_out_pass(sae, halves, 16)
    assert whole["core"]["l0"] == pytest.approx(split["core"]["l0"])
    assert whole["temporal"]["adjacent_jaccard_chance"] != pytest.approx(
        split["temporal"]["adjacent_jaccard_chance"])
    cpu, ids, twin = torch.device("cpu"), np.arange(10), copy.deepcopy(sae)
    done = HeldOutPass(whole, sae, ids, 8, cpu)
    assert done.same_pass(twin, ids.copy(), 8, cpu)
    assert not done.same_pass(twin, ids[:5], 8, cpu) and not done.same_pass(twin, ids, 4, cpu)
    assert not HeldOutPass(whole, sae, ids, 8, cpu, "bf16").same_pass(twin, ids, 8, cpu)
    with torch.no_grad():
        twin.b_dec[0] += 1e-6
    assert not done.same_pass(twin, ids, 8, cpu)
