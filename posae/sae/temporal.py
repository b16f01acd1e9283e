"""Temporal SAE of "Priors in Time" (Lubana, Rager, Hindupur et al. 2025, arXiv 2511.01836),
computing what the authors' code and sae-lens's `temporal` class compute, so that its saved
weights load there (posae.sae.saelens).

Each activation is split into a predictable part, read from the codes of the tokens before
it, and a novel part, sparse codes of what is left (eq. 3: x_t = D z_p,t + D z_n,t). With
x0 = (x - b_dec) · s (s the input scale, `input_scale`), tied encoder Dᵀ, λ = 1/(4 d_in):

    r ← x0, z_p ← 0; for each attention layer:
        z_in  = ReLU(λ r Dᵀ)                        codes of every token
        ctx_t = [0, z_in,0 … z_in,t-1]              the past, behind a zero slot
        a_t   = ReLU(Attention(query z_in,t, keys and values ctx_t))   causal, per head
        c_t   = <a_t D, r_t> / (‖a_t D‖ + ε)²       least-squares scale onto r_t
        z_p  += c_t a_t;   r ← r - c_t a_t D
    z_n = TopK_k(ReLU(λ r Dᵀ))                      (ReLU alone when k is null)
    x̂  = (z_n + z_p) D / s + b_dec                  eq. 4's reconstruction

The codes f are z_n (what L0, the sparsity terms and the evaluation see, as sae-lens's
`encode`); z_p is in extras["predicted_codes"] and enters only x̂. A token attends only to
counted tokens of its own document: an uncounted token (BOS, a document separator,
padding) is never attended to, and it ends the context, so a packed sequence's documents
do not see each other. sae-lens attends to every token of its input: the two agree on
inputs where every token counts (one document, no BOS).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from posae.config import ConfigError
from posae.sae.base import SAE, SAEConfig

EPS = 1e-6


@dataclass
class TemporalConfig(SAEConfig):
    # The authors' Gemma-2-2b settings: width 4 x d, an unnormalised N(0, 1) dictionary.
    expansion_factor: int = 4
    normalize_decoder: bool = False
    decoder_init: str = "standard_normal"
    # Novel codes keep each token's k largest (sae-lens's `topk`).
    k: int = 32
    # 0: no predicted part (the novel codes alone: a control for what the attention adds)
    n_attn_layers: int = 1
    n_heads: int = 4
    # Query and key width = d_sae / bottleneck_factor (the authors use 1, full width).
    bottleneck_factor: int = 1

    def validate(self) -> None:
        if not 1 <= self.k <= self.d_sae:
            raise ConfigError(f"variant.k: must be in 1..{self.d_sae} (the width), got {self.k}")
        if self.n_attn_layers < 0 or self.n_heads < 1 or self.bottleneck_factor < 1:
            raise ConfigError("variant.n_heads and bottleneck_factor must be positive, and "
                              "n_attn_layers non-negative (0: no predicted part, a control)")
        if self.d_sae % (self.bottleneck_factor * self.n_heads):
            raise ConfigError(f"variant: the width {self.d_sae} must be divisible by "
                              f"bottleneck_factor x n_heads = "
                              f"{self.bottleneck_factor * self.n_heads}")
        if self.normalize_decoder:
            raise ConfigError("variant.normalize_decoder: the Temporal SAE's dictionary is "
                              "not norm-constrained (its codes scale with it); set false")


class CodeAttention(nn.Module):
    """Multi-head causal attention in code space (sae-lens's `ManualAttention`): queries from
    the current codes, keys and values from the shifted past, then an output projection.
    Parameter names are sae-lens's."""

    def __init__(self, d_sae: int, n_heads: int, bottleneck_factor: int):
        super().__init__()
        self.n_heads, d_qk = n_heads, d_sae // bottleneck_factor
        self.k_ctx, self.q_target = nn.Linear(d_sae, d_qk), nn.Linear(d_sae, d_qk)
        self.v_ctx, self.c_proj = nn.Linear(d_sae, d_sae), nn.Linear(d_sae, d_sae)
        with torch.no_grad():  # the authors' init: rows rescaled to these norms
            for linear, fan in ((self.k_ctx, d_qk // n_heads), (self.q_target, d_qk // n_heads),
                                (self.v_ctx, d_sae // n_heads), (self.c_proj, d_sae)):
                linear.weight *= fan ** -0.5 / (EPS + linear.weight.norm(dim=1, keepdim=True))

    def forward(self, context: Tensor, query: Tensor, allowed: Tensor | None) -> Tensor:
        """`allowed` [B, 1, T, T] (True: may attend), or None for the plain causal mask."""
        B, T, _ = query.shape

        def heads(t: Tensor) -> Tensor:
            return t.view(B, T, self.n_heads, -1).transpose(1, 2)

        q = heads(self.q_target(query))
        k, v = heads(self.k_ctx(context)), heads(self.v_ctx(context))
        if allowed is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return self.c_proj(out.transpose(1, 2).reshape(B, T, -1))


class TemporalSAE(SAE):
    """The Temporal SAE (2511.01836 eq. 3-4, as its code computes them; module docstring):
    novel codes are `f`, predicted codes `extras["predicted_codes"]`."""

    config_class = TemporalConfig
    provides = frozenset({"predicted_codes"})
    resamplable = False  # the encoder is the dictionary itself

    def __init__(self, cfg: TemporalConfig):
        super().__init__(cfg)
        del self.W_enc, self.b_enc  # tied encoder Dᵀ and no encoder bias, as the authors'
        self.attn_layers = nn.ModuleList(
            CodeAttention(cfg.d_sae, cfg.n_heads, cfg.bottleneck_factor)
            for _ in range(cfg.n_attn_layers))
        self.lam = 1 / (4 * cfg.d_in)
        # posae feeds E‖x‖ = √d; the authors' inputs have E‖x‖ = 1
        self.register_buffer("input_scale", torch.tensor(cfg.d_in ** -0.5))

    def codes_of(self, r: Tensor) -> Tensor:
        """ReLU(λ r Dᵀ): the codes the attention reads (the tied encoder, no bias)."""
        return torch.relu(self.lam * r @ self.W_dec.t())

    def encode_with_pre(self, x, pos, mask):
        if x.dim() != 3:
            raise ValueError(f"the Temporal SAE reads whole sequences: x must be [batch, "
                             f"tokens, d], got shape {tuple(x.shape)}")
        r = (x - self.b_dec) * self.input_scale
        allowed = None if mask is None else context_allowed(mask)
        predicted = torch.zeros(*x.shape[:-1], self.cfg.d_sae, dtype=x.dtype, device=x.device)
        for attention in self.attn_layers:
            z_in = self.codes_of(r)
            context = F.pad(z_in[:, :-1], (0, 0, 1, 0))
            a = torch.relu(attention(context, z_in, allowed))
            a_dec = a @ self.W_dec
            c = (a_dec * r).sum(-1, keepdim=True) / (a_dec.norm(dim=-1, keepdim=True) + EPS) ** 2
            predicted = predicted + c * a
            r = r - c * a_dec
        pre = self.lam * r @ self.W_dec.t()
        values, indices = torch.relu(pre).topk(self.cfg.k, dim=-1, sorted=False)
        f = torch.zeros_like(pre).scatter(-1, indices, values)
        return f, pre, {"predicted_codes": predicted}

    def decode(self, f, extras=None):
        """x̂ from the novel codes and, when extras carry them, the predicted ones (without,
        the novel part alone, as sae-lens's `decode`)."""
        if extras and "predicted_codes" in extras:
            f = f + extras["predicted_codes"]
        return f @ self.W_dec / self.input_scale + self.b_dec

    @torch.no_grad()
    def fold_input_scale_(self, scale: float) -> None:
        """Trained on c·x, act on x: (c x - b)·s = (x - b/c)(c s), and x̂/c."""
        self.input_scale *= scale
        self.b_dec /= scale

    def mechanism_state(self) -> dict[str, float]:
        """The attention's weight norm: it moves when the predicted part is trained."""
        return {"attention_norm": math.sqrt(sum(p.pow(2).sum().item()
                                                for p in self.attn_layers.parameters()))}


def context_allowed(mask: Tensor) -> Tensor:
    """[B, 1, T, T]: query t may attend to slot 0 (the zero vector) always, and to slot
    j ≤ t (token j - 1) when that token counts and no uncounted token lies between it and
    t (the same document)."""
    T = mask.shape[1]
    document = (~mask).cumsum(1)                       # changes at each uncounted token
    slot_counts = F.pad(mask[:, :-1], (1, 0), value=True)
    slot_document = F.pad(document[:, :-1], (1, 0))
    same = slot_document[:, None, :] == document[:, :, None]
    same[:, :, 0] = True
    causal = torch.ones(T, T, dtype=torch.bool, device=mask.device).tril()
    return (causal & slot_counts[:, None, :] & same)[:, None]
