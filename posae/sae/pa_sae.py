"""PA-SAE (000): position-specific feature masks, adaptive per-position rates, and the
gradient statistics behind its importance-weighted L1.

    f_l = ReLU(m_l ⊙ pre)                                            (000 eq. 2-3)
      m_l = sigmoid(M_l) (soft) | 1[sigmoid(M_l) > 1/2] with a straight-through gradient
            (hard) | 1 (mask: none);  M ∈ R^{L×k} learned logits
            | sigmoid(M_l) with M frozen at its initial value (fixed: our control for soft)
    ∂L/∂f_l ← ∂L/∂f_l · α_l / α_0 in the backward pass: α_l weighs what tokens at
            position l teach latent i
    α_l ← clip(α_l (1 + γ (g_l - mean_l g_l)), α_min, α_max)          (000 eq. 4)
    EMA_l ← β EMA_l + (1 - β) g_l;  w = softmax over positions of EMA (000 eq. 6)
      w ← clip(L·w, 1/b, b) / L when `importance_bound` b is set (ours, not 000's)

g_{l,i} is the mean over the last step's tokens at position l of the per-token gradient
|∂L_token/∂f_{l,i}|: a gradient hook on the codes reads ∂L/∂f of the batch-mean loss and
multiplies it by the trainer's token-gradient scale (the number of tokens the loss averages,
÷ any fp16 loss scale), so that γ = 0.01 and the bounds 0.001–0.1 act on gradients of the
size 000 means. `CodeGradientStatistics`, the SAE's step hook, sums the statistics over
processes and applies eq. 4 and 6 when the step ends (posae/training/hooks.py).
Readings (docs/variants.md): α and w are per (position, latent), as 000 §5.1 sizes them.
000 calls α "position-specific learning rates" and leaves it out of eq. 3, so the forward
pass is eq. 3 as written and α scales the gradient that flows back through f_{l,i} (÷ α_0).
Under Adam this is a re-weighting, not a learning rate: a factor common to all of a
parameter's gradient cancels in Adam's normalisation (the mask logit M_{l,i} is not sped
up), and what remains is how much each position's tokens weigh in the gradient of latent
i's encoder row and bias, between 0.1× and 10× each other (α_min, α_max). (Multiplying the
pre-activations by α/α_0 instead, our first reading, is unstable with per-token gradients:
rates grow where the error is large, which makes codes and error larger.) w is handed to
the `importance_l1` term as L·w, so uniform weights give the plain L1.
g includes the gradient of the importance-weighted L1 itself (λ·L·w_{l,i} wherever the code
is active), so a (position, latent) whose weight rises records a larger gradient, which
raises its weight: on MiniLM at L0 ≤ 32 some latents put their whole L1 on one position
(L·w = L there, 0 elsewhere; `mech/importance_collapsed_latents` counts them, on the
unclipped weights). The bound b, off by default, limits how far the weights the loss sees
can go, as eq. 4's bounds limit the rates; the loop underneath still runs, and clipped
weights no longer sum to L (`mech/importance_weight_clipped_fraction`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from posae.config import ConfigError
from posae.sae.base import SAE, PositionalConfig, per_position
from posae.training.hooks import StepContext, StepEnd, StepHook

INITIAL_MASK_LOGIT = {"soft": 2.0, "fixed": 2.0, "hard": 0.05, "none": 0.0}


def importance_weights(importance_ema: Tensor) -> Tensor:
    """L·w of eq. 6 (L × k): L times the softmax over positions of the EMA."""
    return len(importance_ema) * torch.softmax(importance_ema.float(), 0)


def collapsed_latents(weights: Tensor) -> Tensor:
    """Latents with more than half of their weight L·w (L in all) on one position."""
    return weights.max(0).values > len(weights) / 2


@dataclass
class PASAEConfig(PositionalConfig):
    # soft | hard | none | fixed (soft's sigmoid(M) with M frozen: a control, not 000's)
    mask: str = "soft"
    # Initial mask logits M. null: 2.0 for soft masks (sigmoid 0.88, every latent open) and
    # 0.05 for hard masks (open, 0.05 from the threshold: Adam moves a logit by about lr a
    # step, so at 2.0 a hard mask could not close within 000's ~4,900 steps at 3e-4).
    mask_init: Optional[float] = None
    adaptive_rates: bool = True
    rate_init: float = 0.01
    rate_min: float = 0.001
    rate_max: float = 0.1
    rate_gamma: float = 0.01
    importance_beta: float = 0.9
    # null: eq. 6 as written. b > 1: L·w clipped to [1/b, b] (ours, against the collapse)
    importance_bound: Optional[float] = None

    @property
    def initial_mask_logit(self) -> float:
        return INITIAL_MASK_LOGIT[self.mask] if self.mask_init is None else self.mask_init

    def validate(self) -> None:
        if self.mask not in INITIAL_MASK_LOGIT:
            raise ConfigError(f"variant.mask: {self.mask!r} is not one of "
                              f"{', '.join(INITIAL_MASK_LOGIT)}")
        if not 0 < self.rate_min <= self.rate_init <= self.rate_max:
            raise ConfigError(f"variant.rate_init: needs 0 < rate_min <= rate_init <= rate_max, "
                              f"got {self.rate_min}, {self.rate_init}, {self.rate_max}")
        if self.importance_bound is not None and not self.importance_bound > 1:
            raise ConfigError(f"variant.importance_bound: needs null or a number > 1, got "
                              f"{self.importance_bound}")


class PASAE(SAE):
    config_class = PASAEConfig
    provides = frozenset({"position_weights"})
    needs_positions = True

    def __init__(self, cfg: PASAEConfig):
        super().__init__(cfg)
        L, k = cfg.context_size, cfg.d_sae
        logits = torch.full((L, k), cfg.initial_mask_logit)
        if cfg.mask == "fixed":
            self.register_buffer("mask_logits", logits)
        else:
            self.mask_logits = nn.Parameter(logits)
        self.register_buffer("rates", torch.full((L, k), cfg.rate_init))
        self.register_buffer("importance_ema", torch.zeros(L, k))
        self.register_buffer("grad_sum", torch.zeros(L, k))
        self.register_buffer("grad_count", torch.zeros(L))
        # ∂(one token's loss)/∂(the step's loss), set by the step hook before each forward
        self.token_gradient_scale = 1.0

    def leaves_parameters_unused(self) -> bool:
        return self.cfg.mask == "none"  # the mask logits exist but take no part

    def step_hooks(self) -> list[StepHook]:
        # made when asked (its state is the SAE's buffers): an SAE holding a hook that holds
        # the SAE would be a reference cycle, freed only by the cycle collector
        return [CodeGradientStatistics(self)]

    def position_mask(self, pos: Tensor) -> Tensor:
        if self.cfg.mask == "none":
            return torch.ones((), device=pos.device)
        soft = torch.sigmoid(per_position(self.mask_logits, pos))
        if self.cfg.mask in ("soft", "fixed"):
            return soft
        return (soft > 0.5).to(soft.dtype) + soft - soft.detach()

    def encode_with_pre(self, x, pos, mask):
        pre = self.pre_activations(x)
        f = torch.relu(self.position_mask(pos) * pre)
        if self.training and f.requires_grad:
            counted = torch.ones_like(pos, dtype=f.dtype) if mask is None else mask.to(f.dtype)
            f.register_hook(lambda grad: self._on_code_gradient(grad, pos, counted))
        return f, pre, {"position_weights": per_position(self.position_weights(), pos)}

    def position_weights(self) -> Tensor:
        """L·w as the loss uses it: clipped to [1/b, b] when `importance_bound` b is set."""
        bound = self.cfg.importance_bound
        weights = importance_weights(self.importance_ema)
        return weights if bound is None else weights.clamp(1 / bound, bound)

    @torch.no_grad()
    def _on_code_gradient(self, grad: Tensor, pos: Tensor, counted: Tensor) -> Tensor:
        """Record the per-token gradient statistics of eq. 4 and 6, and return the gradient
        scaled by each (position, latent)'s learning rate α/α_0."""
        per_token = grad.abs().float() * self.token_gradient_scale * counted[..., None]
        self.grad_sum.index_add_(0, pos.flatten(), per_token.flatten(0, 1))
        self.grad_count.index_add_(0, pos.flatten(), counted.flatten().float())
        if not self.cfg.adaptive_rates:
            return grad
        return grad * (per_position(self.rates, pos) / self.cfg.rate_init).to(grad.dtype)

    @torch.no_grad()
    def apply_gradient_statistics(self) -> None:
        """Eq. 4 and eq. 6 with the per-token gradients recorded since the last call (summed
        over processes), then a fresh record."""
        seen = self.grad_count > 0
        if seen.any() and bool(self.grad_sum.isfinite().all()):
            # (else nothing was recorded, or an fp16 step's gradients overflowed: the
            # optimiser skips that step too)
            g = self.grad_sum[seen] / self.grad_count[seen, None]
            if self.cfg.adaptive_rates:
                factor = 1 + self.cfg.rate_gamma * (g - g.mean(0, keepdim=True))
                self.rates[seen] = (self.rates[seen] * factor).clamp(self.cfg.rate_min,
                                                                     self.cfg.rate_max)
            beta = self.cfg.importance_beta
            self.importance_ema[seen] = beta * self.importance_ema[seen] + (1 - beta) * g
        self.grad_sum.zero_()
        self.grad_count.zero_()

    @torch.no_grad()
    def mechanism_state(self) -> dict[str, float]:
        state = {}
        if self.cfg.mask != "none":
            soft = torch.sigmoid(self.mask_logits)
            state["mask_mean"] = soft.mean().item()
            state["mask_open_fraction"] = (soft > 0.5).float().mean().item()
        if self.cfg.adaptive_rates:
            state.update(rate_min=self.rates.min().item(), rate_mean=self.rates.mean().item(),
                         rate_max=self.rates.max().item())
        unclipped, weights = importance_weights(self.importance_ema), self.position_weights()
        collapsed = collapsed_latents(unclipped)
        state.update(importance_weight_min=weights.min().item(),
                     importance_weight_max=weights.max().item(),
                     importance_weight_std=weights.std().item(),
                     importance_collapsed_latents=float(collapsed.sum().item()),
                     importance_weight_clipped_fraction=(weights != unclipped).float()
                     .mean().item())
        return state


class CodeGradientStatistics(StepHook):
    """PA-SAE's per-step state (000 eq. 4, 6): before the forward, the factor that turns a
    gradient of the step's loss into one token's (the loss is a mean over n tokens, × n,
    and may carry an fp16 loss scale, ÷ scale); after the step, the gradients recorded by
    the code hook, summed over processes, update the rates and the importance EMA."""

    def __init__(self, sae: PASAE):
        self.sae = sae

    def on_step_start(self, ctx: StepContext) -> None:
        self.sae.token_gradient_scale = ctx.n_tokens / ctx.loss_scale

    def on_step_end(self, end: StepEnd, reduce) -> None:
        sae = self.sae
        sae.grad_sum.copy_(reduce(sae.grad_sum, "sum"))
        sae.grad_count.copy_(reduce(sae.grad_count, "sum"))
        sae.apply_gradient_statistics()
