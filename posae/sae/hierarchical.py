"""Hierarchical global/positional SAE (002 eq. 2-6).

    f_g = ReLU(W_g (x - b_dec) + b_g)                       global half, k/2 latents (eq. 2)
    f_p = ReLU(W_p (x - b_dec + p_t) + b_p)                 positional half, k/2   (eq. 3)
    α_t = MultiHead(Q = p_t W_Q, K = P W_K, V = P W_V) W_O  attention routing      (eq. 4)
    g_t = sigmoid(w_t)                                      learned gate           (eq. 4)
    f   = [f_g ; g_t ⊙ (f_p + α_t)],   x̂ = W_dec f + b_dec                         (eq. 5-6)

P [L, d] is the learned position embedding (p_t its row t); `variant.position_embedding`,
`variant.routing` and `variant.gate` switch each mechanism off for ablations. Reading
(docs/variants.md): 002 does not say what the routing attends over; here each position's
query attends over all L position embeddings, as standard multi-head attention (Vaswani
et al. 2017): 8 heads, each with its own query, key and value projections of dim 64, the
heads concatenated and mapped to the k/2 positional latents by W_O. α_t is a learned,
position-dependent offset of the positional codes; every token's codes still depend on
that token alone. w_t is a learned [L, k/2] gate.

Initialisation: P ~ N(0, 0.02²) (as GPT-2's position embedding), so that attention over it
has a gradient even when eq. 3 does not use it (`position_embedding=false`); W_O = 0, so
routing starts as a no-op and W_O's gradient, (attention output)ᵀ ∂L/∂α, is not zero.
The centring on b_dec follows the baseline; W_g and W_p are the two halves of W_enc.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from posae.config import ConfigError
from posae.sae.base import SAE, PositionalConfig, per_position


@dataclass
class HierarchicalConfig(PositionalConfig):
    heads: int = 8
    head_dim: int = 64
    # switches for ablations: each mechanism of eq. 3-5 can be turned off
    position_embedding: bool = True
    routing: bool = True
    gate: bool = True
    # what an L1 term reads: the codes f of eq. 5, routing's offset g ⊙ α_t included (002 as
    # written), or, false, the input codes alone (a control, not in 002: does the L1 on the
    # input-independent offset hold the routing at zero?)
    penalise_offset: bool = True

    def validate(self) -> None:
        if self.d_sae % 2:
            raise ConfigError(f"variant: the hierarchical SAE needs an even number of latents, "
                              f"got {self.d_sae}")


class HierarchicalSAE(SAE):
    config_class = HierarchicalConfig
    needs_positions = True

    def __init__(self, cfg: HierarchicalConfig):
        super().__init__(cfg)
        L, d, half = cfg.context_size, cfg.d_in, cfg.d_sae // 2
        # only the switched-on mechanisms get parameters (data parallelism needs every
        # parameter to receive a gradient)
        if cfg.position_embedding or cfg.routing:
            self.position_embedding = nn.Parameter(torch.randn(L, d) * 0.02)
        if cfg.routing:
            inner = cfg.heads * cfg.head_dim
            self.query = nn.Linear(d, inner, bias=False)
            self.key = nn.Linear(d, inner, bias=False)
            self.value = nn.Linear(d, inner, bias=False)
            self.output = nn.Linear(inner, half, bias=False)
            nn.init.zeros_(self.output.weight)  # routing starts as a no-op
        if cfg.gate:
            self.gate_logits = nn.Parameter(torch.zeros(L, half))

    @property
    def half(self) -> int:
        return self.cfg.d_sae // 2

    def routing(self) -> Tensor:
        """α for every position: [L, k/2]."""
        P, h, e = self.position_embedding, self.cfg.heads, self.cfg.head_dim
        q, k, v = (proj(P).view(-1, h, e).transpose(0, 1)
                   for proj in (self.query, self.key, self.value))
        weights = torch.softmax(q @ k.transpose(1, 2) / self.cfg.d_in ** 0.5, dim=-1)
        heads = (weights @ v).transpose(0, 1).reshape(len(P), h * e)
        return self.output(heads)

    def position_tables(self) -> tuple[Tensor, Tensor, Tensor]:
        """Per-position [L, k] tables (shift, scale, offset) with
        pre_t = (x - b_dec) W_enc + b_enc + shift_t and f_t = ReLU(pre_t) ⊙ scale_t + offset_t:

            shift  = [0 ; p_t W_p]           eq. 3 by linearity, (x - b_dec + p_t) W_p
            scale  = [1 ; g_t]               eq. 4-5, the gate on the positional half
            offset = [0 ; g_t ⊙ α_t]         eq. 4-5, routing inside the gate

        so every token costs one encoder matmul and two element-wise ops, as a ReLU SAE."""
        L, half = self.cfg.context_size, self.half
        ones, zeros = self.b_enc.new_ones(L, half), self.b_enc.new_zeros(L, half)
        shift = (self.position_embedding @ self.W_enc[:, half:]
                 if self.cfg.position_embedding else zeros)
        gate = torch.sigmoid(self.gate_logits) if self.cfg.gate else ones
        routed = gate * self.routing() if self.cfg.routing else zeros
        return (torch.cat([zeros, shift], -1), torch.cat([ones, gate], -1),
                torch.cat([zeros, routed], -1))

    def encode_with_pre(self, x, pos, mask):
        shift, scale, offset = self.position_tables()
        pre = self.pre_activations(x) + per_position(shift, pos)
        input_codes = torch.relu(pre) * per_position(scale, pos)
        f = input_codes + per_position(offset, pos)
        extras = {"global_codes": f[..., : self.half], "positional_codes": f[..., self.half :],
                  "input_codes": input_codes}
        if not self.cfg.penalise_offset:
            extras["l1_codes"] = input_codes
        return f, pre, extras

    @torch.no_grad()
    def mechanism_state(self) -> dict[str, float]:
        state = {}
        if hasattr(self, "position_embedding"):
            state["position_embedding_norm"] = self.position_embedding.norm(dim=-1).mean().item()
        if self.cfg.routing:
            state["routing_norm"] = self.routing().norm(dim=-1).mean().item()
        if self.cfg.gate:
            state["gate_mean"] = torch.sigmoid(self.gate_logits).mean().item()
        return state

    @torch.no_grad()
    def fold_input_scale_(self, scale: float) -> None:
        """As the base SAE, and the position embedding joins the input: P/s, with the
        routing's projections of P scaled by s so that α is unchanged."""
        super().fold_input_scale_(scale)
        if hasattr(self, "position_embedding"):
            self.position_embedding /= scale
        if self.cfg.routing:
            for projection in (self.query, self.key, self.value):
                projection.weight *= scale
