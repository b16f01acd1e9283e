"""ReLU SAE: the seed papers' shared baseline (000 eq. 1; Bricken et al. 2023)."""

from __future__ import annotations

import torch

from posae.sae.base import SAE


class ReLUSAE(SAE):
    def activation(self, pre, mask=None):
        return torch.relu(pre)
