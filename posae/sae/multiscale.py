"""Multi-scale SAE for 002's "multi-scale" variant.

Reading (docs/variants.md): the latents are split into one group per scale s (1, 4, 16
tokens by default); group s encodes the causal mean of the last s counted tokens of the
same sequence (fewer at its start), x̄^{(s)}_t, and one decoder reconstructs x_t from all
groups:  f = [ReLU(W_s (x̄^{(s)}_t - b_dec) + b_s)]_s,  x̂ = W_dec f + b_dec.
Scale 1 is the ordinary SAE; the other groups see a token's recent context.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from posae.config import ConfigError
from posae.sae.base import SAE, SAEConfig


@dataclass
class MultiScaleConfig(SAEConfig):
    scales: list[int] = field(default_factory=lambda: [1, 4, 16])

    def validate(self) -> None:
        if not self.scales or min(self.scales) < 1:
            raise ConfigError(f"variant.scales: positive token counts, got {self.scales}")
        if self.d_sae % len(self.scales):
            raise ConfigError(f"variant: the width {self.d_sae} must split evenly across "
                              f"variant.scales={self.scales}")


def causal_means(x: Tensor, mask: Tensor, scale: int) -> Tensor:
    """Mean of the last `scale` counted tokens up to each position, within each row."""
    if scale == 1:
        return x
    weights = mask.to(x.dtype)[..., None]
    csum = torch.cumsum(x * weights, dim=1)
    ccount = torch.cumsum(weights, dim=1)
    shifted_sum = torch.nn.functional.pad(csum, (0, 0, scale, 0))[:, : x.shape[1]]
    shifted_count = torch.nn.functional.pad(ccount, (0, 0, scale, 0))[:, : x.shape[1]]
    return (csum - shifted_sum) / (ccount - shifted_count).clamp_min(1)


class MultiScaleSAE(SAE):
    config_class = MultiScaleConfig
    decodes_sparsely = True  # ReLU codes

    def scale_pre_activations(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """Each latent group's pre-activations on the causal mean of its scale."""
        mask = torch.ones(x.shape[:-1], dtype=torch.bool, device=x.device) if mask is None else mask
        if x.dim() == 2:  # a flat list of tokens has no neighbours: every scale sees x
            return self.scale_pre_activations(x[None], mask[None])[0]
        size = self.cfg.d_sae // len(self.cfg.scales)
        parts = []
        for i, scale in enumerate(self.cfg.scales):
            cols = slice(i * size, (i + 1) * size)
            parts.append((causal_means(x, mask, scale) - self.b_dec) @ self.W_enc[:, cols]
                         + self.b_enc[cols])
        return torch.cat(parts, -1)

    def encode_with_pre(self, x, pos, mask):
        pre = self.scale_pre_activations(x, mask)
        return torch.relu(pre), pre, {}
