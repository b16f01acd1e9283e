"""Reconstruction terms."""

from __future__ import annotations

from posae.losses.base import LossTerm


class MSE(LossTerm):
    """‖x - x̂‖² per token (000 eq. 1, first term)."""

    def per_token(self, out, batch, ctx):
        return (out.x_hat.float() - batch.x).pow(2).sum(-1)


class PrefixMSE(LossTerm):
    """Σ_i ‖x - x̂_{m_i}‖² over the inner nested prefixes of a Matryoshka SAE (Bussmann et
    al. 2025; T-SAE's L_H, 2511.05541 §3.2); with `mse` (the outermost prefix) it is the
    Matryoshka reconstruction loss, every prefix weighted 1."""

    requires = ("prefix_x_hats",)

    def per_token(self, out, batch, ctx):
        return (out.extras["prefix_x_hats"].float() - batch.x).pow(2).sum(-1).sum(0)


class GatedAux(LossTerm):
    """Gated SAE auxiliary loss ‖x - x̂_frozen(ReLU(π_gate))‖² (Rajamanoharan et al. 2024, eq. 8)."""

    requires = ("aux_x_hat",)

    def per_token(self, out, batch, ctx):
        return (out.extras["aux_x_hat"].float() - batch.x).pow(2).sum(-1)


class PositionWeightedMSE(LossTerm):
    """Σ_t w_t ‖x_t - x̂_t‖² with w_t = 1 + t/L (002 eq. 7), t the true position (0-based)
    and L the context size: 1 at the first position, 2 - 1/L at the last."""

    def __init__(self, context_size: int, coef: float = 1.0, warmup_steps: int = 0):
        super().__init__(coef, warmup_steps)
        self.context_size = context_size

    def per_token(self, out, batch, ctx):
        weight = 1 + batch.pos.float() / self.context_size
        return weight * (out.x_hat.float() - batch.x).pow(2).sum(-1)
