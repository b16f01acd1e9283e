"""Positional structure of the codes: what the seed papers claim to change.

- Position specificity of latent i (DESIGN.md): 1 − H(p_i)/log T, with p_i(t) its mean
  activation at position t normalised over the T positions. 0 for a latent equally
  active everywhere; 1 for one active at a single position; a latent spread evenly over
  w positions scores 1 − log w / log T. Specialised: specificity ≥ 0.5, i.e. an
  effective number of positions exp(H) ≤ √T. Only latents that fired on at least
  `MIN_FIRES` held-out tokens are scored: a latent seen a handful of times looks
  position-specific by chance alone (one firing gives specificity 1).
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
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import silhouette_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

SPECIALISED_ABOVE = 0.5
MIN_FIRES = 20


def position_specificity(mean_activation: np.ndarray, fires: np.ndarray | None = None
                         ) -> np.ndarray:
    """[T, d_sae] mean activation per position → [d_sae] specificity; NaN for latents never
    active or, when `fires` (firing counts [d_sae]) is given, active on < MIN_FIRES tokens."""
    profile = np.abs(mean_activation).T  # [d_sae, T]
    total = profile.sum(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = profile / total
        entropy = -np.where(p > 0, p * np.log(p), 0.0).sum(1)
    spec = 1 - entropy / np.log(profile.shape[1])
    spec[total[:, 0] == 0] = np.nan
    if fires is not None:
        spec[fires < MIN_FIRES] = np.nan
    return spec


def specificity_summary(spec: np.ndarray) -> dict:
    alive = spec[~np.isnan(spec)]
    return {
        "mean_position_specificity": float(alive.mean()) if alive.size else float("nan"),
        "position_specialised_fraction": float((alive >= SPECIALISED_ABOVE).mean())
        if alive.size else float("nan"),
        "n_scored_latents": int(alive.size),
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
