"""SAEs whose latents are tied to position ranges: the masking runs of 002 and 004.

`PositionMaskedSAE`: f = ReLU(pre) ⊙ m[t], with a fixed mask per (position, latent):
  hard (002 "position masking", 004 runs 1-3): latents split into `n_ranges` equal groups;
      group r is open only on the r-th of n_ranges equal position ranges;
  gaussian (002 "soft masking", 004 runs 1-3): latent i centred at c_i = (i + 1/2) L / k,
      m = exp(-(t - c_i)² / 2σ²) with σ = L/8 unless set; with `cutoff` c set, m = 0
      beyond |t - c_i| > c σ (a control, not in 002 or 004: the exact Gaussian is never 0,
      so every latent can fire at every position);
  progressive (004 runs 6-8, `schedule_steps` > 0): m_eff = 1 - ρ_t (1 - m), the mask's
      strength ρ_t rising linearly from 0 to 1 over `schedule_steps`.
`PositionMaskedTopKSAE` (a control of the matched protocol, not in 002 or 004): hard masks
on a TopK SAE, each token keeping the k largest pre-activations among the latents its
position's range opens, so the masks act without an L1 penalty.
`RangeEncoderSAE` (004 "specialised encoders"): one encoder per position range, one
shared decoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from posae.config import ConfigError
from posae.sae.base import SAE, PositionalConfig, per_position, position_range
from posae.sae.topk import per_token_top_k
from posae.training.hooks import FollowSchedule, StepHook
from posae.training.schedule import Ramp


@dataclass
class PositionMaskedConfig(PositionalConfig):
    mask: str = "hard"
    n_ranges: int = 4
    sigma: Optional[float] = None
    cutoff: Optional[float] = None
    schedule_steps: int = 0

    def validate(self) -> None:
        if self.mask not in ("hard", "gaussian"):
            raise ConfigError(f"variant.mask: {self.mask!r} is not one of hard, gaussian")
        if not 1 <= self.n_ranges <= self.context_size:
            raise ConfigError(f"variant.n_ranges: must be in 1..context_size, got {self.n_ranges}")
        if self.cutoff is not None and (self.mask != "gaussian" or not self.cutoff > 0):
            raise ConfigError(f"variant.cutoff: a positive number of σ for mask=gaussian, got "
                              f"{self.cutoff} with mask={self.mask}")


class PositionMaskedSAE(SAE):
    decodes_sparsely = True  # ReLU codes times a fixed mask
    config_class = PositionMaskedConfig
    needs_positions = True

    def __init__(self, cfg: PositionMaskedConfig):
        super().__init__(cfg)
        L, k = cfg.context_size, cfg.d_sae
        t = torch.arange(L, dtype=torch.float32)[:, None]
        if cfg.mask == "hard":
            group = torch.arange(k) * cfg.n_ranges // k
            mask = (position_range(t.long(), cfg.n_ranges, L) == group).float()
        else:
            centre = (torch.arange(k, dtype=torch.float32) + 0.5) * L / k
            sigma = cfg.sigma or L / 8
            mask = torch.exp(-((t - centre) ** 2) / (2 * sigma ** 2))
            if cfg.cutoff is not None:
                mask = mask * ((t - centre).abs() <= cfg.cutoff * sigma)
        self.register_buffer("mask", mask, persistent=False)
        self.ramp = Ramp(1.0, delay=0, length=cfg.schedule_steps)  # 1 from the start without one
        self.register_buffer("strength", torch.tensor(self.ramp(0)))

    def step_hooks(self) -> list[StepHook]:
        return [FollowSchedule(self, "strength", self.ramp)] if self.cfg.schedule_steps else []

    def mechanism_state(self) -> dict[str, float]:
        return {"mask_strength": self.strength.item(),
                "mask_mean": (1 - self.strength * (1 - self.mask)).mean().item()}

    def effective_mask(self, pos: Tensor) -> Tensor:
        return 1 - self.strength * (1 - per_position(self.mask, pos))

    def encode_with_pre(self, x, pos, mask):
        pre = self.pre_activations(x)
        return torch.relu(pre) * self.effective_mask(pos), pre, {}


@dataclass
class PositionMaskedTopKConfig(PositionMaskedConfig):
    k: int = 32

    def validate(self) -> None:
        super().validate()
        if self.mask != "hard" or self.schedule_steps:
            raise ConfigError(f"variant.mask: the TopK masked SAE takes hard masks without a "
                              f"schedule (a Gaussian or ramped mask would scale the selected "
                              f"codes), got mask={self.mask}, schedule_steps={self.schedule_steps}")
        if not 1 <= self.k <= self.d_sae // self.n_ranges:
            raise ConfigError(f"variant.k: must be in 1..{self.d_sae // self.n_ranges} (the "
                              f"latents one position range opens), got {self.k}")


class PositionMaskedTopKSAE(PositionMaskedSAE):
    """Hard position masks on a TopK SAE: per token, the k largest pre-activations among the
    latents open at its position (`per_token_top_k` with the closed ones scored -inf)."""

    config_class = PositionMaskedTopKConfig

    def encode_with_pre(self, x, pos, mask):
        pre = self.pre_activations(x)
        closed = per_position(self.mask, pos) == 0
        scores = pre.detach().masked_fill(closed, float("-inf"))
        return per_token_top_k(self, x, pre, self.cfg.k, scores), pre, {}


@dataclass
class RangeEncoderConfig(PositionalConfig):
    n_ranges: int = 4


class RangeEncoderSAE(SAE):
    config_class = RangeEncoderConfig
    decodes_sparsely = True  # ReLU codes
    needs_positions = True

    def __init__(self, cfg: RangeEncoderConfig):
        super().__init__(cfg)
        self.W_enc = nn.Parameter(self.W_enc.detach()[None].repeat(cfg.n_ranges, 1, 1))
        self.b_enc = nn.Parameter(torch.zeros(cfg.n_ranges, cfg.d_sae))

    def pre_activations(self, x, pos=None):
        """(x - b_dec) W_r + b_r with r the range of each token's position."""
        ranges = position_range(pos, self.cfg.n_ranges, self.cfg.context_size)
        pre = x.new_zeros(*x.shape[:-1], self.cfg.d_sae)
        for r in range(self.cfg.n_ranges):
            rows = ranges == r
            if rows.any():
                pre[rows] = (x[rows] - self.b_dec) @ self.W_enc[r] + self.b_enc[r]
        return pre

    def encode_with_pre(self, x, pos, mask):
        pre = self.pre_activations(x, pos)
        return torch.relu(pre), pre, {}

    @torch.no_grad()
    def mechanism_state(self) -> dict[str, float]:
        """How far the range encoders have moved apart (0 at the start, all copies of one):
        the mean over ranges of ‖W_r - mean_r W_r‖ / ‖mean_r W_r‖."""
        centre = self.W_enc.mean(0)
        return {"encoder_spread": ((self.W_enc - centre).norm(dim=(1, 2)).mean()
                                   / centre.norm()).item()}
