"""PA-SAE (000): position-specific feature masks, adaptive per-position rates, and the
gradient statistics behind its importance-weighted L1.

    f_l = ReLU(m_l ⊙ pre · α_l / α_0)                                (000 eq. 2-3)
      m_l = sigmoid(M_l) (soft) | 1[sigmoid(M_l) > 1/2] with a straight-through gradient
            (hard) | 1 (mask: none);  M ∈ R^{L×k} learned logits
    α_l ← clip(α_l (1 + γ (g_l - mean_l g_l)), α_min, α_max)          (000 eq. 4)
    EMA_l ← β EMA_l + (1 - β) g_l;  w = softmax over positions of EMA (000 eq. 6)

g_{l,i} is the mean |∂L/∂f_{l,i}| at position l over the last step's tokens, captured by a
gradient hook on the codes and applied in `before_step` (all-reduced across processes).
Readings (docs/variants.md): α and w are per (position, latent), as 000 §5.1 sizes them;
α is not an optimiser setting but a buffer that multiplies the pre-activations, divided by
its initial value α_0 so that training starts from the baseline's scale; w is handed to the
`importance_l1` term as L·w, so uniform weights give the plain L1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from posae.sae.base import SAE, PositionalConfig, SAEOutput, per_position


@dataclass
class PASAEConfig(PositionalConfig):
    # soft | hard | none
    mask: str = "soft"
    # initial mask logits: sigmoid(2) = 0.88, every feature open at every position
    mask_init: float = 2.0
    adaptive_rates: bool = True
    rate_init: float = 0.01
    rate_min: float = 0.001
    rate_max: float = 0.1
    rate_gamma: float = 0.01
    importance_beta: float = 0.9


class PASAE(SAE):
    config_class = PASAEConfig

    def __init__(self, cfg: PASAEConfig):
        super().__init__(cfg)
        if cfg.mask not in ("soft", "hard", "none"):
            raise ValueError(f"variant.mask: {cfg.mask!r} is not one of soft, hard, none")
        L, k = cfg.context_size, cfg.d_sae
        self.mask_logits = nn.Parameter(torch.full((L, k), cfg.mask_init))
        self.register_buffer("rates", torch.full((L, k), cfg.rate_init))
        self.register_buffer("importance_ema", torch.zeros(L, k))
        self.register_buffer("grad_sum", torch.zeros(L, k))
        self.register_buffer("grad_count", torch.zeros(L))

    def position_mask(self, pos: Tensor) -> Tensor:
        if self.cfg.mask == "none":
            return torch.ones((), device=pos.device)
        soft = torch.sigmoid(per_position(self.mask_logits, pos))
        if self.cfg.mask == "soft":
            return soft
        return (soft > 0.5).to(soft.dtype) + soft - soft.detach()

    def scaled_pre(self, pre: Tensor, pos: Tensor) -> Tensor:
        scale = self.position_mask(pos)
        if self.cfg.adaptive_rates:
            scale = scale * per_position(self.rates, pos) / self.cfg.rate_init
        return pre * scale

    def encode(self, x, pos=None, mask=None):
        if pos is None:
            raise ValueError("PA-SAE needs token positions")
        return torch.relu(self.scaled_pre(self.pre_activations(x), pos))

    def forward(self, x, pos=None, mask=None) -> SAEOutput:
        if pos is None:
            raise ValueError("PA-SAE needs token positions")
        pre = self.pre_activations(x)
        f = torch.relu(self.scaled_pre(pre, pos))
        if self.training and f.requires_grad:
            counted = torch.ones_like(pos, dtype=f.dtype) if mask is None else mask.to(f.dtype)
            f.register_hook(lambda grad: self._record_gradients(grad, pos, counted))
        weights = self.cfg.context_size * per_position(torch.softmax(self.importance_ema, 0), pos)
        return SAEOutput(self.decode(f), f, pre, {"position_weights": weights})

    @torch.no_grad()
    def _record_gradients(self, grad: Tensor, pos: Tensor, counted: Tensor) -> None:
        self.grad_sum.index_add_(0, pos.flatten(),
                                 (grad.abs() * counted[..., None]).flatten(0, 1).float())
        self.grad_count.index_add_(0, pos.flatten(), counted.flatten().float())

    @torch.no_grad()
    def before_step(self, step: int) -> None:
        """Apply eq. 4 and eq. 6 with the gradients recorded in the previous step."""
        if dist.is_available() and dist.is_initialized():
            # each process saw world x the gradient of its tokens (its loss is normalised by
            # its share of the global batch), so the sum over processes is divided by world
            dist.all_reduce(self.grad_sum)
            dist.all_reduce(self.grad_count)
            self.grad_sum /= dist.get_world_size()
        seen = self.grad_count > 0
        if not seen.any():
            return
        g = self.grad_sum[seen] / self.grad_count[seen, None]
        if self.cfg.adaptive_rates:
            factor = 1 + self.cfg.rate_gamma * (g - g.mean(0, keepdim=True))
            self.rates[seen] = (self.rates[seen] * factor).clamp(self.cfg.rate_min,
                                                                 self.cfg.rate_max)
        beta = self.cfg.importance_beta
        self.importance_ema[seen] = beta * self.importance_ema[seen] + (1 - beta) * g
        self.grad_sum.zero_()
        self.grad_count.zero_()
