"""ReLU SAE: the seed papers' shared baseline (000 eq. 1; Bricken et al. 2023)."""

from __future__ import annotations

import torch

from posae.sae.base import SAE


class ReLUSAE(SAE):
    decodes_sparsely = True  # ∂f/∂pre = 0 where f = 0
    def encode_with_pre(self, x, pos, mask):
        pre = self.pre_activations(x)
        return torch.relu(pre), pre, {}
