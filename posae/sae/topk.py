"""TopK (Gao et al. 2024) and BatchTopK (Bussmann et al. 2024) SAEs, with sparse decoding.

The decoder never costs a dense [tokens, d_sae] x [d_sae, d] matmul: the k active latents
of each token are gathered and summed (`embedding_bag`), k * d work per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from posae.sae.base import SAE, SAEConfig, SAEOutput


@dataclass
class TopKConfig(SAEConfig):
    k: int = 32


def sparse_decode(indices: Tensor, values: Tensor, W_dec: Tensor) -> Tensor:
    """Σ_j values[..., j] * W_dec[indices[..., j]] for [..., k] indices and values."""
    lead = indices.shape[:-1]
    out = F.embedding_bag(indices.reshape(-1, indices.shape[-1]), W_dec,
                          per_sample_weights=values.reshape(-1, values.shape[-1]).to(W_dec.dtype),
                          mode="sum")
    return out.reshape(*lead, W_dec.shape[1])


class TopKSAE(SAE):
    config_class = TopKConfig

    def select(self, pre: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """Indices and (ReLU'd) values of each token's k largest pre-activations."""
        values, indices = pre.topk(self.cfg.k, dim=-1, sorted=False)
        return indices, torch.relu(values)

    def activation(self, pre, mask=None):
        indices, values = self.select(pre, mask)
        return torch.zeros_like(pre).scatter(-1, indices, values)

    def forward(self, x, pos=None, mask=None) -> SAEOutput:
        pre = self.pre_activations(x, pos)
        indices, values = self.select(pre, mask)
        f = torch.zeros_like(pre).scatter(-1, indices, values)
        x_hat = sparse_decode(indices, values, self.W_dec) + self.b_dec
        return SAEOutput(x_hat, f, pre, {"topk_indices": indices, "topk_values": values})


class BatchTopKSAE(SAE):
    """Top (k x tokens) activations over the whole batch in training; at inference a
    threshold θ, the running mean over training batches of the smallest selected
    activation (Bussmann et al. 2024). Decodes densely: a token may hold more than k."""

    config_class = TopKConfig

    def __init__(self, cfg):
        super().__init__(cfg)
        self.register_buffer("threshold", torch.tensor(0.0))
        self.register_buffer("threshold_batches", torch.tensor(0, dtype=torch.long))

    def activation(self, pre, mask=None):
        if not self.training:
            return pre * (pre > self.threshold)
        acts = torch.relu(pre)
        if mask is not None:
            acts = acts * mask[..., None].to(acts.dtype)
        n_tokens = int(mask.sum()) if mask is not None else acts[..., 0].numel()
        chosen = acts.flatten().topk(min(self.cfg.k * n_tokens, acts.numel()), sorted=False)
        self._update_threshold(chosen.values)
        return torch.zeros_like(acts).flatten().scatter(0, chosen.indices, chosen.values) \
            .view_as(acts)

    @torch.no_grad()
    def _update_threshold(self, selected: Tensor) -> None:
        positive = selected[selected > 0]
        if positive.numel():
            n = self.threshold_batches.item()
            self.threshold.mul_(n / (n + 1)).add_(positive.min() / (n + 1))
            self.threshold_batches += 1
