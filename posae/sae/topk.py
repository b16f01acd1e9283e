"""TopK (Gao et al. 2024) and BatchTopK (Bussmann et al. 2024) SAEs, sparse end to end.

Only the encoder's forward matmul is dense. The codes are `SparseCodes`, the selected
(token, latent, value) triples, so the decoder forward, its backward and the encoder's
backward each cost k · d per token (posae.sae.sparse, docs/ARCHITECTURE.md "Sparse
steps"); the dense codes are built only when a loss term or a hook reads them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from posae.config import ConfigError
from posae.sae.base import SAE, SAEConfig


@dataclass
class TopKConfig(SAEConfig):
    k: int = 32

    def validate(self) -> None:
        if not 1 <= self.k <= self.d_sae:
            raise ConfigError(f"variant.k: must be in 1..{self.d_sae} (the width), got {self.k}")


def per_token_top_k(sae: SAE, x: Tensor, pre: Tensor, k: int,
                    scores: Tensor | None = None):
    """Each token's k largest `scores` (default: the pre-activations; a latent scored -inf
    is chosen only when fewer than k are finite, and then with its ReLU'd pre-activation),
    their ReLU'd pre-activations as `SparseCodes` (latents ascending in each token)."""
    scores = pre.detach() if scores is None else scores
    latents = scores.topk(k, dim=-1, sorted=False).indices.sort(-1).values.reshape(-1)
    tokens = torch.arange(pre[..., 0].numel(), device=pre.device)
    return sae.selected_codes(x, pre, tokens.repeat_interleave(k), latents)


class TopKSAE(SAE):
    config_class = TopKConfig

    def encode_with_pre(self, x, pos, mask):
        """Each token's k largest pre-activations, ReLU'd, as `SparseCodes`."""
        pre = self.pre_activations(x)
        return per_token_top_k(self, x, pre, self.cfg.k), pre, {}


class BatchTopKSAE(SAE):
    """Top (k x tokens) activations over the whole batch in training; at inference a
    threshold θ, the running mean over training batches of the smallest selected
    activation (Bussmann et al. 2024). A token may hold more than k active latents.

    Training selects in two stages, exactly: each token's `candidates_per_k` x k largest
    activations, then the batch's top k x tokens among those; when some token has more
    candidates at or above the selected minimum than it contributed, the full search
    runs instead. Codes, decoder and encoder backward are sparse, as TopK's.
    """

    config_class = TopKConfig
    candidates_per_k = 4

    def __init__(self, cfg):
        super().__init__(cfg)
        self.register_buffer("threshold", torch.tensor(0.0))
        self.register_buffer("threshold_batches", torch.tensor(0, dtype=torch.long))

    @torch.no_grad()
    def batch_select(self, pre: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """(token, latent) of the batch's k x tokens largest ReLU'd pre-activations that
        are positive, sorted by (token, latent), tokens indexing pre flattened to
        [tokens, d_sae]; masked tokens never selected."""
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
            flat = chosen.indices[chosen.values > 0].sort().values
            return flat // acts.shape[1], flat % acts.shape[1]
        flat = chosen.indices[chosen.values > 0]
        # SparseCodes' order: by token, then latent
        key = (flat // per_token * acts.shape[1] + latents.flatten()[flat]).sort().values
        return key // acts.shape[1], key % acts.shape[1]

    def encode_with_pre(self, x, pos, mask):
        """Training mode: the batch's selection as `SparseCodes`, and θ's update (so any
        forward in training mode moves θ). Inference mode: pre ⊙ 1[pre > θ]."""
        pre = self.pre_activations(x)
        if not self.training:
            return pre * (pre > self.threshold), pre, {}
        codes = self.selected_codes(x, pre, *self.batch_select(pre.detach(), mask))
        self._update_threshold(codes.values.detach())
        return codes, pre, {}

    def mechanism_state(self) -> dict[str, float]:
        return {"threshold": self.threshold.item()}

    @torch.no_grad()
    def _update_threshold(self, selected: Tensor) -> None:
        positive = selected[selected > 0]
        if positive.numel():
            n = self.threshold_batches.item()
            self.threshold.mul_(n / (n + 1)).add_(positive.min() / (n + 1))
            self.threshold_batches += 1
