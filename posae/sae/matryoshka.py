"""Matryoshka BatchTopK SAE (Bussmann et al. 2025, "Learning Multi-Level Features with
Matryoshka Sparse Autoencoders"), the base of T-SAE (Bhalla et al. 2025, §3.2).

The latents are ordered and cut into nested prefixes m_1 < … < m_n = m (`prefix_fractions`
of the width). Codes are BatchTopK's over the whole dictionary (no k per prefix); each
prefix reconstructs the input on its own, with the decoder bias:

    x̂_{m_i} = f_{0:m_i} W_dec[0:m_i] + b_dec,     L = Σ_i ‖x − x̂_{m_i}‖²

The outermost prefix is the usual x̂ (the `mse` term); the inner ones are the
`prefix_x_hats` the forward pass provides, summed by `losses.reconstruction.PrefixMSE`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from posae.config import ConfigError
from posae.sae.sparse import SparseCodes, bag_sums
from posae.sae.topk import BatchTopKSAE, TopKConfig


@dataclass
class MatryoshkaConfig(TopKConfig):
    # Cumulative fractions of the width where the nested prefixes end; the last must be 1.
    # Default: T-SAE's two groups, the first 20 % and the whole dictionary (2511.05541 §4.1).
    prefix_fractions: list[float] = field(default_factory=lambda: [0.2, 1.0])

    def validate(self) -> None:
        super().validate()
        fractions = self.prefix_fractions
        if not fractions or fractions[-1] != 1.0:
            raise ConfigError(f"variant.prefix_fractions: must end at 1.0 (the whole "
                              f"dictionary), got {fractions}")
        widths = self.prefix_widths
        if any(w <= 0 for w in widths) or any(a >= b for a, b in zip(widths, widths[1:])):
            raise ConfigError(f"variant.prefix_fractions: {fractions} of width {self.d_sae} "
                              f"give prefixes {widths}; they must be positive and increasing")

    @property
    def prefix_widths(self) -> list[int]:
        """Number of latents in each nested prefix (rounded), the last the whole width."""
        return [round(fraction * self.d_sae) for fraction in self.prefix_fractions]


class MatryoshkaBatchTopKSAE(BatchTopKSAE):
    """BatchTopK codes; the decoder also returns each inner prefix's reconstruction, in
    extras["prefix_x_hats"] ([n_prefixes - 1, ..., d]), whenever extras are passed."""

    config_class = MatryoshkaConfig
    provides = frozenset({"prefix_x_hats"})

    def decode(self, f, extras=None):
        if extras is None:
            return super().decode(f)
        partial = self.group_reconstructions(f).cumsum(0) + self.b_dec
        extras["prefix_x_hats"] = partial[:-1]
        return partial[-1]

    def group_reconstructions(self, f: Tensor | SparseCodes) -> Tensor:
        """[n_prefixes, ..., d]: Σ over each group's latents (those of prefix i and not of
        prefix i-1) of f_j W_dec[j], sparse from BatchTopK's selection in training."""
        bounds = [0, *self.cfg.prefix_widths]
        if not isinstance(f, SparseCodes):
            return torch.stack([f[..., a:b] @ self.W_dec[a:b]
                                for a, b in zip(bounds, bounds[1:])])
        n_groups = len(bounds) - 1
        group = torch.bucketize(f.latents, torch.tensor(bounds[1:-1], device=f.latents.device),
                                right=True)
        bags = group * f.n_tokens + f.tokens  # one bag per (group, token), groups outermost
        sums = bag_sums(bags, f.latents, f.values, n_groups * f.n_tokens, self.W_dec)
        return sums.view(n_groups, *f.shape[:-1], -1)
