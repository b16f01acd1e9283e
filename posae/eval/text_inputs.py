"""Texts → activations at a layer, one text per sequence, for the evaluations that start
from text instead of the cache (sparse probing, absorption, model preservation)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from posae.data.sequences import SpecialTokens, iter_sequence_blocks
from posae.models.hooks import residual_stream
from posae.models.lm import LanguageModel
from posae.training.batches import Batch


@torch.no_grad()
def text_batches(lm: LanguageModel, special: SpecialTokens, texts: Sequence[str], layer: int,
                 context_size: int, batch_size: int = 32) -> Iterator[Batch]:
    """Yield `Batch`es of `batch_size` texts in order: x [B, T, d] float32, the residual
    stream after block `layer` (unscaled: saved SAEs act on raw activations); pos the
    token positions; mask the text's own tokens (not padding, not special tokens);
    tokens the ids. Each text is truncated to the context, as the cache does unpacked.
    Every text must tokenize to at least one token (the caller filters empty ones)."""
    blocks = iter_sequence_blocks(texts, lm.tokenizer, special, context_size, pack=False,
                                  block_size=batch_size)
    special_ids = torch.tensor(special.all_ids, device=lm.device)
    n = 0
    for tokens, mask in blocks:
        ids = torch.from_numpy(tokens).to(lm.device, torch.long)
        keep = torch.from_numpy(mask).to(lm.device)
        x = residual_stream(lm.model, lm.blocks, [layer], ids, keep.long())[layer].float()
        pos = torch.arange(ids.shape[1], device=lm.device).expand_as(ids)
        n += len(ids)
        yield Batch(x, pos, keep & ~torch.isin(ids, special_ids), ids)
    if n != len(texts):
        raise ValueError(f"{len(texts) - n} of {len(texts)} texts tokenize to nothing")
