"""Turn documents into fixed-length token sequences with the model's special tokens.

Each sequence is `prefix + content + suffix` of exactly `context_size` tokens, where the
prefix/suffix are what the tokenizer itself adds ([CLS] ... [SEP] for BERT, BOS for
Gemma) plus a BOS for tokenizers that add none when the model config asks for one
(GPT-2, Pythia). Position 0 is therefore BOS/[CLS] for every model.

Packed (the default): documents are concatenated, each followed by a separator (EOS, or
[SEP] for BERT), and cut into sequences; the remainder that does not fill one is dropped.
Unpacked: one document per sequence, truncated, then padded; `mask` is False on padding.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice

import numpy as np

from posae.config import ConfigError

TOKENIZE_BATCH = 256
# A longer document is tokenised in pieces of about this many characters, each cut just
# before a run of whitespace (where tokenizers split anyway), one piece at a time, so that
# memory stays flat and tokenising stops when the cache has its tokens. Text sources that
# may hold such documents record the cut in their cache identity; the stdlib docstrings
# hold none (the longest is ~52k characters).
CHUNK_CHARS = 1 << 16


@dataclass(frozen=True)
class SpecialTokens:
    prefix: tuple[int, ...]
    suffix: tuple[int, ...]
    separator: int
    pad: int
    # Every special id of the tokenizer, so later stages can leave them out.
    all_ids: tuple[int, ...]

    @classmethod
    def for_tokenizer(cls, tokenizer, prepend_bos: bool) -> "SpecialTokens":
        plain = tokenizer("a", add_special_tokens=False)["input_ids"]
        full = tokenizer("a", add_special_tokens=True)["input_ids"]
        start = next(i for i in range(len(full)) if full[i : i + len(plain)] == plain)
        prefix, suffix = tuple(full[:start]), tuple(full[start + len(plain) :])
        if prepend_bos and not prefix:
            if tokenizer.bos_token_id is None:
                raise ConfigError("model.prepend_bos: this tokenizer has no BOS token")
            prefix = (tokenizer.bos_token_id,)
        separator = next(
            (t for t in (tokenizer.eos_token_id, tokenizer.sep_token_id) if t is not None), None
        )
        if separator is None:
            raise ValueError("the tokenizer has no EOS or SEP token to separate documents")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else separator
        return cls(prefix, suffix, separator, pad, tuple(sorted(set(tokenizer.all_special_ids))))

    def content_length(self, context_size: int) -> int:
        n = context_size - len(self.prefix) - len(self.suffix)
        if n < 1:
            raise ConfigError(f"context_size={context_size} leaves no room beside special tokens")
        return n


def text_pieces(text: str) -> Iterator[str]:
    """`text` in pieces of at most about CHUNK_CHARS characters, each but the first starting
    with a run of whitespace (cut anywhere only where there is none)."""
    start = 0
    while len(text) - start > CHUNK_CHARS:
        end = start + CHUNK_CHARS
        cut = max(text.rfind(" ", start + 1, end), text.rfind("\n", start + 1, end))
        while cut > start + 1 and text[cut - 1].isspace():
            cut -= 1
        cut = cut if cut > start else end
        yield text[start:cut]
        start = cut
    yield text[start:]


_END_OF_BATCH = object()  # flushes the batched short documents


def _token_pieces(docs: Iterable[str], tokenizer) -> Iterator[tuple[list[int], bool]]:
    """(token ids, whether the document ends here), in order: short documents tokenised in
    batches, a long one piece by piece (`text_pieces`), lazily."""
    def tokenize(texts):  # whole documents, cut later: no "longer than the maximum" warning
        return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]

    docs = iter(docs)
    while batch := list(islice(docs, TOKENIZE_BATCH)):
        short: list[str] = []
        for doc in [*batch, _END_OF_BATCH]:
            if doc is not _END_OF_BATCH and len(doc) <= CHUNK_CHARS:
                short.append(doc)
                continue
            yield from ((ids, True) for ids in (tokenize(short) if short else []))
            short = []
            if doc is not _END_OF_BATCH:
                for piece in text_pieces(doc):
                    yield tokenize([piece])[0], False
                yield [], True


def _packed(docs, tokenizer, special: SpecialTokens, context_size: int):
    n = special.content_length(context_size)
    prefix, suffix = list(special.prefix), list(special.suffix)
    buffer: list[int] = []
    for ids, ends in _token_pieces(docs, tokenizer):
        buffer += ids
        if ends:
            buffer.append(special.separator)
        start = 0
        while len(buffer) - start >= n:
            yield prefix + buffer[start : start + n] + suffix, context_size
            start += n
        del buffer[:start]


def _unpacked(docs, tokenizer, special: SpecialTokens, context_size: int):
    n = special.content_length(context_size)
    # one sequence a document, cut to n tokens: its first CHUNK_CHARS characters suffice
    heads = (doc[:CHUNK_CHARS] for doc in docs)
    for ids, _ in _token_pieces(heads, tokenizer):
        if ids:
            seq = list(special.prefix) + ids[:n] + list(special.suffix)
            yield seq + [special.pad] * (context_size - len(seq)), len(seq)


def iter_sequence_blocks(
    docs: Iterable[str],
    tokenizer,
    special: SpecialTokens,
    context_size: int,
    pack: bool,
    block_size: int,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (tokens int32 [n, T], mask bool [n, T]) with n = block_size, the last maybe fewer."""
    sequences = (_packed if pack else _unpacked)(docs, tokenizer, special, context_size)
    while block := list(islice(sequences, block_size)):
        tokens = np.array([seq for seq, _ in block], dtype=np.int32)
        lengths = np.array([length for _, length in block])
        yield tokens, np.arange(context_size)[None, :] < lengths[:, None]
