"""Dead-latent tracking."""

from __future__ import annotations

import torch
from torch import Tensor

from posae.training.hooks import Reduce, StepEnd, StepHook


class DeadLatents(StepHook):
    """Tokens since each latent last fired; dead once that reaches `after_tokens`. As a step
    hook it counts each step's global batch and adds `dead_fraction` to its statistics."""

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

    def on_step_end(self, end: StepEnd, reduce: Reduce) -> None:
        self.update(end.fired, end.n_tokens)
        end.stats["dead_fraction"] = self.dead.float().mean().item()

    def state_dict(self) -> dict:
        return {"tokens_since_fired": self.tokens_since_fired}

    def load_state_dict(self, state: dict) -> None:
        self.tokens_since_fired.copy_(state["tokens_since_fired"])

