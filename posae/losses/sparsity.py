"""Sparsity penalties."""

from __future__ import annotations

from posae.losses.base import LossTerm


class L1(LossTerm):
    """λ Σ_i |f_i| per token (000 eq. 1, second term). Architectures may name other codes
    to penalise in `extras["l1_codes"]` (the Gated SAE's ReLU(π_gate))."""

    sets_sparsity = True

    def per_token(self, out, batch, ctx):
        return out.extras.get("l1_codes", out.f).abs().sum(-1)


class ImportanceWeightedL1(LossTerm):
    """λ Σ_i w_{l,i} |f_{l,i}| per token at position l (000 eq. 5), with the weights the
    PA-SAE hands over in `extras["position_weights"]` (L·softmax over positions)."""

    requires = ("position_weights",)
    sets_sparsity = True

    def per_token(self, out, batch, ctx):
        return (out.extras["position_weights"] * out.f.abs()).sum(-1)


class L0(LossTerm):
    """λ Σ_i H(pre_i - θ_i) per token, the JumpReLU penalty with its STE (`extras["l0"]`)."""

    requires = ("l0",)
    sets_sparsity = True

    def per_token(self, out, batch, ctx):
        return out.extras["l0"]


class AdapterL1(LossTerm):
    """λ α_t ‖h_r - h_b‖₁ per token, the curriculum SAE's adapter penalty (004 eq. 5)."""

    requires = ("adapter_delta", "curriculum")

    def per_token(self, out, batch, ctx):
        return out.extras["curriculum"] * out.extras["adapter_delta"].abs().sum(-1)
