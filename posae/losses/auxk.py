"""AuxK (Gao et al. 2024, section A.2): reconstruct the main residual from dead latents.

    e = x - x̂ (no gradient),  ê = Σ over the k_aux largest dead pre-activations (ReLU'd)
    of their decoder rows,    L_aux = ‖e - ê‖²   (zero when no latent is dead)
"""

from __future__ import annotations

import torch

from posae.losses.base import LossTerm
from posae.sae.sparse import sparse_decode


class AuxK(LossTerm):
    def __init__(self, coef: float = 1 / 32, k_aux: int = 256, warmup_steps: int = 0):
        super().__init__(coef, warmup_steps)
        self.k_aux = k_aux

    def per_token(self, out, batch, ctx):
        n_dead = int(ctx.dead.sum())
        if n_dead == 0:
            return out.pre.new_zeros(out.pre.shape[:-1])
        residual = (batch.x - out.x_hat.float()).detach()
        dead_pre = out.pre.masked_fill(~ctx.dead, float("-inf"))
        values, indices = dead_pre.topk(min(self.k_aux, n_dead), dim=-1, sorted=False)
        estimate = sparse_decode(indices, torch.relu(values), ctx.sae.W_dec)
        return (residual - estimate.float()).pow(2).sum(-1)
