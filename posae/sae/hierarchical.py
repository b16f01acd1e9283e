"""Hierarchical global/positional SAE (002 eq. 2-6).

    f_g = ReLU(W_g (x - b_dec) + b_g)                       global half, k/2 latents (eq. 2)
    f_p = ReLU(W_p (x - b_dec + p_t) + b_p)                 positional half, k/2   (eq. 3)
    α_t = MultiHead(Q = p_t W_Q, K = P W_K, V = P W_V)      attention routing      (eq. 4)
    g_t = sigmoid(w_t)                                      learned gate           (eq. 4)
    f   = [f_g ; g_t ⊙ (f_p + α_t)],   x̂ = W_dec f + b_dec                         (eq. 5-6)

P [L, d] is the learned position embedding (p_t its row t); `variant.position_embedding`,
`variant.routing` and `variant.gate` switch each mechanism off for ablations. Reading
(docs/variants.md): 002 does not say what the routing attends over; here each position's
query attends over all L position embeddings (8 heads, key/query dim 64), so α_t is a
learned, position-dependent offset of the positional codes computed by attention, and
every token's codes still depend on that token alone. w_t is a learned [L, k/2] gate.
The centring on b_dec follows the baseline; W_g and W_p are the two halves of W_enc.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from posae.sae.base import SAE, PositionalConfig, SAEOutput, per_position


@dataclass
class HierarchicalConfig(PositionalConfig):
    heads: int = 8
    head_dim: int = 64
    # switches for ablations: each mechanism of eq. 3-5 can be turned off
    position_embedding: bool = True
    routing: bool = True
    gate: bool = True


class HierarchicalSAE(SAE):
    config_class = HierarchicalConfig

    def __init__(self, cfg: HierarchicalConfig):
        super().__init__(cfg)
        if cfg.d_sae % 2:
            raise ValueError("variant: the hierarchical SAE needs an even number of latents")
        L, d, half = cfg.context_size, cfg.d_in, cfg.d_sae // 2
        # only the switched-on mechanisms get parameters (data parallelism needs every
        # parameter to receive a gradient)
        if cfg.position_embedding or cfg.routing:
            self.position_embedding = nn.Parameter(torch.zeros(L, d))
        if cfg.routing:
            inner = cfg.heads * cfg.head_dim
            self.query = nn.Linear(d, inner, bias=False)
            self.key = nn.Linear(d, inner, bias=False)
            self.value = nn.Linear(d, half, bias=False)
            nn.init.zeros_(self.value.weight)  # routing starts as a no-op
        if cfg.gate:
            self.gate_logits = nn.Parameter(torch.zeros(L, half))

    @property
    def half(self) -> int:
        return self.cfg.d_sae // 2

    def routing(self) -> Tensor:
        """α for every position: [L, k/2]."""
        P, h, e = self.position_embedding, self.cfg.heads, self.cfg.head_dim
        q = self.query(P).view(-1, h, e).transpose(0, 1)
        k = self.key(P).view(-1, h, e).transpose(0, 1)
        weights = torch.softmax(q @ k.transpose(1, 2) / self.cfg.d_in ** 0.5, dim=-1)
        return weights.mean(0) @ self.value(P)

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

    def forward(self, x, pos=None, mask=None) -> SAEOutput:
        if pos is None:
            raise ValueError("the hierarchical SAE needs token positions")
        shift, scale, offset = self.position_tables()
        pre = self.pre_activations(x) + per_position(shift, pos)
        f = torch.relu(pre) * per_position(scale, pos) + per_position(offset, pos)
        return SAEOutput(self.decode(f), f, pre, {"global_codes": f[..., : self.half],
                                                  "positional_codes": f[..., self.half :]})

    def encode(self, x, pos=None, mask=None):
        return self.forward(x, pos, mask).f

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
