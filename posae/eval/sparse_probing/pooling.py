"""Step 1 of sparse probing: each text once through the LM and the SAE, mean-pooled over
the text's own tokens (no special tokens, no padding)."""

from __future__ import annotations

import torch

from posae.data.sequences import SpecialTokens
from posae.eval.text_inputs import text_batches
from posae.models.lm import LanguageModel


@torch.no_grad()
def pool_texts(sae, lm: LanguageModel, special: SpecialTokens, layer: int, texts: list[str],
               context_size: int = 128, batch_size: int = 32,
               trim_padding: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per text, the mean over its own tokens of the raw residual stream after block `layer`
    [N, d] and of the SAE codes [N, d_sae] (None without an SAE); float32 on the CPU.

    With `trim_padding`, texts are grouped by token count and each batch is padded only to
    its longest text (truncation to `context_size` is unchanged)."""
    n = len(texts)
    if trim_padding:
        room = special.content_length(context_size)
        lengths = [len(ids) for ids in lm.tokenizer(list(texts), add_special_tokens=False,
                                                    truncation=True, max_length=room)["input_ids"]]
        order = sorted(range(n), key=lambda i: (lengths[i], i))
    else:
        order = list(range(n))
    raw_out: torch.Tensor | None = None
    sae_out: torch.Tensor | None = None
    extra = len(special.prefix) + len(special.suffix)
    sae_device = next(sae.parameters()).device if sae is not None else None
    was_training = sae.training if sae is not None else False
    if sae is not None:
        sae.eval()
    try:
        for start in range(0, n, batch_size):
            rows = order[start:start + batch_size]
            chunk = [texts[i] for i in rows]
            context = (min(context_size, max(lengths[i] for i in rows) + extra)
                       if trim_padding else context_size)
            for batch in text_batches(lm, special, chunk, layer, context, len(chunk)):
                count = batch.mask.sum(1, keepdim=True).clamp_min(1).float()
                weights = batch.mask.float().unsqueeze(-1)
                raw = ((batch.x * weights).sum(1) / count).cpu()
                if raw_out is None:
                    raw_out = torch.empty(n, raw.shape[1])
                raw_out[rows] = raw
                if sae is not None:
                    f = sae.encode(batch.x.to(sae_device), batch.pos.to(sae_device),
                                   batch.mask.to(sae_device)).float()
                    pooled = ((f * weights.to(sae_device)).sum(1) / count.to(sae_device)).cpu()
                    if sae_out is None:
                        sae_out = torch.empty(n, pooled.shape[1])
                    sae_out[rows] = pooled
    finally:
        if sae is not None:
            sae.train(was_training)
    if raw_out is None:
        raise ValueError("no texts to pool")
    return raw_out, sae_out

