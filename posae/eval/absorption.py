"""Feature absorption on the first-letter task (Chanin et al. 2024, "A is for Absorption",
as SAEBench implements it), on the model's own vocabulary, without in-context examples.

1. Words: single-token, purely alphabetic vocabulary entries (≥ 2 letters once the
   word-start marker, GPT-2's 'Ġ' or SentencePiece's '▁', is stripped; wordpiece '##'
   continuations skipped), kept only where the prompt's first token is the whole word.
   Seeded shuffle, capped at `max_words`, split train/test.
2. Activations: each word in `template` ("{word} has the first letter:"), the residual
   stream after block `layer` at the word's token (the first token of the text).
3. Ground truth: a multinomial logistic probe on the raw activations (26 letters); its
   test accuracy and macro F1 are reported, its weight row per letter is the letter's
   direction.
4. Main latents per letter (k-sparse probing): latents ranked by mean code on the letter's
   train words minus on the others; the top k are kept while the test F1 of a balanced
   logistic probe on them rises by more than `f1_jump` per added latent (k ≤ `max_k`,
   k = 1 always). Split features = the number of main latents (SAEBench's
   `num_split_features` is this minus one; SAEBench ranks latents by an L1 probe instead).
5. Absorption (SAEBench's full absorption): a test word of the letter that the probe
   classifies correctly is absorbed when no main latent fires and some other active latent
   with decoder cosine ≥ `cos_threshold` to the letter's direction u contributes
   f_j (W_dec,j · u) ≥ `projection_fraction` × Σ_i f_i (W_dec,i · u), the probe
   projection of the reconstruction without b_dec (SAEBench divides by that of the input).
   Full absorption rate = absorbed / correctly classified test words of the letter.
   Absorption fraction (SAEBench's partial absorption, Till's rule), per correctly
   classified word, with latent projections p_i = f_i cos(W_dec,i, u), the main latents'
   M = Σ_main p_j, the input's P = x · u, and A the sum of the 3 largest positive p_i of
   other latents with cos ≥ `fraction_cos_threshold` (0.1): 0 if M ≥ P or A < 0.4 P;
   1 if M ≤ 0; else a/(a + M) with a = min(A, P − M). Averaged over the letter's words.
6. Letters scored: at least `min_test_words` test words and a per-letter probe F1 (one
   letter against the rest, on the test words) above `min_letter_f1` = 0.6, as SAEBench
   filters them. Guard: with a probe below `min_probe_accuracy` or fewer than `min_letters`
   scored letters, no absorption number is returned, only the reason.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from posae.data.sequences import SpecialTokens
from posae.eval.text_inputs import text_batches
from posae.models.lm import LanguageModel
from posae.sae.base import SAE

LETTERS = string.ascii_lowercase
WORD_START_MARKERS = ("Ġ", "▁")
FIRES = 1e-8  # a latent "fires" above this activation (SAEBench's EPS)


@dataclass
class AbsorptionConfig:
    template: str = "{word} has the first letter:"
    max_words: int = 3000
    test_fraction: float = 0.3
    seed: int = 0
    batch_size: int = 128
    probe_C: float = 0.1          # inverse L2 strength of the raw probe (standardised inputs)
    max_k: int = 10               # most main latents per letter
    f1_jump: float = 0.03         # tau: F1 gain needed to add a latent
    cos_threshold: float = 0.025  # decoder-probe cosine of an absorbing latent
    projection_fraction: float = 0.4
    min_probe_accuracy: float = 0.6
    min_letter_f1: float = 0.6    # a letter is scored only when the probe's F1 on it is above
    fraction_cos_threshold: float = 0.1  # decoder-probe cosine of a partial absorber
    fraction_max_absorbers: int = 3
    min_test_words: int = 5       # a letter is scored with at least this many test words
    min_letters: int = 13         # ... and the result is meaningful with this many letters


def vocab_words(tokenizer, template: str = AbsorptionConfig.template,
                min_length: int = 2) -> list[tuple[str, str]]:
    """(word, prompt) for each single-token alphabetic word, in vocabulary-id order. The
    prompt is `template` with the word (or " word" where only that is one token), and its
    first token is the word itself."""
    skip = set(tokenizer.all_special_tokens)
    words: dict[str, None] = {}
    for tok, _ in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        if tok in skip or tok.startswith("##"):
            continue
        word = tok[1:] if tok[:1] in WORD_START_MARKERS else tok
        if len(word) >= min_length and word.isascii() and word.isalpha():
            words[word] = None
    found: dict[str, str] = {}
    for spelled in (lambda w: w, lambda w: " " + w):
        todo = [w for w in words if w not in found]
        prompts = [template.format(word=spelled(w)) for w in todo]
        firsts = [ids[0] if ids else None for ids in
                  tokenizer(prompts, add_special_tokens=False)["input_ids"]] if todo else []
        for w, p, first in zip(todo, prompts, firsts):
            tok = tokenizer.convert_ids_to_tokens(first) if first is not None else ""
            if (tok[1:] if tok[:1] in WORD_START_MARKERS else tok) == w:
                found[w] = p
    return [(w, found[w]) for w in words if w in found]


@dataclass
class FirstLetterData:
    words: list[str]     # train words, then test words
    y: np.ndarray        # [N] letter index
    is_test: np.ndarray  # [N] bool
    x: np.ndarray        # [N, d] raw activations at the word
    f: np.ndarray | None  # [N, d_sae] SAE codes at the word (with an SAE)


@torch.no_grad()
def first_letter_data(lm: LanguageModel, special: SpecialTokens, layer: int, context_size: int,
                      cfg: AbsorptionConfig, sae: SAE | None = None) -> FirstLetterData:
    """Steps 1-2: the seeded word sample and its activations (and codes) at the word."""
    pairs = vocab_words(lm.tokenizer, cfg.template)
    order = np.random.default_rng(cfg.seed).permutation(len(pairs))[: cfg.max_words]
    words, prompts = [pairs[i][0] for i in order], [pairs[i][1] for i in order]
    n_test = round(len(words) * cfg.test_fraction)
    longest = max(map(len, lm.tokenizer(prompts, add_special_tokens=False)["input_ids"]))
    T = min(context_size, longest + len(special.prefix) + len(special.suffix))
    xs, fs = [], []
    device = next(sae.parameters()).device if sae is not None else None
    for b in text_batches(lm, special, prompts, layer, T, cfg.batch_size):
        rows, first = torch.arange(len(b.x)), b.mask.int().argmax(1)  # first text token
        xs.append(b.x[rows, first].cpu())
        if sae is not None:
            f = sae.encode(b.x.to(device), b.pos.to(device), b.mask.to(device))
            fs.append(f[rows.to(device), first.to(device)].float().cpu())
    y = np.array([LETTERS.index(w[0].lower()) for w in words])
    is_test = np.arange(len(words)) >= len(words) - n_test
    return FirstLetterData(words, y, is_test, torch.cat(xs).double().numpy(),
                           torch.cat(fs).double().numpy() if fs else None)


@dataclass
class LetterProbe:
    W: np.ndarray  # [26, d] raw-space weights (zero for letters absent from training)
    b: np.ndarray  # [26]

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.argmax(x @ self.W.T + self.b, axis=1)


def fit_probe(x: np.ndarray, y: np.ndarray, C: float = AbsorptionConfig.probe_C) -> LetterProbe:
    """Step 3: multinomial logistic regression on standardised activations, mapped back to
    raw space (w = coef / σ, b = intercept − w · μ)."""
    mu, sigma = x.mean(0), x.std(0)
    sigma[sigma == 0] = 1.0
    lr = LogisticRegression(C=C, max_iter=2000).fit((x - mu) / sigma, y)
    W, b = np.zeros((len(LETTERS), x.shape[1])), np.full(len(LETTERS), -np.inf)
    coef = lr.coef_ if len(lr.classes_) > 2 else np.stack([-lr.coef_[0], lr.coef_[0]]) / 2
    icpt = lr.intercept_ if len(lr.classes_) > 2 else np.array([-1, 1]) * lr.intercept_[0] / 2
    W[lr.classes_] = coef / sigma
    b[lr.classes_] = icpt - W[lr.classes_] @ mu
    return LetterProbe(W, b)


def main_latents(f_train, pos_train, f_test, pos_test, cfg: AbsorptionConfig):
    """Step 4: the letter's main latents and the test F1 of each k tried."""
    diff = f_train[pos_train].mean(0) - f_train[~pos_train].mean(0)
    ranked = np.argsort(-diff, kind="stable")[: cfg.max_k]
    best, chosen, f1s = -np.inf, ranked[:1], []
    for k in range(1, len(ranked) + 1):
        ids = ranked[:k]
        clf = make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced",
                                                                 max_iter=500))
        clf.fit(f_train[:, ids], pos_train)
        f1s.append(float(f1_score(pos_test, clf.predict(f_test[:, ids]), zero_division=0)))
        if f1s[-1] <= best + cfg.f1_jump:
            break
        best, chosen = f1s[-1], ids
    return [int(i) for i in chosen], f1s


def absorbed_words(f: np.ndarray, main: list[int], W_dec: np.ndarray, u: np.ndarray,
                   cfg: AbsorptionConfig) -> np.ndarray:
    """Step 5 on codes f [n, d_sae] of words the probe gets right: which are absorbed."""
    proj = W_dec @ u
    cos = proj / np.maximum(np.linalg.norm(W_dec, axis=1), 1e-12)
    contrib = f * proj
    total = contrib.sum(1, keepdims=True)
    other = np.ones(len(W_dec), bool)
    other[main] = False
    absorber = (f > FIRES) & other & (cos >= cfg.cos_threshold) & (
        contrib >= cfg.projection_fraction * total)
    return ~(f[:, main] > FIRES).any(1) & (total[:, 0] > 0) & absorber.any(1)


def absorption_fraction(f: np.ndarray, x: np.ndarray, main: list[int], W_dec: np.ndarray,
                        u: np.ndarray, cfg: AbsorptionConfig) -> np.ndarray:
    """Per word (codes f [n, d_sae], inputs x [n, d]): SAEBench's absorption fraction, the
    part of the input's probe projection that up to 3 aligned latents other than the main
    ones carry instead of them (module docstring, step 5)."""
    cos = (W_dec @ u) / np.maximum(np.linalg.norm(W_dec, axis=1), 1e-12)
    projection = f * cos
    by_main, by_input = projection[:, main].sum(1), x @ u
    other = np.ones(len(W_dec), bool)
    other[main] = False
    candidates = np.where(other & (cos >= cfg.fraction_cos_threshold) & (projection > 0),
                          projection, 0.0)
    k = min(cfg.fraction_max_absorbers, candidates.shape[1])
    absorbers = -np.sort(-candidates, axis=1)[:, :k].sum(1)
    absorbed = np.minimum(absorbers, by_input - by_main)
    with np.errstate(invalid="ignore", divide="ignore"):
        fraction = np.clip(absorbed / (absorbed + by_main), 0.0, 1.0)
        enough = absorbers >= cfg.projection_fraction * by_input
    fraction = np.where(by_main <= 0, 1.0, fraction)
    return np.where((by_main >= by_input) | ~enough, 0.0, fraction)


def absorption(sae: SAE, lm: LanguageModel, special: SpecialTokens, layer: int,
               context_size: int, cfg: AbsorptionConfig = AbsorptionConfig()) -> dict:
    """First-letter absorption of `sae` (acting on raw activations after block `layer`)."""
    was_training = sae.training
    sae.eval()
    try:
        data = first_letter_data(lm, special, layer, context_size, cfg, sae)
    finally:
        sae.train(was_training)
    tr, te = ~data.is_test, data.is_test
    probe = fit_probe(data.x[tr], data.y[tr], cfg.probe_C)
    pred = probe.predict(data.x[te])
    acc = float((pred == data.y[te]).mean())
    out = {"probe_accuracy": acc, "probe_f1": float(f1_score(data.y[te], pred, average="macro")),
           "n_words": len(data.words), "n_test_words": int(te.sum())}
    n_test = np.bincount(data.y[te], minlength=26)
    n_train = np.bincount(data.y[tr], minlength=26)
    letter_f1 = f1_score(data.y[te], pred, labels=list(range(26)), average=None,
                         zero_division=0)
    scored = [i for i in range(26) if n_test[i] >= cfg.min_test_words and n_train[i] > 0
              and letter_f1[i] > cfg.min_letter_f1]
    out["n_letters_scored"] = len(scored)
    if acc < cfg.min_probe_accuracy or len(scored) < cfg.min_letters:
        return {"meaningful": False, **out, "reason": (
            f"first-letter probe test accuracy {acc:.3f} (needs {cfg.min_probe_accuracy}); "
            f"{len(scored)} letters have >= {cfg.min_test_words} test words and probe F1 > "
            f"{cfg.min_letter_f1} (needs {cfg.min_letters}) among {len(data.words)} "
            f"single-token words")}
    W_dec = sae.W_dec.detach().double().cpu().numpy()
    f_tr, f_te, y_te = data.f[tr], data.f[te], data.y[te]
    per_letter = {}
    for i in scored:
        main, f1s = main_latents(f_tr, data.y[tr] == i, f_te, y_te == i, cfg)
        right = (y_te == i) & (pred == i)
        u = probe.W[i] / np.linalg.norm(probe.W[i])
        absorbed = int(absorbed_words(f_te[right], main, W_dec, u, cfg).sum())
        partial = absorption_fraction(f_te[right], data.x[te][right], main, W_dec, u, cfg)
        per_letter[LETTERS[i]] = {
            "n_train": int(n_train[i]), "n_test": int(n_test[i]),
            "probe_f1": float(letter_f1[i]),
            "probe_correct": int(right.sum()), "main_latents": main,
            "split_features": len(main), "f1_by_k": f1s, "absorbed": absorbed,
            "full_absorption_rate": absorbed / int(right.sum()) if right.any() else None,
            "partial_absorption_fraction": float(partial.mean()) if right.any() else None}

    def mean_of(key):
        values = [v[key] for v in per_letter.values() if v[key] is not None]
        return float(np.mean(values)) if values else None

    return {"meaningful": True, **out,
            "mean_full_absorption_rate": mean_of("full_absorption_rate"),
            "mean_partial_absorption_fraction": mean_of("partial_absorption_fraction"),
            "mean_split_features": float(np.mean([v["split_features"]
                                                  for v in per_letter.values()])),
            "per_letter": per_letter}
