"""Batches of contiguous windows from whole cached sequences (DESIGN.md).

A unit is (sequence, start): a window of `window` consecutive tokens that never crosses a
sequence. Every epoch visits each training unit once in a seeded random order, so windows
are shuffled between themselves and never inside. A global batch of G units is split
across processes by striding (rank r takes units r, r + world, ...); the order depends
only on (seed, epoch), which makes it resumable and identical for any number of processes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from posae.data.cache_reader import ActivationCache


@dataclass
class Batch:
    x: Tensor       # [B, T, d] float32 inputs (normalised)
    pos: Tensor     # [B, T] true positions in the source sequence
    mask: Tensor    # [B, T] tokens that count in losses and metrics
    tokens: Tensor  # [B, T] token ids


def split_sequences(n_sequences: int, eval_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Training and held-out sequence ids: the last `eval_fraction` of the cache is held out."""
    n_eval = max(1, round(n_sequences * eval_fraction))
    if n_eval >= n_sequences:
        raise ValueError(f"a cache of {n_sequences} sequences is too small to hold out {n_eval}")
    return np.arange(n_sequences - n_eval), np.arange(n_sequences - n_eval, n_sequences)


class WindowOrder:
    """The seeded order of training windows, with a resumable position."""

    def __init__(self, sequences: np.ndarray, context: int, window: int, seed: int):
        starts = np.arange(0, context - window + 1, window)
        self.units = np.stack(np.meshgrid(sequences, starts, indexing="ij"), -1).reshape(-1, 2)
        self.seed, self.epoch, self.offset = seed, 0, 0

    def _permutation(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.units))

    def take(self, n: int) -> np.ndarray:
        """The next n units [n, 2], continuing into the next epoch when this one ends."""
        out = []
        while n > 0:
            order = self._permutation()[self.offset : self.offset + n]
            out.append(self.units[order])
            n -= len(order)
            self.offset += len(order)
            if self.offset == len(self.units):
                self.epoch, self.offset = self.epoch + 1, 0
        return np.concatenate(out)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.offset = state["epoch"], state["offset"]


class BatchLoader:
    """Reads units from the cache as a `Batch` on `device`, scaled by `scale`."""

    def __init__(self, cache: ActivationCache, window: int, scale: float,
                 train_on_special_tokens: bool, device: torch.device):
        self.cache, self.window, self.scale, self.device = cache, window, scale, device
        self.special = None if train_on_special_tokens else torch.tensor(cache.special_token_ids)

    def load(self, units: np.ndarray) -> Batch:
        seqs = self.cache.sequences(units[:, 0])
        cols = torch.from_numpy(units[:, 1])[:, None] + torch.arange(self.window)
        take = cols[..., None].expand(-1, -1, self.cache.d_model)
        x = seqs.acts.gather(1, take).float() * self.scale
        tokens = seqs.tokens.gather(1, cols)
        mask = seqs.mask.gather(1, cols)
        if self.special is not None:
            mask &= ~torch.isin(tokens, self.special)
        return Batch(x.to(self.device), cols.to(self.device), mask.to(self.device),
                     tokens.to(self.device))


def whole_sequences(ids: np.ndarray, batch_sequences: int):
    """Units covering whole sequences `ids` in order, `batch_sequences` at a time."""
    for start in range(0, len(ids), batch_sequences):
        chunk = ids[start : start + batch_sequences]
        yield np.stack([chunk, np.zeros_like(chunk)], -1)
