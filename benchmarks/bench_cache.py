"""`make bench-cache`: caching throughput as a ratio to the bare model forward.

Both sides run in this process on the same sequences of the embedded default (MiniLM,
stdlib_docs). The bare side runs the forward only (to the deepest cached layer, on
pre-tokenised ids). The cache side is `build_cache` from documents to shards on disk:
tokenisation, forward, storage cast, statistics, sha256, fsynced writes, manifests.

Two cache timings: from documents already read (the target's measure: what posae adds to
the forward; target ratio >= 0.85), and end to end, which also parses the standard
library's sources for docstrings (the embedded text source's "download").
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import compose_config  # noqa: E402

from posae.config import cache_request  # noqa: E402
from posae.data.cache_writer import build_cache  # noqa: E402
from posae.data.sequences import SpecialTokens, iter_sequence_blocks  # noqa: E402
from posae.data.text import iter_documents  # noqa: E402
from posae.models.hooks import residual_stream  # noqa: E402
from posae.models.lm import load_language_model  # noqa: E402

DOCS = 3000  # about 170k tokens of stdlib docstrings


def bare_forward_seconds(lm, blocks, layers, batch) -> float:
    start = time.perf_counter()
    for tokens, mask in blocks:
        for b in range(0, len(tokens), batch):
            ids = torch.from_numpy(tokens[b : b + batch]).long()
            keep = torch.from_numpy(mask[b : b + batch]).long()
            residual_stream(lm.model, lm.blocks, layers, ids, keep)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128 * 512)
    parser.add_argument("--layers", default="1,3")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        overrides = [f"layers=[{args.layers}]", f"n_tokens={args.tokens}", "cache.device=cpu"]
        req = cache_request(compose_config("cache", [*overrides, f"cache.root={root}/a"]), "layers")
        req_e2e = cache_request(compose_config("cache", [*overrides, f"cache.root={root}/b"]),
                                "layers")
        lm = load_language_model(req.model, torch.device("cpu"))
        special = SpecialTokens.for_tokenizer(lm.tokenizer, req.model.prepend_bos)
        n_seq = args.tokens // req.context_size
        docs = list(islice(iter_documents(req.dataset), DOCS))
        blocks = list(islice(iter_sequence_blocks(docs, lm.tokenizer, special, req.context_size,
                                                  True, n_seq), 1))
        assert len(blocks[0][0]) == n_seq, "raise DOCS: too few documents for --tokens"
        batch = req.cache.batch_sequences
        bare_forward_seconds(lm, [(blocks[0][0][:batch], blocks[0][1][:batch])], req.layers, batch)
        bare = bare_forward_seconds(lm, blocks, req.layers, batch)
        cached = timed(build_cache, req, lm=lm, docs=docs)
        end_to_end = timed(build_cache, req_e2e, lm=lm)
        bare = (bare + bare_forward_seconds(lm, blocks, req.layers, batch)) / 2
    n = n_seq * req.context_size
    print(f"model {req.model.name}, layers {req.layers}, {n} tokens, batch {batch} sequences, "
          f"{torch.get_num_threads()} torch threads")
    print(f"bare forward           : {n / bare:8.0f} tok/s")
    print(f"build_cache from docs  : {n / cached:8.0f} tok/s   ratio {bare / cached:.3f} "
          f"(target >= 0.85)")
    print(f"build_cache end to end : {n / end_to_end:8.0f} tok/s   ratio {bare / end_to_end:.3f} "
          f"(includes parsing the stdlib for docstrings)")


def timed(fn, *args, **kwargs) -> float:
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
