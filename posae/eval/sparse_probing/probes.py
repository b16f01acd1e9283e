"""Steps 2-4 of sparse probing: per-class train/test pools, balanced class-vs-rest
splits, top-k latents chosen on the training split, logistic probes (SAEBench's
sklearn LogisticRegression), and bootstrap intervals over the test texts."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler


@dataclass
class BinarySplit:
    """Indices into the task's texts of one class-vs-rest problem."""

    train: np.ndarray
    train_y: np.ndarray
    test: np.ndarray
    test_y: np.ndarray


def class_pools(labels: list[str], classes: list[str], n_train: int, n_test: int,
                seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per class, disjoint (train, test) index pools: a seeded shuffle of the class's texts,
    at most n_train/2 and n_test/2, split n_train : n_test when the class has fewer."""
    labels_arr = np.asarray(labels)
    half_train, half_test = math.ceil(n_train / 2), math.ceil(n_test / 2)
    pools = {}
    for ci, c in enumerate(classes):
        idx = np.flatnonzero(labels_arr == c)
        idx = idx[np.random.default_rng([seed, ci]).permutation(len(idx))]
        if len(idx) >= half_train + half_test:
            n_te, n_tr = half_test, half_train
        else:
            n_te = min(half_test, max(1, round(len(idx) * n_test / (n_train + n_test))))
            n_tr = min(half_train, len(idx) - n_te)
        pools[c] = (np.sort(idx[:n_tr]), np.sort(idx[n_tr:n_tr + n_te]))
    return pools


def _round_robin(lists: list[np.ndarray], n: int) -> np.ndarray:
    """n items taken one from each list in turn (skipping exhausted ones)."""
    out: list[int] = []
    depth = 0
    while len(out) < n and any(depth < len(x) for x in lists):
        for x in lists:
            if depth < len(x) and len(out) < n:
                out.append(int(x[depth]))
        depth += 1
    return np.asarray(out, dtype=np.int64)


def binary_split(pools: dict[str, tuple[np.ndarray, np.ndarray]], target: str, n_train: int,
                 n_test: int, seed: int) -> BinarySplit:
    """`target` vs the rest: balanced positives and negatives, negatives spread evenly over
    the other classes (each class's pool shuffled with a seed of its own per target)."""
    classes = list(pools)
    ti = classes.index(target)
    parts = []
    for which, n_max in ((0, n_train), (1, n_test)):
        others = [pools[c][which][np.random.default_rng([seed, ti, oi, which])
                                  .permutation(len(pools[c][which]))]
                  for oi, c in enumerate(classes) if c != target]
        positives = pools[target][which]
        n = min(len(positives), math.ceil(n_max / 2), sum(len(o) for o in others))
        negatives = _round_robin(others, n)
        index = np.concatenate([positives[:n], negatives])
        y = np.concatenate([np.ones(n, dtype=np.int64), np.zeros(len(negatives), np.int64)])
        parts += [index, y]
    return BinarySplit(*parts)


def top_k_latents(features: torch.Tensor | np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """The k columns with the largest |mean over positives - mean over negatives| (ties:
    lower index first). Call it with TRAINING features and labels only."""
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(y).astype(bool)
    if y.all() or not y.any():
        raise ValueError("top_k_latents needs positives and negatives")
    score = np.abs(x[y].mean(0) - x[~y].mean(0))
    return np.argsort(-score, kind="stable")[: min(k, x.shape[1])]


def probe_correct(train_x, train_y, test_x, test_y, C: float = 1.0, max_iter: int = 1000,
                  seed: int = 0, standardize: bool = False) -> tuple[np.ndarray, bool]:
    """Which test examples an L2 LogisticRegression fitted on the train split classifies
    correctly (on raw features, or standardised), and whether lbfgs converged."""
    probe = LogisticRegression(C=C, max_iter=max_iter, random_state=seed)
    if standardize:
        probe = make_pipeline(StandardScaler(), probe)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        probe.fit(np.asarray(train_x, dtype=np.float64), np.asarray(train_y))
    fitted = probe[-1] if standardize else probe
    converged = bool(np.all(fitted.n_iter_ < max_iter))
    correct = probe.predict(np.asarray(test_x, dtype=np.float64)) == np.asarray(test_y)
    return correct, converged


def probe_family(prefix: str, train_x, train_y, test_x, test_y, ks: list[int], C: float = 1.0,
                 max_iter: int = 1000, seed: int = 0, standardize: bool = False
                 ) -> tuple[dict[str, np.ndarray], np.ndarray, int]:
    """Per-test-example correctness of `{prefix}_test_accuracy` (all columns) and
    `{prefix}_top_{k}_test_accuracy` (top-k by train mean difference); also the top max(k)
    columns and the number of probes that did not converge."""
    train_x, test_x = np.asarray(train_x, np.float64), np.asarray(test_x, np.float64)
    columns = {f"{prefix}_test_accuracy": slice(None)}
    ranked = top_k_latents(train_x, train_y, max(ks))
    columns.update({f"{prefix}_top_{k}_test_accuracy": ranked[:k] for k in ks
                    if k <= train_x.shape[1]})
    result, not_converged = {}, 0
    for key, cols in columns.items():
        result[key], ok = probe_correct(train_x[:, cols], train_y, test_x[:, cols], test_y, C,
                                        max_iter, seed, standardize)
        not_converged += not ok
    return result, ranked, not_converged


def bootstrap_ci(correct: list[np.ndarray], texts: list[np.ndarray], resamples: int,
                 seed: int) -> list[float]:
    """95 % percentile interval of the mean over classes of the accuracy. Classes share test
    texts (one class's positives are others' negatives), so each resample draws the texts
    of the union once, with replacement, and every class reweights its own test examples
    by how often their texts were drawn (`correct`, `texts`: one array per class, aligned)."""
    rng = np.random.default_rng(seed)
    pool = np.unique(np.concatenate(texts))
    counts = rng.multinomial(len(pool), np.full(len(pool), 1 / len(pool)), size=resamples)
    means = []
    for right, ids in zip(correct, texts):
        weight = counts[:, np.searchsorted(pool, ids)]                # [resamples, n]
        means.append((weight * right).sum(1) / np.maximum(weight.sum(1), 1))
    return [float(v) for v in np.percentile(np.mean(means, 0), [2.5, 97.5])]

