"""First-letter feature absorption (posae.eval.absorption) on the embedded MiniLM."""

from __future__ import annotations

import json
import string

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from posae.data.sequences import SpecialTokens
from posae.eval.absorption import (
    LETTERS,
    AbsorptionConfig,
    absorption,
    first_letter_data,
    fit_probe,
    vocab_words,
)
from posae.sae import REGISTRY, build_sae

LAYER, CONTEXT = 3, 32
# min_probe_accuracy=0: MiniLM's first-letter probe is weak (~0.25), and these tests check
# the computation on hand-built SAEs whose answer is known whatever the probe's accuracy.
SMALL = AbsorptionConfig(max_words=1500, min_probe_accuracy=0.0, min_letter_f1=0.0)


@pytest.fixture(scope="module")
def special(minilm):
    return SpecialTokens.for_tokenizer(minilm.tokenizer, prepend_bos=False)


def test_wordpiece_words_are_single_alphabetic_tokens(minilm):
    tok = minilm.tokenizer
    words = vocab_words(tok)
    assert len(words) > 10000
    for word, prompt in words[::50]:
        assert word.isascii() and word.isalpha() and len(word) >= 2
        assert word[0].lower() in string.ascii_lowercase
        assert prompt == f"{word} has the first letter:"
        ids = tok(word, add_special_tokens=False)["input_ids"]
        assert tok.convert_ids_to_tokens(ids) == [word]
    assert not any(w.startswith("#") for w, _ in words)


def test_byte_level_bpe_words_lose_their_word_start_marker():
    """A real GPT-2-style tokenizer (byte-level BPE, 'Ġ' marks a word start), trained here."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["the cat sat on the mat with another cat", "a dog ran to the cat 42 times"] * 50
    tok.train_from_iterator(text, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    assert "Ġcat" in fast.get_vocab()
    words = dict(vocab_words(fast))
    assert {"cat", "the", "dog", "another"} <= set(words)
    for word, prompt in words.items():
        first = fast.convert_ids_to_tokens(fast(prompt)["input_ids"][0])
        assert first.removeprefix("Ġ") == word and word.isalpha()


def test_random_topk_sae_on_minilm(minilm, special):
    """Default config: either valid numbers, or not meaningful with a reason. (MiniLM layer 3
    gives a probe accuracy near 0.25, so in practice the latter.)"""
    torch.manual_seed(0)
    sae = build_sae(REGISTRY["topk"].config_class(name="topk", d_in=384, width=1024, k=16))
    out = absorption(sae, minilm, special, LAYER, CONTEXT, AbsorptionConfig())
    json.dumps(out)
    assert 0.0 <= out["probe_accuracy"] <= 1.0 and out["n_words"] == 3000
    if out["meaningful"]:
        assert 0.0 <= out["mean_full_absorption_rate"] <= 1.0
        assert 0.0 <= out["mean_partial_absorption_fraction"] <= 1.0
        assert 1.0 <= out["mean_split_features"] <= 10.0
    else:
        assert "accuracy" in out["reason"] and "mean_full_absorption_rate" not in out


@pytest.mark.filterwarnings("ignore:The number of unique classes")
def test_guard_withholds_numbers(minilm, special):
    sae = build_sae(REGISTRY["topk"].config_class(name="topk", d_in=384, width=64, k=4))
    out = absorption(sae, minilm, special, LAYER, CONTEXT,
                     AbsorptionConfig(max_words=1500, min_probe_accuracy=1.01))
    assert out["meaningful"] is False and f"{out['probe_accuracy']:.3f}" in out["reason"]
    assert "mean_full_absorption_rate" not in out and "per_letter" not in out
    few = absorption(sae, minilm, special, LAYER, CONTEXT,
                     AbsorptionConfig(max_words=40, min_probe_accuracy=0.0))
    assert few["meaningful"] is False and "letters have >= 5 test words" in few["reason"]
    assert "mean_split_features" not in few


def probe_sae(data, probe, absorbed_words: list[int]):
    """k = 1 TopK SAE: latent i has the probe's letter-i row as encoder (pre = logit + c, so
    it wins exactly where the probe predicts i) and its unit direction as decoder. One extra
    latent per word in `absorbed_words` fires on that word alone (a linear detector along
    its centred activation, with a threshold between it and every other word) and decodes
    to the word's letter direction: the letter latent is silent there, absorbed."""
    finite = np.isfinite(probe.b)
    b = np.where(finite, probe.b, 0.0)
    logits = data.x @ probe.W.T + b
    reach = np.abs(logits[:, finite]).max() + 1.0
    mu = data.x.mean(0)
    enc, bias = [probe.W.T], [np.where(finite, b + 3 * reach, -1e9)]
    dec = [probe.W / np.maximum(np.linalg.norm(probe.W, axis=1, keepdims=True), 1e-12)]
    for w in absorbed_words:
        v = (data.x[w] - mu) / np.linalg.norm(data.x[w] - mu)
        proj = (data.x - mu) @ v
        margin = proj[w] - np.delete(proj, w).max()
        assert margin > 0
        gain = 2 * reach / (margin / 2)
        enc.append(gain * v[:, None])
        bias.append(np.array([3 * reach - gain * (mu @ v + proj[w] - margin / 2)]))
        dec.append(dec[0][data.y[w]][None])
    W_enc, b_enc, W_dec = np.concatenate(enc, 1), np.concatenate(bias), np.concatenate(dec)
    sae = build_sae(REGISTRY["topk"].config_class(name="topk", d_in=384, width=len(W_dec), k=1))
    with torch.no_grad():
        for name, value in (("W_enc", W_enc), ("b_enc", b_enc), ("W_dec", W_dec)):
            getattr(sae, name).copy_(torch.from_numpy(value).float())
        sae.b_dec.zero_()
    return sae


@pytest.fixture(scope="module")
def probed(minilm, special):
    """The words and activations absorption() will see, the same probe, and the test words
    that probe classifies correctly."""
    data = first_letter_data(minilm, special, LAYER, CONTEXT, SMALL)
    test = np.flatnonzero(data.is_test)
    probe = fit_probe(data.x[~data.is_test], data.y[~data.is_test], SMALL.probe_C)
    return data, probe, test[probe.predict(data.x[test]) == data.y[test]]


def test_probe_aligned_sae_has_no_absorption(minilm, special, probed):
    data, probe, _ = probed
    out = absorption(probe_sae(data, probe, []), minilm, special, LAYER, CONTEXT, SMALL)
    json.dumps(out)
    assert out["meaningful"] and out["n_letters_scored"] >= 13
    for c, r in out["per_letter"].items():
        assert r["main_latents"] == [LETTERS.index(c)] and r["absorbed"] == 0
    assert out["mean_full_absorption_rate"] == 0.0 and out["mean_split_features"] == 1.0
    assert out["mean_partial_absorption_fraction"] == 0.0


def test_absorbing_latents_are_counted(minilm, special, probed):
    """Every other correctly classified test word of each letter gets its own absorber."""
    data, probe, right = probed
    absorbed = {i: right[data.y[right] == i][::2] for i in range(26)}
    sae = probe_sae(data, probe, [w for ws in absorbed.values() for w in ws])
    out = absorption(sae, minilm, special, LAYER, CONTEXT, SMALL)
    assert out["meaningful"] and out["mean_split_features"] == 1.0
    for c, r in out["per_letter"].items():
        i = LETTERS.index(c)
        n_right = int((data.y[right] == i).sum())
        assert r["main_latents"] == [i] and r["probe_correct"] == n_right
        assert r["absorbed"] == len(absorbed[i])
        if n_right:
            assert r["full_absorption_rate"] == pytest.approx(len(absorbed[i]) / n_right)
            assert 0 <= r["partial_absorption_fraction"] <= r["full_absorption_rate"] + 1e-9
        else:
            assert r["full_absorption_rate"] is None
    assert out["mean_full_absorption_rate"] >= 0.5


def test_only_letters_the_probe_gets_right_often_enough_are_scored(minilm, special, probed):
    data, probe, _ = probed
    sae = probe_sae(data, probe, [])
    every = absorption(sae, minilm, special, LAYER, CONTEXT, SMALL)
    config = AbsorptionConfig(max_words=1500, min_probe_accuracy=0.0, min_letter_f1=0.3,
                              min_letters=1)
    filtered = absorption(sae, minilm, special, LAYER, CONTEXT, config)
    kept = {c for c, r in every["per_letter"].items() if r["probe_f1"] > 0.3}
    assert set(filtered.get("per_letter", {})) == kept
    assert filtered["n_letters_scored"] == len(kept) < every["n_letters_scored"]


def test_absorption_fraction_follows_saebench_rule_case_by_case():
    """Latents: 0 the main one, 1-4 others; unit decoders; probe direction u = e0."""
    from posae.eval.absorption import absorption_fraction

    u = np.eye(4)[0]
    W_dec = np.array([[1, 0, 0, 0], [1, 0, 0, 0], [0.8, 0.6, 0, 0], [0.05, 0.99875, 0, 0],
                      [1, 0, 0, 0]], dtype=float)
    x = np.array([[2.0, 0, 0, 0]] * 5)  # input projection P = 2
    f = np.array([[2.5, 1, 0, 0, 0],    # main covers P: 0
                  [0, 1, 0.5, 0, 0],    # main silent, absorbers 1 + 0.4 >= 0.8: 1
                  [1, 0.9, 0, 0, 0],    # A = 0.9 >= 0.8, a = min(0.9, 2 - 1): 0.9 / 1.9
                  [1, 0, 0, 5, 0],      # only absorber has cos 0.05 < 0.1: 0
                  [1, 0.2, 0, 0, 0.3]])  # A = 0.5 < 0.4 P = 0.8: 0
    cfg = AbsorptionConfig()
    got = absorption_fraction(f, x, [0], W_dec, u, cfg)
    np.testing.assert_allclose(got, [0, 1, 0.9 / 1.9, 0, 0])
