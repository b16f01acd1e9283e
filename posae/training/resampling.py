"""Resampling latents: which to re-initialise, and how.

`dead` (Bricken et al. 2023): latents that have not fired for `dead_after_tokens`.
`temporal_importance` (001 eq. 6): every latent's score
    s_i = (1/T) Σ_t a_{t,i} · (1 + γ var_t a_{t,i}),
with a_{t,i} its mean |activation| at position t over the steps since the last
resampling (001's "activation history window"); the lowest `fraction` are re-initialised.
`random` (a control for eq. 6's score): a uniformly random `fraction` of the latents.
001 says γ "penalizes high variance" but its formula rewards it; we implement the formula
as written (docs/variants.md).
"""

from __future__ import annotations

import torch
from torch import Tensor

from posae.sae.base import SAE


class PositionActivity:
    """Σ |f| per (position, latent) and counted tokens per position, since the last reset."""

    def __init__(self, context: int, d_sae: int, device: torch.device):
        self.sums = torch.zeros(context, d_sae, device=device)
        self.counts = torch.zeros(context, device=device)

    def update(self, f: Tensor, mask: Tensor, pos: Tensor) -> None:
        weights = mask.float()
        if bool((pos == pos[:1]).all()):  # whole sequences: reduce over the batch first
            self.sums.index_add_(0, pos[0], torch.einsum("btk,bt->tk", f.detach().abs().float(),
                                                         weights))
            self.counts.index_add_(0, pos[0], weights.sum(0))
            return
        self.sums.index_add_(0, pos.flatten(), (f.detach().abs() * weights[..., None])
                             .flatten(0, 1).float())
        self.counts.index_add_(0, pos.flatten(), weights.flatten())

    def scores(self, gamma: float) -> Tensor:
        seen = self.counts > 0
        means = self.sums[seen] / self.counts[seen, None]
        return means.mean(0) * (1 + gamma * means.var(0, unbiased=False))

    def reset(self) -> None:
        self.sums.zero_()
        self.counts.zero_()

    def state_dict(self) -> dict:
        return {"sums": self.sums, "counts": self.counts}

    def load_state_dict(self, state: dict) -> None:
        self.sums.copy_(state["sums"])
        self.counts.copy_(state["counts"])


def lowest_fraction(scores: Tensor, fraction: float) -> Tensor:
    """Indices of the lowest `fraction` of scores (at least one when fraction > 0)."""
    n = max(1, int(len(scores) * fraction)) if fraction > 0 else 0
    return scores.topk(n, largest=False).indices


@torch.no_grad()
def resample_latents(sae: SAE, optimizer: torch.optim.Optimizer, latents: Tensor,
                     inputs: Tensor, scores: Tensor, generator: torch.Generator) -> None:
    """Re-initialise `latents` from `inputs` [N, d] drawn with probability ∝ `scores` [N]
    (Bricken et al. 2023: scores = squared reconstruction loss; 001 uses its own score).

    Decoder row ← the unit direction of (input - b_dec); encoder column ← that direction
    scaled to 0.2 × the mean norm of the living encoder columns; b_enc ← 0; Adam moments
    of these rows and columns ← 0.
    """
    if latents.numel() == 0:
        return
    picks = torch.multinomial(scores.float().clamp_min(0).cpu() + 1e-12, len(latents),
                              replacement=True, generator=generator).to(inputs.device)
    direction = inputs[picks].float() - sae.b_dec
    direction /= direction.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    alive = torch.ones(sae.W_enc.shape[1], dtype=torch.bool, device=latents.device)
    alive[latents] = False
    enc_norm = sae.W_enc[:, alive].norm(dim=0).mean() if alive.any() else 1.0
    sae.W_dec[latents] = direction
    sae.W_enc[:, latents] = direction.t() * 0.2 * enc_norm
    sae.b_enc[latents] = 0.0
    for param, index in ((sae.W_dec, (latents,)), (sae.W_enc, (slice(None), latents)),
                         (sae.b_enc, (latents,))):
        for moment in optimizer.state.get(param, {}).values():
            if torch.is_tensor(moment) and moment.shape == param.shape:
                moment[index] = 0.0
