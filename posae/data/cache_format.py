"""On-disk format of the activation cache: where it lives, what its manifest says.

One directory per (model, dataset, context, storage dtype, layer):

    <root>/<model>/<dataset>-<fingerprint>/ctx<T>-<dtype>/layer<LL>/
        manifest.json              written last, atomically; lists only complete shards
        shard_00000.acts.npy       [n_seq, T, d] activations (bfloat16 stored as int16 bits)
        shard_00000.tokens.npy     [n_seq, T] int32 token ids
        shard_00000.mask.npy       [n_seq, T] bool, False on padding
        shard_00000.stats.npy      [d + 3] float64: sum x, sum |x|, sum |x|^2, n_tokens
        ...

Every shard file is written to `<name>.tmp`, fsynced and renamed; its sha256 and size go
into the manifest, which is replaced only after all of a shard's files exist. A killed
writer therefore leaves at most stray `.tmp` files and shards the manifest does not list.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from posae.config import CacheRequest, DatasetConfig, ModelConfig
from posae.data.text import source_identity
from posae.hashing import file_sha256
from posae.models.hooks import hook_name
from posae.models.lm import expected_revision

SCHEMA_VERSION = 1
ARRAYS = ("acts", "tokens", "mask", "stats")
NUMPY_STORAGE = {"float16": np.float16, "bfloat16": np.int16, "float32": np.float32}


class CacheError(Exception):
    """The activation cache is missing, does not match the request, or is damaged."""


class CacheMismatchError(CacheError):
    pass


class CacheCorruptError(CacheError):
    pass


@dataclass(frozen=True)
class CacheSpec:
    """Identity of a cache: everything that determines the stored activations."""

    root: Path
    model: ModelConfig
    dataset: DatasetConfig
    context_size: int
    dtype: str

    @classmethod
    def from_request(cls, req: CacheRequest) -> "CacheSpec":
        return cls(Path(req.cache.root).expanduser(), req.model, req.dataset, req.context_size,
                   req.cache.dtype)

    def dataset_identity(self) -> dict:
        return {"name": self.dataset.name, **source_identity(self.dataset)}

    def fingerprint(self) -> str:
        """Short hash of the text and the tokenization that turns it into sequences."""
        key = {
            "dataset": self.dataset_identity(),
            "tokenizer": self.model.hf_id,
            "revision": expected_revision(self.model),
            "prepend_bos": self.model.prepend_bos,
        }
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]

    def group_dir(self) -> Path:
        """The folder holding every layer of this (model, dataset, context, dtype)."""
        return (self.root / self.model.name / f"{self.dataset.name}-{self.fingerprint()}"
                / f"ctx{self.context_size}-{self.dtype}")

    def layer_dir(self, layer: int) -> Path:
        return self.group_dir() / f"layer{layer:02d}"

    def identity(self, layer: int) -> dict:
        """Manifest fields a reader requires to equal the request (None: not checked)."""
        return {
            "schema_version": SCHEMA_VERSION,
            "model": {"name": self.model.name, "hf_id": self.model.hf_id,
                      "revision": expected_revision(self.model)},
            "hook": hook_name(layer),
            "layer": layer,
            "context_size": self.context_size,
            "d_model": self.model.d_model,
            "dtype": self.dtype,
            "dataset": self.dataset_identity(),
        }


def identity_mismatches(manifest: dict, expected: dict, prefix: str = "") -> list[str]:
    """Dotted keys where `manifest` differs from `expected`, with both values."""
    problems = []
    for key, want in expected.items():
        got = manifest.get(key) if isinstance(manifest, dict) else None
        if isinstance(want, dict):
            problems += identity_mismatches(got or {}, want, f"{prefix}{key}.")
        elif want is not None and got != want:
            problems.append(f"{prefix}{key} is {got!r} in the cache, {want!r} requested")
    return problems


def check_identity(manifest: dict, expected: dict, path: Path) -> None:
    problems = identity_mismatches(manifest, expected)
    if problems:
        raise CacheMismatchError(f"{path} does not match the request: " + "; ".join(problems))


def shard_file(index: int, array: str) -> str:
    return f"shard_{index:05d}.{array}.npy"


def read_manifest(path: Path) -> dict:
    """A layer's manifest, its structure checked: CacheCorruptError names the file and the
    first field that is missing or of the wrong type."""
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CacheCorruptError(f"{path} is not valid JSON ({err})") from None
    if problem := manifest_problem(manifest):
        raise CacheCorruptError(f"{path}: {problem}; delete that layer folder to rebuild it")
    return manifest


def manifest_problem(manifest) -> str | None:
    """The first structural fault of a manifest (fields and types a reader relies on)."""
    if not isinstance(manifest, dict):
        return "not a JSON object"
    for key, kind in (("shards", list), ("n_sequences", int), ("source_exhausted", bool),
                      ("shard_sequences", int), ("stats", dict)):
        if not isinstance(manifest.get(key), kind):
            return f"field {key!r} is missing or not a {kind.__name__}"
    for i, shard in enumerate(manifest["shards"]):
        if not (isinstance(shard, dict) and isinstance(shard.get("index"), int)
                and isinstance(shard.get("n_seq"), int) and isinstance(shard.get("files"), dict)):
            return f"shards[{i}] lacks an integer index and n_seq and a files table"
        for array in ARRAYS:
            record = shard["files"].get(array)
            if not (isinstance(record, dict) and isinstance(record.get("name"), str)
                    and isinstance(record.get("sha256"), str)
                    and isinstance(record.get("bytes"), int)):
                return f"shards[{i}].files.{array} lacks its name, sha256 and bytes"
    return None


def atomic_write(path: Path, write: Callable) -> dict:
    """Write through `write(file)` to `path.tmp`, fsync, rename; return sha256 and size."""
    tmp = path.with_name(path.name + ".tmp")
    digest = hashlib.sha256()

    class HashingFile:
        def __init__(self, file):
            self.file = file

        def write(self, data):
            digest.update(data)
            return self.file.write(data)

    with open(tmp, "wb") as file:
        write(HashingFile(file))
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)
    return {"name": path.name, "sha256": digest.hexdigest(), "bytes": path.stat().st_size}


def write_array(path: Path, array: np.ndarray) -> dict:
    return atomic_write(path, lambda f: np.lib.format.write_array(f, np.ascontiguousarray(array)))


def write_manifest(path: Path, manifest: dict) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(manifest, indent=1).encode()))


def shard_problem(folder: Path, shard: dict, verify: bool) -> str | None:
    """Why a manifest's shard cannot be trusted (a file missing, of the wrong size, or, with
    `verify`, failing its sha256), naming the file; None when it is intact."""
    for record in shard["files"].values():
        path = folder / record["name"]
        if not path.exists():
            return f"{path} is listed in the manifest but missing"
        if path.stat().st_size != record["bytes"]:
            return f"{path} has {path.stat().st_size} bytes, the manifest says {record['bytes']}"
        if verify and file_sha256(path) != record["sha256"]:
            return f"{path} fails its sha256 check: the shard is corrupt"
    return None


def to_storage(acts: torch.Tensor, dtype: str) -> np.ndarray:
    """Cast activations to the storage dtype as a numpy array (bfloat16 as its int16 bits)."""
    stored = acts.to(getattr(torch, dtype)).cpu()
    return (stored.view(torch.int16) if dtype == "bfloat16" else stored).numpy()


def from_storage(array: np.ndarray, dtype: str) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor.view(torch.bfloat16) if dtype == "bfloat16" else tensor


def shard_stats(acts: np.ndarray, mask: np.ndarray, dtype: str, chunk: int = 16) -> np.ndarray:
    """float64 [sum x (d), sum |x|, sum |x|^2, n] over the unmasked tokens of a shard."""
    d = acts.shape[-1]
    total = np.zeros(d + 3)
    for start in range(0, len(acts), chunk):
        x = from_storage(acts[start : start + chunk], dtype).double()
        x = x[torch.from_numpy(mask[start : start + chunk])]
        sq = (x * x).sum(-1)
        total[:d] += x.sum(0).numpy()
        total[d] += sq.sqrt().sum().item()
        total[d + 1] += sq.sum().item()
        total[d + 2] += len(x)
    return total


def summarise_stats(per_shard: list[np.ndarray]) -> dict:
    """Manifest statistics for normalisation: mean vector, E|x|, E|x|^2, token count."""
    total = np.sum(per_shard, axis=0) if per_shard else np.zeros(3)
    d, n = len(total) - 3, total[-1]
    if n == 0:
        return {"n_tokens": 0, "mean": [], "mean_norm": None, "mean_sq_norm": None}
    return {"n_tokens": int(n), "mean": (total[:d] / n).tolist(),
            "mean_norm": total[d] / n, "mean_sq_norm": total[d + 1] / n}
