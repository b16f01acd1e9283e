"""Model preservation: splice the SAE's reconstruction into the model at its layer.

Each held-out sequence runs unchanged, with the residual stream after block L replaced by
x̂ = SAE(x), and with it replaced by zeros (zero ablation). As SAELens and SAEBench do, the
replacement covers every position that is not padding, special tokens (BOS, [CLS], [SEP])
included. Scores are 1 when the spliced model equals the original and 0 when it is no
better than zero ablation. The same scores with the special tokens left unchanged in both
splices (posae's earlier definition; higher, and not comparable with SAELens) are kept as
`*_special_tokens_kept`.

Causal LMs (as SAELens and SAEBench define them):
    KL score = (KL_zero − KL_sae) / KL_zero,  KL = E_t Σ_v p_orig log(p_orig / p_new)
    CE score = (CE_zero − CE_sae) / (CE_zero − CE_orig),  CE the next-token loss,
    KL over counted tokens, CE over every next-token target that is not padding.
A score whose denominator is 0 (zero ablation changes nothing) is null.
Encoders (the embedded MiniLM has no vocabulary head; its outputs are embeddings), the
same normalisation on a distance D between original and spliced outputs:
    embedding score = (D_zero − D_sae) / D_zero
    D_sentence = E_seq [1 − cos(e_orig, e_new)], e the mean-pooled, normalised output
                 (the sentence embedding all-MiniLM-L6-v2 is trained to produce)
    D_token    = E_t [1 − cos(h_orig,t, h_new,t)] over counted tokens of the last layer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor

from posae.eval.safe import ratio
from posae.models.hooks import block_output
from posae.models.lm import LanguageModel
from posae.sae.base import SAE


@contextmanager
def spliced(lm: LanguageModel, layer: int, replace: Callable[[Tensor], Tensor]):
    """While active, block `layer`'s output hidden state h becomes replace(h)."""

    def hook(module, args, output):
        new = replace(block_output(output))
        return (new, *output[1:]) if isinstance(output, (tuple, list)) else new

    handle = lm.blocks[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _outputs(lm: LanguageModel, ids: Tensor, attention: Tensor) -> Tensor:
    out = lm.model(input_ids=ids, attention_mask=attention.long())
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).float()


def _causal_sums(orig: Tensor, new: Tensor, ids: Tensor, attention: Tensor,
                 counted: Tensor) -> dict[str, float]:
    log_p, log_q = F.log_softmax(orig, -1), F.log_softmax(new, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    targets = attention[:, :-1] & attention[:, 1:]
    ce = F.cross_entropy(new[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    return {"kl": kl[counted].sum().item(), "ce": ce[targets].sum().item()}


def _encoder_sums(orig: Tensor, new: Tensor, attention: Tensor,
                  counted: Tensor) -> dict[str, float]:
    def sentence(h):
        weights = attention[..., None].float()
        return F.normalize((h * weights).sum(1) / weights.sum(1).clamp_min(1), dim=-1)

    token = 1 - F.cosine_similarity(orig, new, dim=-1)
    return {"token": token[counted].sum().item(),
            "sentence": (1 - (sentence(orig) * sentence(new)).sum(-1)).sum().item()}


@torch.no_grad()
def model_preservation(sae: SAE, lm: LanguageModel, layer: int,
                       sequences: Iterable[tuple[Tensor, Tensor, Tensor]]) -> dict:
    """`sequences` yields (token ids [B, T], attention [B, T] bool: not padding, counted
    [B, T] bool: tokens that are not special, over which KL is averaged)."""
    causal = lm.model.get_output_embeddings() is not None  # a vocabulary head
    totals: dict[str, float] = {}
    n_counted = n_targets = n_sequences = 0
    for ids, attention, counted in sequences:
        ids, attention, counted = ids.to(lm.device), attention.to(lm.device), counted.to(lm.device)
        pos = torch.arange(ids.shape[1], device=lm.device).expand_as(ids)

        def with_sae(where):
            def replace(h):
                x_hat = sae(h.float(), pos, where).x_hat.to(h.dtype)
                return torch.where(where[..., None], x_hat, h)
            return replace

        def with_zeros(where):
            return lambda h: torch.where(where[..., None], torch.zeros_like(h), h)

        orig = _outputs(lm, ids, attention)
        for name, replace in (("sae", with_sae(attention)), ("zero", with_zeros(attention)),
                              ("sae_kept", with_sae(counted)),
                              ("zero_kept", with_zeros(counted))):
            with spliced(lm, layer, replace):
                new = _outputs(lm, ids, attention)
            sums = (_causal_sums(orig, new, ids, attention, counted) if causal
                    else _encoder_sums(orig, new, attention, counted))
            for key, value in sums.items():
                totals[f"{key}_{name}"] = totals.get(f"{key}_{name}", 0.0) + value
        if causal:
            ce_orig = F.cross_entropy(orig[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
            targets = attention[:, :-1] & attention[:, 1:]
            totals["ce_orig"] = totals.get("ce_orig", 0.0) + ce_orig[targets].sum().item()
            n_targets += int(targets.sum())
        n_counted += int(counted.sum())
        n_sequences += len(ids)
    if n_counted == 0:
        raise ValueError("no counted tokens to splice")
    if causal:
        kl = {k: totals[f"kl_{k}"] / n_counted for k in ("sae", "zero", "sae_kept", "zero_kept")}
        ce = {k: totals[f"ce_{k}"] / max(n_targets, 1)
              for k in ("orig", "sae", "zero", "sae_kept", "zero_kept")}
        return {
            "kind": "causal",
            "kl_score": ratio(kl["zero"] - kl["sae"], kl["zero"]),
            "ce_score": ratio(ce["zero"] - ce["sae"], ce["zero"] - ce["orig"]),
            "kl_sae": kl["sae"], "kl_zero": kl["zero"],
            "ce_orig": ce["orig"], "ce_sae": ce["sae"], "ce_zero": ce["zero"],
            "kl_score_special_tokens_kept": ratio(kl["zero_kept"] - kl["sae_kept"],
                                                  kl["zero_kept"]),
            "ce_score_special_tokens_kept": ratio(ce["zero_kept"] - ce["sae_kept"],
                                                  ce["zero_kept"] - ce["orig"]),
            "n_tokens": n_counted,
        }
    d = {f"{k}_{name}": totals[f"{k}_{name}"] / (n_counted if k == "token" else n_sequences)
         for k in ("token", "sentence") for name in ("sae", "zero", "sae_kept", "zero_kept")}
    return {
        "kind": "encoder",
        "embedding_score": ratio(d["sentence_zero"] - d["sentence_sae"], d["sentence_zero"]),
        "token_embedding_score": ratio(d["token_zero"] - d["token_sae"], d["token_zero"]),
        "sentence_distance_sae": d["sentence_sae"], "sentence_distance_zero": d["sentence_zero"],
        "token_distance_sae": d["token_sae"], "token_distance_zero": d["token_zero"],
        "embedding_score_special_tokens_kept": ratio(
            d["sentence_zero_kept"] - d["sentence_sae_kept"], d["sentence_zero_kept"]),
        "n_tokens": n_counted,
    }

