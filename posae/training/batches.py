"""Batches of contiguous windows from whole cached sequences (docs/ARCHITECTURE.md, "Training").

A unit is (sequence, start): a window of `window` consecutive tokens that never crosses a
sequence. Every epoch visits each training unit once in a seeded random order, so windows
are shuffled between themselves and never inside. A global batch of G units is split
across processes by striding (rank r takes units r, r + world, ...); the order depends
only on (seed, epoch), which makes it resumable and identical for any number of processes.
"""

from __future__ import annotations

import hashlib
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


def document_links(tokens: np.ndarray, separator: int | None, prefix_length: int,
                   suffix_length: int, packed: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per sequence [n_seq]: `continues` (its last document goes on into the next
    sequence) and `has_separator` (a document ends inside it).

    Packed sequences cut a stream of documents, each ended by `separator`; sequence i's last
    document continues into i + 1 unless its last content token (before the tokenizer's
    suffix) is the separator. Unpacked sequences (one document each) and sequences without
    documents (synthetic) continue into nothing."""
    n = len(tokens)
    if not packed or separator is None:
        return np.zeros(n, bool), np.ones(n, bool)
    content = tokens[:, prefix_length : tokens.shape[1] - suffix_length]
    return content[:, -1] != separator, (content == separator).any(1)


def split_by_documents(continues: np.ndarray, has_separator: np.ndarray, eval_fraction: float,
                       seed: int = 0, block: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Training and held-out sequence ids. Held out: blocks of `block` consecutive
    sequences drawn in a seeded random order until `eval_fraction` of the sequences are
    held out, so the held-out set samples the whole corpus. A document that crosses from a
    held-out block into a neighbouring sequence takes that sequence out of training too
    (and the next, while the document goes on), so no document is in both sets."""
    n = len(continues)
    target = max(1, round(n * eval_fraction))
    if target >= n:
        raise ValueError(f"a cache of {n} sequences is too small to hold out {target}")
    held = np.zeros(n, bool)
    for b in np.random.default_rng(seed).permutation(-(-n // block)):
        held[b * block : (b + 1) * block] = True
        if held.sum() >= target:
            break
    shared = np.zeros(n, bool)
    for i in np.flatnonzero(held):
        j = i + 1  # forward: the document crossing i | i + 1 ends at j's first separator
        while j < n and not held[j] and continues[j - 1]:
            shared[j] = True
            if has_separator[j]:
                break
            j += 1
        j = i - 1  # backward: it began after j's last separator
        while j >= 0 and not held[j] and continues[j]:
            shared[j] = True
            if has_separator[j]:
                break
            j -= 1
    train = ~held & ~shared
    if not train.any():
        raise ValueError(f"a cache of {n} sequences is too small to hold out "
                         f"{eval_fraction:.0%} and keep any whole document for training")
    return np.flatnonzero(train), np.flatnonzero(held)


def split_fingerprint(held_out: np.ndarray) -> str:
    """Which sequences a run held out: recorded with the saved SAE, checked by evaluation."""
    return "document_blocks:" + hashlib.sha256(np.asarray(held_out, np.int64).tobytes()
                                               ).hexdigest()[:16]


def held_out_split(cache: ActivationCache, packed: bool, eval_fraction: float
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The training and held-out sequences of a cache (no document in both; seed 0, so every
    run on a cache holds out the same sequences)."""
    tokenizer = cache.manifest["tokenizer"]
    links = document_links(cache.all_tokens(), tokenizer["separator"],
                           len(tokenizer["prefix"]), len(tokenizer["suffix"]), packed)
    return split_by_documents(*links, eval_fraction)


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
