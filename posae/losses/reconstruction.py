"""Reconstruction terms."""

from __future__ import annotations

from posae.losses.base import LossTerm


class MSE(LossTerm):
    """‖x - x̂‖² per token (000 eq. 1, first term)."""

    def per_token(self, out, batch, ctx):
        return (out.x_hat.float() - batch.x).pow(2).sum(-1)


class GatedAux(LossTerm):
    """Gated SAE auxiliary loss ‖x - x̂_frozen(ReLU(π_gate))‖² (Rajamanoharan et al. 2024, eq. 8)."""

    def per_token(self, out, batch, ctx):
        return (out.extras["aux_x_hat"].float() - batch.x).pow(2).sum(-1)
