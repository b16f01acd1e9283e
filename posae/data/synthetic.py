"""Synthetic activations with a planted ground truth (`dataset=synthetic`).

Each token's activation is a sparse, non-negative combination of known unit directions
(the true dictionary D, rows = features), plus a smooth position code and noise:

    x_{s,t} = Σ_i c_{s,t,i} D_i + scale_p · (cos(π t/(T-1)) a + sin(π t/(T-1)) b) + ε,
    c_{s,t,i} = z_{s,t,i} · m_{s,t,i},   m ~ LogNormal(0, σ) (heavy-tailed),  ε ~ N(0, σ_ε²/d)

with the on/off pattern z from one of three feature families:

- position-invariant: z ~ Bernoulli(rate) at every position, independently;
- position-specific: z ~ Bernoulli(rate) inside the feature's planted range
  [start, start + range_length), 0 outside it;
- persistent: a two-state Markov chain along the sequence, P(off→on) = on_rate,
  P(on→off) = 1 / mean_run, started from its stationary distribution, so runs of
  consecutive active positions have mean length `mean_run` (what temporal losses assume).

Optionally the first `correlated_pairs` invariant features come in pairs (2j, 2j+1) where
the second also fires whenever the first does, with probability `correlation`.

Everything is a function of the config: the dictionary, ranges and position code from
`seed`, and shard k's sequences from (seed, k), so a cache resumes and extends exactly.
"""

from __future__ import annotations

import numpy as np

from posae.config import SyntheticConfig

FAMILIES = ("invariant", "position_specific", "persistent")


class SyntheticActivations:
    """The ground truth of a synthetic config and the sequences it generates."""

    def __init__(self, cfg: SyntheticConfig, context_size: int):
        self.cfg, self.T = cfg, context_size  # checked by config.synthetic_checks
        rng = np.random.default_rng([cfg.seed, 0])
        n = cfg.n_invariant + cfg.n_position_specific + cfg.n_persistent
        directions = rng.standard_normal((n, cfg.d))
        self.dictionary = directions / np.linalg.norm(directions, axis=1, keepdims=True)
        self.family = np.repeat(np.arange(3), [cfg.n_invariant, cfg.n_position_specific,
                                               cfg.n_persistent])
        self.range_start = rng.integers(0, context_size - cfg.range_length + 1,
                                        cfg.n_position_specific)
        # the position code's plane: two orthonormal directions
        plane, _ = np.linalg.qr(rng.standard_normal((cfg.d, 2)))
        self.position_plane = plane.T                                      # [2, d]
        t = np.arange(context_size) / max(context_size - 1, 1)
        self.position_code = cfg.position_code_scale * (
            np.cos(np.pi * t)[:, None] * plane[:, 0] + np.sin(np.pi * t)[:, None] * plane[:, 1])

    def in_range(self) -> np.ndarray:
        """[T, n_position_specific] bool: position t lies in feature j's planted range."""
        t = np.arange(self.T)[:, None]
        return (t >= self.range_start) & (t < self.range_start + self.cfg.range_length)

    def active(self, rng: np.random.Generator, n_seq: int) -> np.ndarray:
        """[n_seq, T, n_features] bool on/off pattern z."""
        c, T = self.cfg, self.T
        invariant = rng.random((n_seq, T, c.n_invariant)) < c.invariant_rate
        for j in range(c.correlated_pairs):
            follow = rng.random((n_seq, T)) < c.correlation
            invariant[..., 2 * j + 1] |= invariant[..., 2 * j] & follow
        specific = rng.random((n_seq, T, c.n_position_specific)) < c.specific_rate
        specific &= self.in_range()
        off_rate = 1.0 / c.mean_run
        state = rng.random((n_seq, c.n_persistent)) < c.on_rate / (c.on_rate + off_rate)
        persistent = np.empty((n_seq, T, c.n_persistent), bool)
        for t in range(T):
            if t:
                u = rng.random(state.shape)
                state = np.where(state, u >= off_rate, u < c.on_rate)
            persistent[:, t] = state
        return np.concatenate([invariant, specific, persistent], axis=-1)

    def shard(self, index: int, n_seq: int) -> tuple[np.ndarray, np.ndarray]:
        """Shard `index`: activations [n_seq, T, d] float32 and the codes [n_seq, T, n]."""
        c = self.cfg
        rng = np.random.default_rng([c.seed, 1, index])
        z = self.active(rng, n_seq)
        codes = z * rng.lognormal(0.0, c.magnitude_sigma, z.shape)
        x = codes @ self.dictionary + self.position_code
        x += rng.standard_normal(x.shape) * (c.noise_std / np.sqrt(c.d))
        return x.astype(np.float32), codes.astype(np.float32)
