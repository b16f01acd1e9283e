"""Positional structure of the codes: what the seed papers claim to change.

- Position specificity of latent i: 1 − H(p_i)/log T, with p_i(t) its firing rate at
  position t (integer fire counts over tokens at t) normalised over the T positions. 0 for
  a latent equally likely to fire everywhere, 1 for one that fires at a single position.
  A latent that ignores position still scores above 0 from sampling noise alone (about
  0.45 at 20 fires, 0.08 at 300), so each latent is compared with its null: its n fires
  dealt over positions in proportion to the tokens there (multinomial, `NULL_DRAWS`
  draws). Reported: the null's mean and the corrected specificity (s − s₀)/(1 − s₀).
  "Specialised" needs an effect and its significance: a corrected specificity of at least
  log 4 / log T (an effective number of positions exp(H) ≤ T/4: a quarter of the context
  or less), and a Pearson χ² test of the latent's fires in `n_buckets` equal position
  ranges against the counts the token distribution predicts (B − 1 degrees of freedom;
  only latents that expect at least 5 fires in every range, so that the χ² law holds),
  Benjamini–Hochberg at false-discovery rate `FDR` over the tested latents. Significance
  alone is not enough: a latent seen 7,000 times differs significantly from uniform by a
  few per cent, which every dense latent of a model with learned positions does.
  (Specificity itself has a discrete, heavy-tailed null at few fires, which no smooth law
  fits, hence the separate test.) Caveat: the χ² test treats fires as independent; a latent
  that fires in runs of consecutive tokens is overdispersed and looks significant more
  often than it should (in a simulation of position-blind runs of 20 tokens, 99 % reach
  p < 0.05), so the effect threshold, not the test, decides most cases. The fraction is
  over the tested latents (n ≥ 40 at 8 ranges). Latents with fewer than `MIN_FIRES` fires
  are not scored.
- Clusters of position profiles (001, figure 1): average-linkage hierarchical clustering
  of the profiles p_i of the most active latents under correlation distance; the number
  of clusters is the cut with the best silhouette among 2..max_clusters.
- Position decodability (002's "unlearning score", our reading): accuracy of a
  multinomial logistic probe predicting the position bucket from codes, against the same
  probe on raw activations, split by sequence so no sequence is in both halves.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import pdist, squareform
from scipy.stats import chi2
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import silhouette_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

MIN_FIRES = 20
NULL_DRAWS = 200
FDR = 0.05


def specificity(counts: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """[..., T] fire counts and [T] tokens per position → [...] 1 − H(p)/log T of the
    normalised firing-rate profile (NaN where nothing fired)."""
    rate = counts / tokens
    total = rate.sum(-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = rate / total
        entropy = -np.where(p > 0, p * np.log(p), 0.0).sum(-1)
    return 1 - entropy / np.log(len(tokens))


def position_specificity(fire_counts: np.ndarray, tokens: np.ndarray, n_buckets: int = 8,
                         seed: int = 0) -> dict:
    """Specificity of every latent against its null, from integer fire counts [T, d_sae]
    and counted tokens per position [T] (positions with tokens only). Arrays [d_sae]:
    `specificity`, `null_mean`, `null_sd`, `corrected`, `p_value` (of the bucket χ² test),
    `specialised` (bool); NaN / False for latents with fewer than MIN_FIRES fires."""
    counts, tokens = np.asarray(fire_counts, np.int64).T, np.asarray(tokens, np.int64)
    n_fires = counts.sum(1)
    spec = specificity(counts, tokens)
    null_mean, null_sd = np.full(len(spec), np.nan), np.full(len(spec), np.nan)
    rng = np.random.default_rng(seed)
    share = tokens / tokens.sum()
    for n in np.unique(n_fires[n_fires >= MIN_FIRES]):
        draws = specificity(rng.multinomial(n, share, size=NULL_DRAWS), tokens)
        rows = n_fires == n
        null_mean[rows], null_sd[rows] = draws.mean(), draws.std()
    scored = n_fires >= MIN_FIRES
    spec[~scored] = np.nan
    with np.errstate(invalid="ignore", divide="ignore"):
        corrected = (spec - null_mean) / (1 - null_mean)
    p_value = bucket_chi2_p_values(counts, tokens, n_buckets)
    p_value[~scored] = np.nan
    tested = ~np.isnan(p_value)
    significant = np.zeros(len(spec), bool)
    if tested.any():
        significant[np.flatnonzero(tested)] = benjamini_hochberg(p_value[tested], FDR)
    with np.errstate(invalid="ignore"):
        specialised = significant & (corrected >= np.log(4) / np.log(len(tokens)))
    return {"specificity": spec, "null_mean": null_mean, "null_sd": null_sd,
            "corrected": corrected, "p_value": p_value, "specialised": specialised}


def bucket_chi2_p_values(counts: np.ndarray, tokens: np.ndarray, n_buckets: int) -> np.ndarray:
    """[d_sae, T] fire counts → p-values of Pearson's χ² test that a latent's fires fall
    in `n_buckets` equal position ranges as the tokens do; NaN where some range expects
    fewer than 5 fires."""
    bucket = np.arange(len(tokens)) * n_buckets // len(tokens)
    observed = np.stack([counts[:, bucket == b].sum(1) for b in range(n_buckets)], 1)
    share = np.array([tokens[bucket == b].sum() for b in range(n_buckets)]) / tokens.sum()
    expected = observed.sum(1, keepdims=True) * share
    with np.errstate(invalid="ignore", divide="ignore"):
        statistic = ((observed - expected) ** 2 / expected).sum(1)
    p = chi2.sf(statistic, n_buckets - 1)
    p[expected.min(1) < 5] = np.nan
    return p


def benjamini_hochberg(p: np.ndarray, q: float) -> np.ndarray:
    """Which of the p-values are discoveries at false-discovery rate q."""
    order = np.argsort(p)
    below = p[order] <= q * np.arange(1, len(p) + 1) / len(p)
    found = np.zeros(len(p), bool)
    if below.any():
        found[order[: np.flatnonzero(below).max() + 1]] = True
    return found


def specificity_summary(result: dict) -> dict:
    scored = ~np.isnan(result["specificity"])
    tested = ~np.isnan(result["p_value"])
    n = int(scored.sum())

    def mean(key):
        return float(result[key][scored].mean()) if n else float("nan")

    return {
        "mean_position_specificity": mean("specificity"),
        "mean_null_specificity": mean("null_mean"),
        "mean_corrected_specificity": mean("corrected"),
        "position_specialised_fraction": float(result["specialised"][tested].mean())
        if tested.any() else float("nan"),
        "n_specialised_latents": int(result["specialised"].sum()),
        "n_tested_latents": int(tested.sum()),
        "n_scored_latents": n,
        "min_fires": MIN_FIRES, "null_draws": NULL_DRAWS, "fdr": FDR,
    }


def profile_clusters(mean_activation: np.ndarray, frequency: np.ndarray, max_latents: int = 512,
                     max_clusters: int = 12) -> dict:
    """Cluster the position profiles of the `max_latents` most frequent latents.
    Returns the linkage (for the dendrogram), the chosen number of clusters and labels."""
    alive = np.flatnonzero(frequency > 0)
    chosen = alive[np.argsort(-frequency[alive])][:max_latents]
    profiles = np.abs(mean_activation[:, chosen]).T
    profiles = profiles / profiles.sum(1, keepdims=True)
    varying = profiles.std(1) > 0
    chosen, profiles = chosen[varying], profiles[varying]
    if len(chosen) < 3:
        return {"n_clusters": None, "n_latents": int(len(chosen)), "linkage": None}
    distances = pdist(profiles, "correlation")
    tree = linkage(distances, "average")
    square = squareform(distances)
    best, best_score = 1, -1.0
    for k in range(2, min(max_clusters, len(chosen) - 1) + 1):
        labels = fcluster(tree, k, "maxclust")
        if len(set(labels)) < 2:
            continue
        score = silhouette_score(square, labels, metric="precomputed")
        if score > best_score:
            best, best_score = len(set(labels)), score
    return {"n_clusters": int(best), "silhouette": float(best_score), "n_latents": int(len(chosen)),
            "linkage": tree, "latents": chosen}


def probe_accuracy(features: np.ndarray, labels: np.ndarray, train: np.ndarray,
                   seed: int = 0) -> float:
    """Test accuracy of a standardised multinomial logistic regression."""
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500, random_state=seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence warnings: the accuracy is what we report
        probe.fit(features[train], labels[train])
    return float(probe.score(features[~train], labels[~train]))


def position_decodability(codes: np.ndarray, raw: np.ndarray, positions: np.ndarray,
                          sequences: np.ndarray, context_size: int, n_buckets: int = 8,
                          train_fraction: float = 0.8, seed: int = 0) -> dict:
    """Probe the position bucket ⌊t · n_buckets / T⌋ from codes and from raw activations.
    The first `train_fraction` of the sequences train, the rest test."""
    buckets = np.minimum(positions * n_buckets // context_size, n_buckets - 1)
    ids = np.unique(sequences)
    train = np.isin(sequences, ids[: max(1, int(len(ids) * train_fraction))])
    if train.all() or not train.any():
        raise ValueError("position decodability needs at least two held-out sequences")
    chance = np.bincount(buckets[~train], minlength=n_buckets).max() / (~train).sum()
    return {
        "codes_accuracy": probe_accuracy(codes, buckets, train, seed),
        "raw_accuracy": probe_accuracy(raw, buckets, train, seed),
        "chance_accuracy": float(chance),
        "n_buckets": n_buckets,
        "n_train_tokens": int(train.sum()),
        "n_test_tokens": int((~train).sum()),
    }
