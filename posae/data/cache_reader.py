"""Read the activation cache: memory-mapped random access by sequence.

Opening validates the manifest against the request (model, revision, layer, hook,
context, dtype, dataset) and checks every shard file's size and, by default, its sha256,
naming the file that fails. Reading maps each shard file once and copies only the rows
asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from posae.data.cache_format import (
    ARRAYS,
    CacheCorruptError,
    CacheError,
    CacheSpec,
    check_identity,
    from_storage,
    read_manifest,
    shard_problem,
)


@dataclass
class SequenceBatch:
    """Whole sequences: activations [n, T, d] (storage dtype), token ids [n, T], mask [n, T]."""

    index: np.ndarray
    acts: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor


class ActivationCache:
    def __init__(self, layer_dir: Path, expected: dict | None = None, verify: bool = True):
        self.dir = Path(layer_dir)
        path = self.dir / "manifest.json"
        if not path.exists():
            raise CacheError(
                f"no activation cache at {self.dir} ({path.name} missing); build it with "
                f"`python -m posae.cache` or let `python -m posae.train` build it"
            )
        self.manifest = read_manifest(path)
        if expected is not None:
            check_identity(self.manifest, expected, path)
        self.shards = self.manifest["shards"]
        self.shard_sequences = self.manifest["shard_sequences"]
        self.dtype = self.manifest["dtype"]
        self._check_files(verify)
        self._maps: dict[tuple[int, str], np.ndarray] = {}

    @classmethod
    def open(cls, spec: CacheSpec, layer: int, verify: bool = True) -> "ActivationCache":
        return cls(spec.layer_dir(layer), spec.identity(layer), verify)

    def _check_files(self, verify: bool) -> None:
        for shard in tqdm(self.shards, desc="verifying cache", unit="shard",
                          disable=not verify or len(self.shards) < 16, leave=False):
            if problem := shard_problem(self.dir, shard, verify):
                raise CacheCorruptError(f"{problem}; `python -m posae.cache` with the same "
                                        f"settings recomputes only the damaged shards")

    def __len__(self) -> int:
        return self.manifest["n_sequences"]

    @property
    def context_size(self) -> int:
        return self.manifest["context_size"]

    @property
    def d_model(self) -> int:
        return self.manifest["d_model"]

    @property
    def n_tokens(self) -> int:
        return len(self) * self.context_size

    @property
    def special_token_ids(self) -> list[int]:
        return self.manifest["tokenizer"]["special_token_ids"]

    @property
    def stats(self) -> dict:
        """mean [d], mean_norm E|x|, mean_sq_norm E|x|^2 over unpadded tokens."""
        return self.manifest["stats"]

    def _array(self, shard: int, name: str) -> np.ndarray:
        key = (shard, name)
        if key not in self._maps:
            record = self.shards[shard]["files"][name]
            self._maps[key] = np.load(self.dir / record["name"], mmap_mode="r")
        return self._maps[key]

    def all_tokens(self) -> np.ndarray:
        """Token ids of every cached sequence [n_seq, T], without reading activations."""
        return np.concatenate([self._array(s, "tokens") for s in range(len(self.shards))])

    def sequences(self, index) -> SequenceBatch:
        """Sequences by global index (int, slice, or array), in the order asked."""
        if isinstance(index, slice):
            index = np.arange(len(self))[index]
        index = np.atleast_1d(np.asarray(index, dtype=np.int64))
        if index.size and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"sequence index out of range 0..{len(self) - 1} for {self.dir}")
        shard, row = np.divmod(index, self.shard_sequences)
        out = {}
        for name in ARRAYS[:3]:
            like = self._array(0, name)
            out[name] = np.empty((len(index), *like.shape[1:]), dtype=like.dtype)
        for s in np.unique(shard):
            where = np.nonzero(shard == s)[0]
            for name, array in out.items():
                array[where] = self._array(int(s), name)[row[where]]
        return SequenceBatch(
            index=index,
            acts=from_storage(out["acts"], self.dtype),
            tokens=torch.from_numpy(out["tokens"].astype(np.int64)),
            mask=torch.from_numpy(out["mask"]),
        )
