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
    """TC-SAE's temporal consistency (003 §4.2, eq. 6) over windows of T = `window`
    consecutive counted tokens of one sequence, one window ending at each token t whose
    T - 1 predecessors all count (the "temporal buffer" {z_{t-T+1}, …, z_t}).

    form=window_mean (default): ‖z_t - (1/T) Σ_{s=t-T+1}^{t} z_s‖², "the difference between
        current features and their temporal average", 003's words for eq. 6. T sets how
        much history the average holds, which is what 003's T = 5 vs 3 ablation varies.
    form=adjacent: (1/(T-1)) Σ_{s=t-T+1}^{t-1} ‖z_s - z_{s+1}‖², eq. 6's formula inside each
        window. Summed over stride-1 windows every inner pair is counted T - 1 times, so this
        is the adjacent-pair loss up to the sequence ends: T barely matters.
    """

    FORMS = ("window_mean", "adjacent")

    def __init__(self, coef: float = 0.1, window: int = 5, form: str = "window_mean",
                 warmup_steps: int = 0):
        super().__init__(coef, warmup_steps)
        if window < 2:
            raise ValueError("loss.temporal_window.window must be at least 2")
        if form not in self.FORMS:
            raise ValueError(f"loss.temporal_window.form: {form!r} is not one of "
                             f"{', '.join(self.FORMS)}")
        self.window, self.form = window, form

    def __call__(self, out, batch, ctx: StepContext) -> Tensor:
        n_pairs = self.window - 1
        if out.f.shape[1] < self.window:
            return out.f.new_zeros(())
        ones = torch.ones(1, 1, n_pairs, device=out.f.device)
        pairs = valid_pairs(batch.mask, batch.pos).float()[:, None]
        # complete[:, j]: the window of tokens j .. j + T - 1 has all its pairs valid
        complete = F.conv1d(pairs, ones).squeeze(1) == n_pairs
        if self.form == "adjacent":
            window_sum = F.conv1d(adjacent_sq_diff(out.f)[:, None], ones).squeeze(1)
            return (window_sum * complete).sum() / n_pairs / ctx.n_tokens
        f = out.f.float()
        csum = F.pad(f.cumsum(1), (0, 0, 1, 0))
        window_mean = (csum[:, self.window :] - csum[:, : -self.window]) / self.window
        deviation = (f[:, n_pairs:] - window_mean).pow(2).sum(-1)
        return (deviation * complete).sum() / ctx.n_tokens
