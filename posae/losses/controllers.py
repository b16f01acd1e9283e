"""Coefficients that change during training, from the schedule or from training statistics.

Each is a `Coefficient`: the trainer reads its value before a step and calls `update`
with that step's global statistics after it; its state is checkpointed.
"""

from __future__ import annotations

import math

from posae.losses.base import Coefficient


class Ramp(Coefficient):
    """0 for `delay` steps, then linear to `value` over `length` steps (004's curriculum
    coefficient α_t: delay 1000, length 9000)."""

    def __init__(self, value: float = 1.0, delay: int = 1000, length: int = 9000):
        self.value, self.delay, self.length = float(value), int(delay), max(1, int(length))

    def __call__(self, step: int) -> float:
        return self.value * min(1.0, max(0.0, (step - self.delay) / self.length))


class AdaptiveL1(Coefficient):
    """λ_t = λ0 exp(η (s_t - s*)) with s_t the current L0 and s* its target (001 eq. 4):
    λ rises while L0 is above target and falls while below. The exponent is clipped to
    ±`max_exponent` so that one bad step cannot overflow it."""

    def __init__(self, value: float = 0.04, eta: float = 0.002, target_l0: float = 320.0,
                 max_exponent: float = 20.0):
        self.initial, self.eta, self.target = float(value), float(eta), float(target_l0)
        self.max_exponent = max_exponent
        self.current = self.initial

    def __call__(self, step: int) -> float:
        return self.current

    def update(self, stats: dict[str, float]) -> None:
        exponent = self.eta * (stats["l0"] - self.target)
        self.current = self.initial * math.exp(max(-self.max_exponent,
                                                   min(self.max_exponent, exponent)))

    def state_dict(self) -> dict:
        return {"current": self.current}

    def load_state_dict(self, state: dict) -> None:
        self.current = state["current"]


class MomentumFromReconstruction(Coefficient):
    """ATR's temporal strength α_{t+1} = β α_t + (1 - β) α0 q_t (001 eq. 3).

    001 writes the driving term as "∇L_t, the reconstruction loss gradient", which has no
    scalar value as stated. Our reading (docs/variants.md): the reconstruction quality of
    the step, q_t = clip(1 - FVU_t, 0, 1), scaled by the base strength α0, so α follows
    reconstruction quality with momentum β: strong temporal smoothing only while the SAE
    reconstructs well.
    """

    def __init__(self, value: float = 0.002, momentum: float = 0.95):
        self.base, self.momentum = float(value), float(momentum)
        self.current = 0.0

    def __call__(self, step: int) -> float:
        return self.current

    def update(self, stats: dict[str, float]) -> None:
        quality = min(1.0, max(0.0, 1.0 - stats["fvu"]))
        self.current = self.momentum * self.current + (1 - self.momentum) * self.base * quality

    def state_dict(self) -> dict:
        return {"current": self.current}

    def load_state_dict(self, state: dict) -> None:
        self.current = state["current"]
