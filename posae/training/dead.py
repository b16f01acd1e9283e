"""Dead-latent tracking and resampling."""

from __future__ import annotations

import torch
from torch import Tensor

from posae.sae.base import SAE


class DeadLatents:
    """Tokens since each latent last fired; dead once that reaches `after_tokens`."""

    def __init__(self, d_sae: int, after_tokens: int, device: torch.device):
        self.after_tokens = after_tokens
        self.tokens_since_fired = torch.zeros(d_sae, dtype=torch.long, device=device)

    @property
    def dead(self) -> Tensor:
        return self.tokens_since_fired >= self.after_tokens

    def update(self, fired: Tensor, n_tokens: int) -> None:
        """`fired` [d_sae] bool: the latent fired on some counted token of the global batch."""
        self.tokens_since_fired += n_tokens
        self.tokens_since_fired[fired] = 0

    def state_dict(self) -> dict:
        return {"tokens_since_fired": self.tokens_since_fired}

    def load_state_dict(self, state: dict) -> None:
        self.tokens_since_fired.copy_(state["tokens_since_fired"])


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
