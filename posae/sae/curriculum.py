"""Curriculum SAE (004): a base SAE plus four position-range adapters phased in over training.

    h_b = ReLU(LayerNorm(W_encᵀ x + b_enc))                               (004 eq. 2)
    h_r = h_b + α_t · Dropout_0.1(LayerNorm(f_r(h_b))),  r = range of t  (004 eq. 3)
    x̂   = W_dec h_r + b_dec

f_r is a two-layer MLP k → d/2 → k (ReLU between) for the r-th of `n_ranges` equal
position ranges of the context. α_t is the curriculum coefficient: 0 for
`curriculum_delay` steps, then linear to 1 over `curriculum_length` steps (set by
its step hook). Loss (004 eq. 5): ‖x - x̂‖² + λ(‖h_b‖₁ + α_t ‖h_r - h_b‖₁): the `l1` term
reads h_b from `extras["l1_codes"]`, the `adapter_l1` term reads `adapter_delta` and
`curriculum`. Eq. 2 has no b_dec centring, so the encoder sees x itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from posae.sae.base import SAE, PositionalConfig, position_range
from posae.training.hooks import FollowSchedule, StepHook
from posae.training.schedule import Ramp


@dataclass
class CurriculumConfig(PositionalConfig):
    n_ranges: int = 4
    adapter_dropout: float = 0.1
    curriculum_delay: int = 1000
    curriculum_length: int = 9000


class CurriculumSAE(SAE):
    config_class = CurriculumConfig
    provides = frozenset({"l1_codes", "adapter_delta", "curriculum"})
    needs_positions = True

    def __init__(self, cfg: CurriculumConfig):
        super().__init__(cfg)
        k, hidden = cfg.d_sae, max(1, cfg.d_in // 2)
        self.base_norm = nn.LayerNorm(k)
        self.adapters = nn.ModuleList(
            nn.Sequential(nn.Linear(k, hidden), nn.ReLU(), nn.Linear(hidden, k), nn.LayerNorm(k))
            for _ in range(cfg.n_ranges))
        self.dropout = nn.Dropout(cfg.adapter_dropout)
        self.ramp = Ramp(1.0, cfg.curriculum_delay, cfg.curriculum_length)
        self.register_buffer("curriculum", torch.tensor(self.ramp(0)))

    def leaves_parameters_unused(self) -> bool:
        return True  # adapters idle while α = 0, and those of ranges missing from a batch

    def step_hooks(self) -> list[StepHook]:
        return [FollowSchedule(self, "curriculum", self.ramp)]

    def mechanism_state(self) -> dict[str, float]:
        return {"curriculum_alpha": self.curriculum.item()}

    def position_range(self, pos: Tensor) -> Tensor:
        return position_range(pos, self.cfg.n_ranges, self.cfg.context_size)

    def adapted(self, h_b: Tensor, pos: Tensor) -> Tensor:
        """α_t · Dropout(LayerNorm(f_r(h_b))), each token through its own range's adapter.
        While α_t = 0 the adapters are not run: they get no gradient and no weight decay."""
        delta = torch.zeros_like(h_b)
        if self.curriculum.item() == 0:
            return delta
        ranges = self.position_range(pos)
        for r, adapter in enumerate(self.adapters):
            rows = ranges == r
            if rows.any():
                delta[rows] = self.dropout(adapter(h_b[rows]))
        return self.curriculum * delta

    def encode_with_pre(self, x, pos, mask):
        pre = x @ self.W_enc + self.b_enc
        h_b = torch.relu(self.base_norm(pre))
        delta = self.adapted(h_b, pos)
        return h_b + delta, pre, {"l1_codes": h_b, "adapter_delta": delta,
                                  "curriculum": self.curriculum}

