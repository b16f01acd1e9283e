"""Build the activation cache: one LM pass writes every requested layer, shard by shard.

Resumable: shard k always holds sequences [k*S, (k+1)*S) of the deterministic token
stream, so a rerun skips the shards every layer's manifest lists and recomputes the rest,
and a killed run ends with exactly the content of an uninterrupted one. A file lock on
the cache folder serialises concurrent builders (parallel sweep jobs).
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from posae.config import CacheRequest
from posae.data.cache_format import (
    ARRAYS,
    CacheCorruptError,
    CacheError,
    CacheMismatchError,
    CacheSpec,
    check_identity,
    read_manifest,
    shard_file,
    shard_problem,
    shard_stats,
    summarise_stats,
    to_storage,
    write_array,
    write_manifest,
)
from posae.data.sequences import SpecialTokens, iter_sequence_blocks
from posae.data.synthetic import SyntheticActivations
from posae.data.text import corpus_changes, iter_documents
from posae.models.hooks import residual_stream
from posae.models.lm import LanguageModel, load_language_model, resolve_device

log = logging.getLogger(__name__)


class LayerWriter:
    """The manifest of one layer's cache, its complete shards, and appending a shard."""

    def __init__(self, spec: CacheSpec, layer: int, shard_sequences: int):
        self.dir = spec.layer_dir(layer)
        self.layer = layer
        self.header = {**spec.identity(layer), "shard_sequences": shard_sequences}
        self.shards: list[dict] = []
        self.stats: list[np.ndarray] = []
        self.exhausted = False
        self.damaged: dict[int, str] = {}  # index of a listed shard: why it is not trusted
        path = self.dir / "manifest.json"
        if path.exists():
            self._load_existing(read_manifest(path), path, spec, layer, shard_sequences)

    def _load_existing(self, manifest, path, spec, layer, shard_sequences) -> None:
        check_identity(manifest, spec.identity(layer), path)
        if manifest["shard_sequences"] != shard_sequences:
            raise CacheMismatchError(
                f"{path} was written with cache.shard_sequences={manifest['shard_sequences']}; "
                f"resume with that value or use another cache.root"
            )
        self.header = {k: v for k, v in manifest.items()
                       if k not in ("shards", "n_sequences", "source_exhausted", "stats")}
        self.shards = manifest["shards"]
        self.exhausted = manifest["source_exhausted"]
        self.stats = [np.load(self.dir / shard_file(s["index"], "stats")) for s in self.shards]

    @property
    def n_sequences(self) -> int:
        return sum(s["n_seq"] for s in self.shards)

    def satisfies(self, n_sequences: int) -> bool:
        return not self.damaged and (self.exhausted or self.n_sequences >= n_sequences)

    def check_shards(self, verify: bool) -> None:
        """Find the listed shards whose files are missing, of the wrong size or (`verify`)
        fail their sha256: they are recomputed, and only they (`needs`)."""
        self.damaged = {s["index"]: problem for s in self.shards
                        if (problem := shard_problem(self.dir, s, verify))}
        for problem in self.damaged.values():
            log.warning("%s: recomputing that shard", problem)

    def needs(self, index: int, n_shards: int) -> bool:
        """Shard `index` is to be written: damaged, or new and within the `n_shards` asked."""
        return index in self.damaged or len(self.shards) <= index < n_shards

    def listed_n_seq(self, index: int) -> int:
        return next(s["n_seq"] for s in self.shards if s["index"] == index)

    def full_shards(self) -> int:
        """Leading shards of full size: those a resumed or extended run keeps."""
        size = self.header["shard_sequences"]
        return next((i for i, s in enumerate(self.shards) if s["n_seq"] < size), len(self.shards))

    def prepare(self, lm: LanguageModel | None, special: SpecialTokens | None,
                target: int) -> None:
        """Before the cache is extended to `target` sequences, drop a trailing partial shard
        (it is recut); drop stray temp files; record the tokenizer (none for synthetic
        activations)."""
        if not self.exhausted and self.n_sequences < target:
            keep = self.full_shards()
            self.shards, self.stats, self.exhausted = self.shards[:keep], self.stats[:keep], False
            self.damaged = {i: why for i, why in self.damaged.items() if i < keep}
        self.dir.mkdir(parents=True, exist_ok=True)
        for tmp in self.dir.glob("*.tmp"):
            tmp.unlink()
        if lm is None:
            self.header.update(blocks_module=None, tokenizer={
                "prefix": [], "suffix": [], "separator": None, "pad": 0, "special_token_ids": []})
            return
        self.header.update(
            blocks_module=f"{lm.blocks_path}.{self.layer}",
            tokenizer={"prefix": list(special.prefix), "suffix": list(special.suffix),
                       "separator": special.separator, "pad": special.pad,
                       "special_token_ids": list(special.all_ids)},
        )
        if lm.revision and not self.header["model"]["revision"]:
            self.header["model"] = {**self.header["model"], "revision": lm.revision}

    def append(self, index: int, acts: np.ndarray, tokens: np.ndarray, mask: np.ndarray) -> None:
        """Write shard `index`: the next one, or a damaged one in its place."""
        dtype = self.header["dtype"]
        stats = shard_stats(acts, mask, dtype)
        files = {}
        for name, array in zip(ARRAYS, (acts, tokens, mask, stats)):
            files[name] = write_array(self.dir / shard_file(index, name), array)
        record = {"index": index, "n_seq": len(tokens), "files": files}
        if self.damaged.pop(index, None) is not None:
            at = next(i for i, s in enumerate(self.shards) if s["index"] == index)
            self.shards[at], self.stats[at] = record, stats
        else:
            self.shards.append(record)
            self.stats.append(stats)
        self.write_manifest()

    def write_manifest(self) -> None:
        write_manifest(self.dir / "manifest.json", {
            **self.header,
            "n_sequences": self.n_sequences,
            "source_exhausted": self.exhausted,
            "shards": self.shards,
            "stats": summarise_stats(self.stats),
        })


@contextmanager
def build_lock(folder: Path):
    """Exclusive lock on a cache folder, held while building it; yields False without one
    where the folder cannot be written (a read-only shared cache), True with it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = open(folder / ".lock", "a")
    except OSError:  # read-only file system or folder, or no permission
        yield False
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another process is building %s; waiting for it", folder)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class ShardWrites:
    """Runs shard writes one at a time: in a worker thread, or inline.

    On a GPU the writes overlap the next forward. On a CPU the forward already keeps every
    core busy, and a third thread only slows torch's own, so writes run inline there.
    """

    def __init__(self, background: bool):
        self.pool = ThreadPoolExecutor(max_workers=1) if background else None
        self.pending: Future | None = None

    def submit(self, fn, *args) -> None:
        self.wait()
        if self.pool is None:
            fn(*args)
        else:
            self.pending = self.pool.submit(fn, *args)

    def wait(self) -> None:
        if self.pending is not None:
            self.pending.result()
            self.pending = None

    def __enter__(self) -> "ShardWrites":
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.wait()
        finally:
            if self.pool is not None:
                self.pool.shutdown()


def forward_shard(lm: LanguageModel, layers: list[int], tokens: np.ndarray, mask: np.ndarray,
                  batch: int, dtype: str) -> dict[int, np.ndarray]:
    """Residual stream after each of `layers` for a shard, padding zeroed, in storage dtype."""
    out: dict[int, list[np.ndarray]] = {layer: [] for layer in layers}
    for start in range(0, len(tokens), batch):
        ids = torch.from_numpy(tokens[start : start + batch]).to(lm.device, torch.long)
        keep = torch.from_numpy(mask[start : start + batch]).to(lm.device)
        captured = residual_stream(lm.model, lm.blocks, layers, ids, keep.long())
        for layer in layers:
            out[layer].append(to_storage(captured[layer] * keep[..., None], dtype))
    return {layer: np.concatenate(parts) for layer, parts in out.items()}


def build_cache(req: CacheRequest, lm: LanguageModel | None = None,
                docs: Iterable[str] | None = None) -> list[Path]:
    """Make sure every layer in `req.layers` caches at least `req.n_tokens` tokens.

    Returns the layer folders. Loads the model only when something is missing; `lm` and
    `docs` replace the configured model and text (tests, benchmarks).
    """
    spec = CacheSpec.from_request(req)
    size, context = req.cache.shard_sequences, req.context_size
    target = math.ceil(req.n_tokens / context)
    with build_lock(spec.group_dir()) as writable:
        writers = [LayerWriter(spec, layer, size) for layer in req.layers]
        for writer in writers:
            writer.check_shards(req.cache.verify)
        if all(w.satisfies(target) for w in writers):
            log.info("activation cache complete%s: %s", "" if writable else " (read-only)",
                     spec.group_dir())
            return [w.dir for w in writers]
        if not writable:
            raise CacheError(f"{spec.group_dir()} cannot be written and does not hold "
                             f"{target} intact sequences of layers {req.layers}; build it "
                             f"where it can be written, or set cache.root to a writable folder")
        if req.dataset.source == "text_files":
            note_changed_corpus(spec)
        if req.dataset.source == "synthetic":
            for writer in writers:
                writer.prepare(None, None, target)
            _write_synthetic_shards(req, writers, target)
            return finished_dirs(writers)
        if lm is None and req.cache.device.startswith("cuda") and not torch.cuda.is_available():
            raise CacheError(f"cache.device={req.cache.device}: this machine has no CUDA "
                             f"device to build {spec.group_dir()}; use cache.device=auto or cpu")
        lm = lm or load_language_model(req.model, resolve_device(req.cache.device))
        special = SpecialTokens.for_tokenizer(lm.tokenizer, req.model.prepend_bos)
        lm.tokenizer.model_max_length = 1 << 30  # we cut sequences ourselves
        for writer in writers:
            writer.prepare(lm, special, target)
        _write_shards(req, lm, special, writers, target, docs)
    return finished_dirs(writers)


def finished_dirs(writers: list[LayerWriter]) -> list[Path]:
    """The layer folders, once no listed shard is left damaged (a text that ran out before
    a damaged shard could not recompute it)."""
    left = [why for w in writers for why in w.damaged.values()]
    if left:
        raise CacheCorruptError("could not recompute: " + "; ".join(left))
    return [w.dir for w in writers]


def note_changed_corpus(spec) -> None:
    """Before a `text_files` cache is built in a new folder, name the files that differ from
    the caches of the same paths already there (an edited corpus gets its own cache; the
    old one stays as it was)."""
    identity = spec.dataset_identity()
    for manifest in sorted(spec.group_dir().parent.parent.glob(
            f"{spec.dataset.name}-*/ctx*/layer*/manifest.json")):
        if manifest.is_relative_to(spec.group_dir()):
            continue
        try:
            old = json.loads(manifest.read_text()).get("dataset", {})
        except (OSError, ValueError, AttributeError):  # another cache's problem, not this one's
            continue
        if old.get("paths") == identity["paths"] and (changes := corpus_changes(old, identity)):
            log.warning("dataset.paths: the corpus differs from the one cached in %s (%s): "
                        "building a new cache in %s", manifest.parent.parent,
                        "; ".join(changes), spec.group_dir())
            return


def shards_to_write(writers: list[LayerWriter], n_shards: int) -> int:
    """How many shard indices to visit: the `n_shards` asked, and damaged ones beyond."""
    return max([n_shards] + [i + 1 for w in writers for i in w.damaged])


def shard_plan(writers: list[LayerWriter], index: int, n_shards: int,
               new_size: int) -> tuple[list[LayerWriter], int]:
    """The writers that write shard `index` (new, or damaged), and its sequence count: as
    many as a damaged shard held, else `new_size`."""
    todo = [w for w in writers if w.needs(index, n_shards)]
    repaired = [w for w in todo if index in w.damaged]
    return todo, repaired[0].listed_n_seq(index) if repaired else new_size


def _write_shards(req, lm, special, writers, target, docs) -> None:
    size, context = req.cache.shard_sequences, req.context_size
    n_shards = math.ceil(target / size)
    last = shards_to_write(writers, n_shards)
    blocks = iter_sequence_blocks(docs if docs is not None else iter_documents(req.dataset),
                                  lm.tokenizer, special, context, req.dataset.pack, size)
    written = 0  # sequences of the text up to the current shard
    bar = tqdm(total=target * context, unit="tok", unit_scale=True,
               desc=f"caching {req.model.name} layers {req.layers}", dynamic_ncols=True)
    with ShardWrites(background=lm.device.type != "cpu") as writes, bar:
        for index, (tokens, mask) in enumerate(blocks):
            if index >= last:
                break
            wanted = min(len(tokens), target - index * size)
            todo, keep = shard_plan(writers, index, n_shards, wanted)
            if index < n_shards:
                written = index * size + wanted
                bar.update(wanted * context)
            if not todo:
                continue
            tokens, mask = tokens[:keep], mask[:keep]
            acts = forward_shard(lm, [w.layer for w in todo], tokens, mask,
                                 req.cache.batch_sequences, req.cache.dtype)
            writes.submit(_append_all, todo, index, acts, tokens, mask)
    if written == 0:  # an empty manifest would pass for a finished cache in every later run
        raise CacheError(f"dataset: {req.dataset.name} yields no text to cache "
                         f"({', '.join(req.dataset.paths or []) or req.dataset.source}); "
                         f"nothing written")
    if written < target:
        log.warning("the text ran out after %d of %d sequences; the cache holds all of it",
                    written, target)
        for writer in writers:
            writer.exhausted = True
            writer.write_manifest()


def _write_synthetic_shards(req, writers, target) -> None:
    """Planted-feature activations (posae/data/synthetic.py) in the same shard format."""
    size, context = req.cache.shard_sequences, req.context_size
    source = SyntheticActivations(req.dataset.synthetic, context)
    n_shards = math.ceil(target / size)
    for index in tqdm(range(shards_to_write(writers, n_shards)),
                      desc="generating synthetic shards", dynamic_ncols=True):
        todo, n_seq = shard_plan(writers, index, n_shards, min(size, target - index * size))
        if not todo:
            continue
        acts, _ = source.shard(index, n_seq)
        tokens = np.zeros((n_seq, context), np.int32)
        mask = np.ones((n_seq, context), bool)
        _append_all(todo, index, {w.layer: to_storage(torch.from_numpy(acts), req.cache.dtype)
                                  for w in todo}, tokens, mask)


def _append_all(writers, index, acts, tokens, mask) -> None:
    for writer in writers:
        writer.append(index, acts[writer.layer], tokens, mask)

