"""Temporal terms between neighbouring tokens of the same sequence.

A pair (t, t+1) counts only when both tokens count (mask: not padding, not an excluded
special token, so never across a document separator) and their true positions are
consecutive, so no pair crosses a sequence or window boundary. Sums are normalised by
the batch's counted tokens (E_t in 001 eq. 1, with R_t = 0 for a token without a counted
predecessor), which keeps data-parallel training exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from posae.losses.base import LossTerm, StepContext


def adjacent_sq_diff(f: Tensor) -> Tensor:
    """Σ_i (f_{t+1,i} - f_{t,i})² for every adjacent pair: [B, T-1]."""
    return (f[:, 1:].float() - f[:, :-1].float()).pow(2).sum(-1)


def valid_pairs(mask: Tensor, pos: Tensor) -> Tensor:
    """[B, T-1] bool: both tokens count and are consecutive in their source sequence."""
    return mask[:, 1:] & mask[:, :-1] & (pos[:, 1:] == pos[:, :-1] + 1)


class AdjacentDifference(LossTerm):
    """ATR's temporal regulariser R_t(f) = Σ_i (f_{t,i} - f_{t-1,i})² (001 eq. 2)."""

    def __call__(self, out, batch, ctx: StepContext) -> Tensor:
        pairs = valid_pairs(batch.mask, batch.pos)
        return (adjacent_sq_diff(out.f) * pairs).sum() / ctx.n_tokens


class WindowConsistency(LossTerm):
    """TC-SAE's L_temp (003 eq. 6) over every sliding window of `window` consecutive tokens:
    (1/(T-1)) Σ_{t} ‖z_t - z_{t+1}‖² within the window, for windows whose T tokens all
    count; windows are anchored at their first token."""

    def __init__(self, coef: float = 0.1, window: int = 5, warmup_steps: int = 0):
        super().__init__(coef, warmup_steps)
        if window < 2:
            raise ValueError("loss.temporal_window.window must be at least 2")
        self.window = window

    def __call__(self, out, batch, ctx: StepContext) -> Tensor:
        n_pairs = self.window - 1
        if out.f.shape[1] < self.window:
            return out.f.new_zeros(())
        ones = torch.ones(1, 1, n_pairs, device=out.f.device)
        per_pair = adjacent_sq_diff(out.f)[:, None]
        pairs = valid_pairs(batch.mask, batch.pos).float()[:, None]
        window_sum = F.conv1d(per_pair, ones).squeeze(1)
        complete = F.conv1d(pairs, ones).squeeze(1) == n_pairs
        return (window_sum * complete).sum() / n_pairs / ctx.n_tokens
