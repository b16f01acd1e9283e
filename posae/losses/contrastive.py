"""Position-contrastive term for 002's "contrastive" variant.

Reading (docs/variants.md): 002 cites SimCLR and aims at codes that identify position, so
the term is a supervised contrastive loss (Khosla et al. 2020) with the token position as
the label: over a sample of counted tokens, with z = f/‖f‖,
    L = -mean_a log( Σ_{p: pos_p = pos_a, p ≠ a} e^{z_a·z_p/τ} / Σ_{b ≠ a} e^{z_a·z_b/τ} ),
anchors without a positive left out. Tokens are sampled without replacement with the
torch generator, so runs stay reproducible.
"""

from __future__ import annotations

import torch
from torch import Tensor

from posae.losses.base import LossTerm, StepContext


def supervised_contrastive(z: Tensor, labels: Tensor, temperature: float) -> Tensor:
    sim = (z @ z.t()) / temperature
    self_mask = torch.eye(len(z), dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(self_mask, float("-inf"))
    positive = (labels[:, None] == labels[None, :]) & ~self_mask
    has_positive = positive.any(1)
    if not has_positive.any():
        return z.new_zeros(())
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    pos_log = torch.logsumexp(log_prob.masked_fill(~positive, float("-inf")), dim=1)
    return -pos_log[has_positive].mean()


class PositionContrastive(LossTerm):
    def __init__(self, coef: float = 0.1, temperature: float = 0.1, sample: int = 512,
                 warmup_steps: int = 0):
        super().__init__(coef, warmup_steps)
        self.temperature, self.sample = temperature, sample

    def __call__(self, out, batch, ctx: StepContext) -> Tensor:
        f, pos = out.f[batch.mask].float(), batch.pos[batch.mask]
        if len(f) > self.sample:
            keep = torch.randperm(len(f), device=f.device)[: self.sample]
            f, pos = f[keep], pos[keep]
        z = f / f.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        return supervised_contrastive(z, pos, self.temperature)
