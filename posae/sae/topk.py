"""TopK (Gao et al. 2024) and BatchTopK (Bussmann et al. 2024) SAEs, with sparse decoding.

The decoder never costs a dense [tokens, d_sae] x [d_sae, d] matmul: the k active latents
of each token are gathered and summed (`embedding_bag`), k * d work per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from posae.config import ConfigError
from posae.sae.base import SAE, SAEConfig
from posae.sae.sparse import bag_sums, sparse_decode


@dataclass
class TopKConfig(SAEConfig):
    k: int = 32

    def validate(self) -> None:
        if not 1 <= self.k <= self.d_sae:
            raise ConfigError(f"variant.k: must be in 1..{self.d_sae} (the width), got {self.k}")


class TopKSAE(SAE):
    config_class = TopKConfig

    def encode_with_pre(self, x, pos, mask):
        """Each token's k largest pre-activations, ReLU'd; extras hold them sparse."""
        pre = self.pre_activations(x)
        values, indices = pre.topk(self.cfg.k, dim=-1, sorted=False)
        values = torch.relu(values)
        f = torch.zeros_like(pre).scatter(-1, indices, values)
        return f, pre, {"topk_indices": indices, "topk_values": values}

    def decode(self, f, extras=None):
        if extras and "topk_indices" in extras:
            return sparse_decode(extras["topk_indices"], extras["topk_values"],
                                 self.W_dec) + self.b_dec
        return super().decode(f)


class BatchTopKSAE(SAE):
    """Top (k x tokens) activations over the whole batch in training; at inference a
    threshold θ, the running mean over training batches of the smallest selected
    activation (Bussmann et al. 2024). A token may hold more than k active latents.

    Training selects in two stages, exactly: each token's `candidates_per_k` x k largest
    activations, then the batch's top k x tokens among those; when some token has more
    candidates at or above the selected minimum than it contributed, the full search
    runs instead. The decoder is sparse, as TopK's.
    """

    config_class = TopKConfig
    candidates_per_k = 4

    def __init__(self, cfg):
        super().__init__(cfg)
        self.register_buffer("threshold", torch.tensor(0.0))
        self.register_buffer("threshold_batches", torch.tensor(0, dtype=torch.long))

    def batch_select(self, pre: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """(token, latent, value) of the batch's k x tokens largest ReLU'd pre-activations,
        tokens indexing pre flattened to [tokens, d_sae]; masked tokens never selected."""
        acts = torch.relu(pre).reshape(-1, pre.shape[-1])
        if mask is not None:
            acts = acts * mask.reshape(-1, 1).to(acts.dtype)
        n_tokens = int(mask.sum()) if mask is not None else acts.shape[0]
        budget = min(self.cfg.k * n_tokens, acts.numel())
        per_token = min(self.candidates_per_k * self.cfg.k, acts.shape[1])
        values, latents = acts.topk(per_token, dim=-1, sorted=False)
        chosen = values.flatten().topk(budget, sorted=False)
        smallest_candidate = values.min(-1).values
        incomplete = (smallest_candidate >= chosen.values.min()) & (smallest_candidate > 0)
        if per_token < acts.shape[1] and bool(incomplete.any()):
            chosen = acts.flatten().topk(budget, sorted=False)
            return chosen.indices // acts.shape[1], chosen.indices % acts.shape[1], chosen.values
        return chosen.indices // per_token, latents.flatten()[chosen.indices], chosen.values

    def encode_with_pre(self, x, pos, mask):
        """Training mode: the batch's selection, held sparse in extras as (token, latent,
        value) triples, and θ's update (so any forward in training mode moves θ). Inference
        mode: pre ⊙ 1[pre > θ]."""
        pre = self.pre_activations(x)
        if not self.training:
            return pre * (pre > self.threshold), pre, {}
        tokens, latents, values = self.batch_select(pre, mask)
        self._update_threshold(values)
        flat = torch.zeros_like(pre).view(-1, pre.shape[-1])
        f = flat.index_put((tokens, latents), values.to(pre.dtype)).view_as(pre)
        return f, pre, {"selected_tokens": tokens, "selected_latents": latents,
                        "selected_values": values}

    def decode(self, f, extras=None):
        if not (extras and "selected_tokens" in extras):
            return super().decode(f)
        x_hat = bag_sums(extras["selected_tokens"], extras["selected_latents"],
                         extras["selected_values"], f[..., 0].numel(), self.W_dec)
        return x_hat.view(*f.shape[:-1], -1) + self.b_dec

    def mechanism_state(self) -> dict[str, float]:
        return {"threshold": self.threshold.item()}

    @torch.no_grad()
    def _update_threshold(self, selected: Tensor) -> None:
        positive = selected[selected > 0]
        if positive.numel():
            n = self.threshold_batches.item()
            self.threshold.mul_(n / (n + 1)).add_(positive.min() / (n + 1))
            self.threshold_batches += 1
