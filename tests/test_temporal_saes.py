"""The published temporal SAEs and their base (docs/variants.md, "Published temporal SAEs"):
Matryoshka BatchTopK (Bussmann et al. 2025), T-SAE (Bhalla et al. 2025) and the Temporal
SAE of "Priors in Time" (Lubana et al. 2025), on small hand-checkable tensors."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from posae.losses.base import StepContext
from posae.losses.contrastive import AdjacentInfoNCE
from posae.losses.reconstruction import PrefixMSE
from posae.sae import build_sae
from posae.sae.matryoshka import MatryoshkaConfig
from posae.training.batches import Batch

D_IN, D_SAE = 16, 40


def matryoshka(fractions=(0.25, 0.5, 1.0)):
    torch.manual_seed(0)
    return build_sae(MatryoshkaConfig(name="matryoshka_batchtopk", d_in=D_IN, width=D_SAE, k=6,
                                      prefix_fractions=list(fractions)))


def batch_of(x, mask=None, pos=None):
    b, t = x.shape[:2]
    pos = torch.arange(t).expand(b, t) if pos is None else pos
    mask = torch.ones(b, t, dtype=torch.bool) if mask is None else mask
    return Batch(x, pos, mask, torch.zeros(b, t, dtype=torch.long))


@pytest.mark.parametrize("training", [True, False])
def test_matryoshka_prefix_reconstructions_are_the_truncated_dense_decodes(training):
    """x̂_{m_i} = f[:m_i] W_dec[:m_i] + b_dec for m = 10, 20 (and 40, the x̂ itself), from
    BatchTopK's sparse selection in training and from the dense codes at inference."""
    sae = matryoshka().train(training)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.threshold.fill_(0.1)
    torch.manual_seed(1)
    x = torch.randn(3, 5, D_IN)
    out = sae(x, torch.arange(5).expand(3, 5))
    assert sae.cfg.prefix_widths == [10, 20, 40]
    assert out.extras["prefix_x_hats"].shape == (2, 3, 5, D_IN)
    for i, m in enumerate([10, 20]):
        torch.testing.assert_close(out.extras["prefix_x_hats"][i],
                                   out.f[..., :m] @ sae.W_dec[:m] + sae.b_dec)
    torch.testing.assert_close(out.x_hat, out.f @ sae.W_dec + sae.b_dec)


def test_prefix_mse_sums_the_inner_prefix_errors_over_counted_tokens():
    sae = matryoshka().train()
    x = torch.randn(2, 4, D_IN)
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[1, 3] = False
    out = sae(x, torch.arange(4).expand(2, 4), mask)
    ctx = StepContext(step=0, n_tokens=7.0, sae=sae, dead=torch.zeros(D_SAE, dtype=bool))
    expected = sum(((x - (out.f[..., :m] @ sae.W_dec[:m] + sae.b_dec)) ** 2).sum(-1)[mask].sum()
                   for m in (10, 20)) / 7
    torch.testing.assert_close(PrefixMSE()(out, batch_of(x, mask), ctx), expected)


@pytest.mark.parametrize("fractions", [[0.5], [0.5, 0.2, 1.0], [0.01, 1.0]])
def test_matryoshka_refuses_prefixes_that_do_not_nest(fractions):
    from posae.config import ConfigError

    with pytest.raises(ConfigError, match="variant.prefix_fractions"):
        MatryoshkaConfig(name="m", d_in=D_IN, width=D_SAE, k=4,
                         prefix_fractions=fractions).validate()


class Codes:
    """An SAE output whose codes are given."""

    def __init__(self, f):
        self.f = f


def one_hot_codes(rows: list[list[int]], width: int = 10) -> torch.Tensor:
    """[B, T, width] codes, token (b, t) the unit vector e_{rows[b][t]} (scaled by 3, which
    cosine similarity ignores)."""
    f = torch.zeros(len(rows), len(rows[0]), width)
    for b, row in enumerate(rows):
        for t, latent in enumerate(row):
            f[b, t, latent] = 3.0
    return f


def infonce_context(n_tokens: float) -> StepContext:
    """A step context whose SAE has 10 latents, the first Matryoshka prefix 5 of them."""
    sae = build_sae(MatryoshkaConfig(name="matryoshka_batchtopk", d_in=D_IN, width=10, k=2,
                                     prefix_fractions=[0.5, 1.0]))
    return StepContext(step=0, n_tokens=n_tokens, sae=sae, dead=None)


def test_adjacent_infonce_hand_computed():
    """Three pairs, one per sequence, each token's high-level code (the first prefix,
    latents 0-4 of 10) the same as its neighbour's and orthogonal to the others': every
    anchor's positive has cosine 1 and its two negatives 0, so each of the 3 anchors of each
    direction adds -log(e / (e + 2)); the sum is divided by the 6 counted tokens."""
    f = one_hot_codes([[0, 0], [1, 1], [2, 2]])
    ctx = infonce_context(6.0)
    loss = AdjacentInfoNCE()(Codes(f), batch_of(f), ctx)
    torch.testing.assert_close(loss, torch.tensor(2 * 3 * -math.log(math.e / (math.e + 2)) / 6))
    # only the high-level half counts: moving every code to the low-level half (latent 5+)
    # leaves all-zero high-level codes, cosine 0 everywhere, so -log(1/3) per anchor
    low = one_hot_codes([[5, 5], [6, 6], [7, 7]])
    loss = AdjacentInfoNCE()(Codes(low), batch_of(low), ctx)
    torch.testing.assert_close(loss, torch.tensor(2 * 3 * math.log(3) / 6))
    # an explicit fraction overrides the prefix: the first 8 latents hold e5, e6, e7 too
    loss = AdjacentInfoNCE(high_level_fraction=0.8)(Codes(low), batch_of(low), ctx)
    torch.testing.assert_close(loss, torch.tensor(2 * 3 * -math.log(math.e / (math.e + 2)) / 6))


def test_adjacent_infonce_pairs_stay_inside_a_sequence_and_skip_uncounted_tokens():
    """Sequence 0 holds pairs (0,1) and (1,2), sequence 1 the pair (0,1) only: its token 2 is
    not counted. Same-sequence negatives are left out by default, so pair (0,1) of sequence
    0 sees one negative (sequence 1's); with them in, two."""
    f = one_hot_codes([[0, 0, 0], [1, 1, 4]])
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[1, 2] = False
    ctx = infonce_context(5.0)
    # pairs: a=(seq0, 0→1), b=(seq0, 1→2), c=(seq1, 0→1); a and b share codes e0, c is e1
    # default: a's negatives {c} → -log(e/(e+1)); same for b; c's negatives {a, b} → e/(e+2)
    per_direction = -(2 * math.log(math.e / (math.e + 1)) + math.log(math.e / (math.e + 2)))
    loss = AdjacentInfoNCE()(Codes(f), batch_of(f, mask), ctx)
    torch.testing.assert_close(loss, torch.tensor(2 * per_direction / 5))
    # with same-sequence negatives, a's negatives {b, c}, b cosine 1: e/(2e + 1)
    with_same = -(2 * math.log(math.e / (2 * math.e + 1)) + math.log(math.e / (math.e + 2)))
    loss = AdjacentInfoNCE(same_sequence_negatives=True)(Codes(f), batch_of(f, mask), ctx)
    torch.testing.assert_close(loss, torch.tensor(2 * with_same / 5))


def test_adjacent_infonce_dot_similarity_uses_the_raw_codes():
    f = one_hot_codes([[0, 0], [1, 1]])  # positives 9, negatives 0
    loss = AdjacentInfoNCE(similarity="dot")(Codes(f), batch_of(f), infonce_context(4.0))
    expected = 2 * 2 * -math.log(math.exp(9) / (math.exp(9) + 1)) / 4
    torch.testing.assert_close(loss, torch.tensor(expected))


def test_adjacent_infonce_refuses_a_share_of_the_batch_with_one_sequence():
    """Without same-sequence negatives, one sequence leaves no anchor a negative: refused,
    naming the settings, instead of a silent zero."""
    f = one_hot_codes([[0, 0, 1]])
    with pytest.raises(ValueError, match="trainer.micro_batches"):
        AdjacentInfoNCE()(Codes(f), batch_of(f), infonce_context(3.0))


def test_temporal_infonce_without_a_fraction_needs_matryoshka_prefixes():
    """The config check names the term and the variants that have prefixes, before any
    cache is opened."""
    from conftest import compose_config

    from posae.config import ConfigError
    from posae.train import plan_training

    cfg = compose_config(overrides=["variant=batchtopk", "loss=[mse,auxk,temporal_infonce]"])
    with pytest.raises(ConfigError, match="loss.temporal_infonce .*matryoshka_batchtopk"):
        plan_training(cfg)
    plan_training(compose_config(overrides=["variant=batchtopk", "loss=[mse,auxk,temporal_infonce]",
                                            "loss.temporal_infonce.high_level_fraction=0.2"]))


def temporal(k=4, layers=1, bottleneck=2):
    from posae.sae.temporal import TemporalConfig

    torch.manual_seed(0)
    return build_sae(TemporalConfig(name="temporal_sae", d_in=D_IN, width=32, k=k,
                                    n_attn_layers=layers, n_heads=4,
                                    bottleneck_factor=bottleneck, normalize_decoder=False,
                                    decoder_init="standard_normal"))


@pytest.mark.parametrize("k,layers", [(4, 1), (8, 2)])
def test_temporal_sae_loads_in_saelens_with_the_same_codes_and_reconstruction(k, layers,
                                                                            tmp_path):
    """The installed sae-lens's `temporal` class, loading what posae writes, gives posae's
    novel codes, predicted codes and full reconstruction, after the input scale was folded
    (trained on 3·x) and with a non-zero b_dec and attention biases."""
    import sae_lens

    from posae.sae import save_sae

    sae = temporal(k, layers)
    with torch.no_grad():
        sae.b_dec.normal_()
        for p in sae.attn_layers.parameters():
            p.add_(0.1 * torch.randn_like(p))
    sae.fold_input_scale_(3.0)
    sae.eval()
    save_sae(sae, tmp_path, {"layer": 3, "model": {"name": "minilm"}})
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path))
    assert type(theirs).__name__ == "TemporalSAE"
    assert theirs.cfg.metadata.hook_name == "blocks.3.hook_resid_post"
    x = 5 * torch.randn(2, 9, D_IN)
    ours = sae(x)
    novel, predicted = theirs.encode_with_predictions(x)
    torch.testing.assert_close(novel, ours.f, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(predicted, ours.extras["predicted_codes"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(theirs(x), ours.x_hat, atol=1e-5, rtol=1e-5)
    assert ours.extras["predicted_codes"].abs().sum() > 0


def test_temporal_sae_predicts_from_the_past_only():
    """Changing token 5 changes no code before it (the attention is causal over the shifted
    past); at position 0 the prediction reads only the zero slot, so it is the same for any
    first token's context."""
    sae = temporal().eval()
    x = torch.randn(1, 8, D_IN)
    changed = x.clone()
    changed[0, 5] += 3.0
    a, b = sae(x), sae(changed)
    pa, pb = a.extras["predicted_codes"], b.extras["predicted_codes"]
    torch.testing.assert_close(a.f[:, :5], b.f[:, :5])
    torch.testing.assert_close(pa[:, :5], pb[:, :5])
    assert not torch.allclose(pa[:, 6:], pb[:, 6:])


def test_temporal_sae_never_attends_to_tokens_outside_the_mask():
    """A token outside the mask changes no other token's codes: changing it gives the same
    codes elsewhere; with every token counted, the mask changes nothing."""
    sae = temporal().eval()
    x = torch.randn(2, 8, D_IN)
    mask = torch.ones(2, 8, dtype=torch.bool)
    torch.testing.assert_close(sae(x, None, mask).x_hat, sae(x).x_hat)
    mask[0, 3] = False
    changed = x.clone()
    changed[0, 3] += 10.0
    a, b = sae(x, None, mask), sae(changed, None, mask)
    keep = torch.ones(8, dtype=torch.bool)
    keep[3] = False
    torch.testing.assert_close(a.f[0, keep], b.f[0, keep])
    torch.testing.assert_close(a.x_hat[1], b.x_hat[1])


def test_temporal_sae_documents_of_a_packed_sequence_do_not_see_each_other():
    """Token 4 is a document separator (not counted): the codes of tokens 5-7 are the same
    whatever the first document holds, and the same as those of the second document alone
    (at the start of a sequence)."""
    sae = temporal().eval()
    x = torch.randn(1, 8, D_IN)
    mask = torch.ones(1, 8, dtype=torch.bool)
    mask[0, 4] = False
    other = x.clone()
    other[0, :4] = torch.randn(4, D_IN)
    a, b = sae(x, None, mask), sae(other, None, mask)
    torch.testing.assert_close(a.x_hat[0, 5:], b.x_hat[0, 5:])
    alone = sae(x[:, 5:])
    torch.testing.assert_close(a.x_hat[0, 5:], alone.x_hat[0], atol=1e-5, rtol=1e-5)


def test_temporal_sae_prediction_is_the_least_squares_projection():
    """With one layer, the predicted reconstruction D z_p is the projection of (x - b)·s on
    the attention's direction a D: the remainder is orthogonal to it."""
    sae = temporal().eval()
    x = torch.randn(2, 6, D_IN)
    out = sae(x)
    r0 = (x - sae.b_dec) * sae.input_scale
    predicted = out.extras["predicted_codes"] @ sae.W_dec
    residual = r0 - predicted
    cosine = torch.nn.functional.cosine_similarity(residual, predicted, dim=-1)
    assert cosine.abs().max() < 1e-4


def test_resampling_a_temporal_sae_is_refused_before_any_compute():
    from conftest import compose_config

    from posae.config import ConfigError
    from posae.train import plan_training

    cfg = compose_config(overrides=["variant=temporal_sae", "trainer.resample_every=10"])
    with pytest.raises(ConfigError, match="trainer.resample_every=10: variant=temporal_sae"):
        plan_training(cfg)


def test_smoothness_hand_computed():
    """One sequence of 3 tokens, steps ‖x1 − x0‖ = 1 and ‖x2 − x1‖ = 2. Latent 0 goes
    0, 2, 2: peak 2/1 = 2; latent 1 stays 1: peak 0; latent 2 never fires: left out. S = 1.
    Group `high` (latent 0 only) = 2, `low` (latents 1, 2) = 0."""
    from posae.eval.smoothness import sequence_smoothness
    from posae.losses.temporal import valid_pairs

    f = torch.tensor([[[0.0, 1, 0], [2, 1, 0], [2, 1, 0]]])
    x = torch.tensor([[[0.0, 0], [1, 0], [1, 2]]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    pairs = valid_pairs(mask, torch.arange(3)[None])
    assert sequence_smoothness(f, x, mask, pairs, (0, 3)) == [1.0]
    assert sequence_smoothness(f, x, mask, pairs, (0, 1)) == [2.0]
    assert sequence_smoothness(f, x, mask, pairs, (1, 3)) == [0.0]
    # token 2 not counted: only the pair (0, 1) remains, and latent 0's peak is still 2
    mask[0, 2] = False
    pairs = valid_pairs(mask, torch.arange(3)[None])
    assert sequence_smoothness(f, x, mask, pairs, (0, 1)) == [2.0]


def test_sequence_measurements_report_groups_shares_and_their_chance():
    """A Matryoshka SAE reports high, low and all; a Temporal SAE also the predicted/novel
    split, whose parts add up to its reconstruction; shuffling changes the chance values."""
    from posae.eval.smoothness import sequence_measurements

    torch.manual_seed(2)
    x = torch.randn(4, 12, D_IN).cumsum(1)  # a slowly drifting sequence
    batches = [batch_of(x[:2]), batch_of(x[2:])]
    result = sequence_measurements(matryoshka().eval(), batches)
    assert set(result) == {"smoothness"} and result["smoothness"]["sequences"] == 4
    assert result["smoothness"]["groups"] == {"high": [0, 10], "low": [10, 40], "all": [0, 40]}
    assert result["smoothness"]["all"] != result["smoothness"]["all_chance"]
    sae = temporal().eval()
    split = sequence_measurements(sae, batches)["predicted_novel"]
    assert 0 < split["norm_share_predicted"] < 1
    assert split["norm_share_predicted"] != split["norm_share_predicted_chance"]
    out = sae(x)
    parts = sae.decode(out.extras["predicted_codes"]) + sae.decode(out.f) - sae.b_dec
    torch.testing.assert_close(parts, out.x_hat)


def test_word_classes_label_whole_closed_class_words_only(minilm):
    """MiniLM's WordPiece: "the" and "is" are labelled; "theory" (one token) is no class
    word, and a word split into pieces is never labelled, even when its first piece is a
    class word ("itertools" → it ##ert ##ool ##s, "isinstance" → is ##ins ##tance)."""
    from posae.eval.word_class import word_class_labels

    tokenizer = minilm.tokenizer
    ids = tokenizer("the theory is and it itertools isinstance",
                    add_special_tokens=False)["input_ids"]
    pieces = tokenizer.convert_ids_to_tokens(ids)
    assert pieces[:8] == ["the", "theory", "is", "and", "it", "it", "##ert", "##ool"]
    labels = list(word_class_labels(tokenizer, np.asarray(ids)))
    assert labels[:5] == ["determiner", "", "auxiliary", "conjunction", "pronoun"]
    assert labels[5:] == [""] * (len(pieces) - 5)


def test_word_class_probing_finds_a_planted_class_in_its_own_group():
    """Codes where latent 0 (high group) fires exactly on class-A tokens: the high group's
    top-1 probe is perfect, the low group's (noise) near chance."""
    from posae.eval.word_class import word_class_probing

    rng = np.random.default_rng(0)
    labels = np.asarray(["determiner", "pronoun"] * 300)
    codes = rng.random((600, 8))
    codes[:, 0] = labels == "determiner"
    out = word_class_probing(codes, codes, labels, {"high": (0, 2), "low": (2, 8),
                                                    "all": (0, 8)}, n_train=400, n_test=200)
    assert out["classes"] == ["determiner", "pronoun"] and out["chance"] == 0.5
    assert out["mean"]["sae_high_top_1_test_accuracy"] == 1.0
    assert out["mean"]["sae_low_top_1_test_accuracy"] < 0.65


def test_predicted_novel_shares_hand_computed():
    """A Temporal SAE whose dictionary is the identity (d = width), so its parts are its
    codes: two tokens with predicted codes (1, 0, …) and (3, 0, …) and novel codes
    (0, 2, …) and (0, 0, …), inputs equal to their reconstruction. Norm share 10 / 14;
    variance ratio of the predicted part 2 / 4 (its mean 2 removed), of the novel part
    2 / 4; and EV of each part alone 1 − 4 / 4 = 0 (predicted) and 1 − 10 / 4 (novel)."""
    from posae.eval.smoothness import SplitSums

    sae = temporal()
    with torch.no_grad():
        sae.W_dec.zero_()
        sae.W_dec[:D_IN] = torch.eye(D_IN)
        sae.input_scale.fill_(1.0)
    predicted, novel = torch.zeros(1, 2, 32), torch.zeros(1, 2, 32)
    predicted[0, :, 0] = torch.tensor([1.0, 3.0])
    novel[0, 0, 1] = 2.0
    with torch.no_grad():
        x = sae.decode(novel, {"predicted_codes": predicted})
    out = SimpleNamespace(f=novel, x_hat=x, extras={"predicted_codes": predicted})
    sums = SplitSums()
    with torch.no_grad():
        sums.add(sae, x, torch.ones(1, 2, dtype=torch.bool), out)
    result = sums.results()
    # x = (1, 2, 0, …) and (3, 0, 0, …): Σ‖x − x̄‖² = 2 + 2 = 4
    assert result["norm_share_predicted"] == pytest.approx(10 / 14)
    assert result["variance_ratio_predicted"] == pytest.approx(2 / 4)
    assert result["variance_ratio_novel"] == pytest.approx(2 / 4)
    assert result["ev_predicted_only"] == pytest.approx(0.0)
    assert result["ev_novel_only"] == pytest.approx(1 - 10 / 4)
    assert result["ev_total"] == pytest.approx(1.0)


@pytest.mark.parametrize("marker,pieces,words", [
    ("##", ["the", "theory", "it", "##ert", ",", "is"], ["the", "theory", None, None, ",", "is"]),
    # GPT-2's byte-level BPE: "Ġthe"+"ory" is "theory", "Ġsp"+"in" is "spin"
    ("Ġ", ["Ġthe", "ory", "Ġsp", "in", "Ġis", ",", "Ġa"],
     [None, None, None, None, "is", ",", "a"]),
    # SentencePiece (Gemma): "▁is"+"olate"
    ("▁", ["▁the", "▁is", "olate", "▁of"], ["the", None, None, "of"]),
])
def test_whole_words_never_label_a_piece_of_a_longer_word(marker, pieces, words):
    from posae.eval.word_class import whole_words

    assert whole_words(pieces, marker) == words


def test_a_trained_temporal_sae_folder_loads_in_saelens(tmp_path):
    """The run's `sae/` folder is one sae-lens loads, with the run's hook and model, and
    reads raw activations as posae's folded SAE does."""
    import sae_lens

    from posae.sae.export import save_folded

    sae = temporal()
    provenance = {"model": {"name": "minilm"}, "layer": 3, "hook": "blocks.3.hook_resid_post",
                  "context_size": 128, "train_on_special_tokens": False}
    final = save_folded(sae, 2.0, tmp_path / "sae", provenance)
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "sae"))
    assert theirs.cfg.metadata.hook_name == "blocks.3.hook_resid_post"
    assert theirs.cfg.metadata.model_name == "minilm"
    x = torch.randn(2, 6, D_IN)
    torch.testing.assert_close(theirs(x), final(x).x_hat, atol=1e-5, rtol=1e-5)
