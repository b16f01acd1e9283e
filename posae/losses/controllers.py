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
    ±`max_exponent` so that one bad step cannot overflow it.

    This is proportional control without memory: λ is a function of today's L0 only, so
    L0 settles where λ0 exp(η (s - s*)) is the λ that gives L0 = s, which is s* only when λ0
    already gives s*. With λ0 too weak the run keeps a standing error s - s* > 0 however
    long it trains (docs/variants.md). `IntegralL1` removes it."""

    def __init__(self, value: float = 0.04, eta: float = 0.002, target_l0: float = 320.0,
                 max_exponent: float = 20.0):
        self.value, self.eta, self.target = float(value), float(eta), float(target_l0)
        self.max_exponent = max_exponent
        self.current = self.value

    def __call__(self, step: int) -> float:
        return self.current

    def update(self, stats: dict[str, float]) -> None:
        exponent = self.eta * (stats["l0"] - self.target)
        self.current = self.value * math.exp(max(-self.max_exponent,
                                                   min(self.max_exponent, exponent)))

    def state_dict(self) -> dict:
        return {"current": self.current}

    def load_state_dict(self, state: dict) -> None:
        self.current = state["current"]


class IntegralL1(Coefficient):
    """Ours, not 001's: integral control of λ toward a target L0,

        log λ_{t+1} = log λ_t + κ log(s_t / s*),

    so λ keeps rising while L0 is above target and falling while below, and can settle only
    at s_t = s*. The error is the log-ratio, so κ means the same at every width and target;
    log(λ/λ0) is kept within ±`max_exponent`."""

    def __init__(self, value: float = 0.04, gain: float = 0.008, target_l0: float = 32.0,
                 max_exponent: float = 20.0):
        if target_l0 <= 0 or gain <= 0 or value <= 0:
            raise ValueError("loss.l1.coef: value, gain and target_l0 must be positive")
        self.value, self.gain, self.target = float(value), float(gain), float(target_l0)
        self.max_exponent = max_exponent
        self.log_ratio = 0.0

    def __call__(self, step: int) -> float:
        return self.value * math.exp(self.log_ratio)

    def update(self, stats: dict[str, float]) -> None:
        error = math.log(max(stats["l0"], 1e-3) / self.target)
        self.log_ratio = max(-self.max_exponent,
                             min(self.max_exponent, self.log_ratio + self.gain * error))

    def state_dict(self) -> dict:
        return {"log_ratio": self.log_ratio}

    def load_state_dict(self, state: dict) -> None:
        self.log_ratio = state["log_ratio"]


class MomentumFromReconstruction(Coefficient):
    """ATR's temporal strength α_{t+1} = β α_t + (1 - β) α0 q_t (001 eq. 3).

    001 writes the driving term as "∇L_t, the reconstruction loss gradient", which has no
    scalar value as stated. Our reading (docs/variants.md): the reconstruction quality of
    the step, q_t = clip(1 - FVU_t, 0, 1), scaled by the base strength α0, so α follows
    reconstruction quality with momentum β: strong temporal smoothing only while the SAE
    reconstructs well.

    001 gives no starting value; ours is α = `initial` (0 by default: no temporal penalty
    before the first step's reconstruction is known). α then approaches α0 q with time
    constant 1/(1 - β) = 20 steps, and since q ≤ 1 it never exceeds α0 = 0.002.
    """

    def __init__(self, value: float = 0.002, momentum: float = 0.95, initial: float = 0.0):
        self.value, self.momentum = float(value), float(momentum)
        self.current = float(initial)

    def __call__(self, step: int) -> float:
        return self.current

    def update(self, stats: dict[str, float]) -> None:
        quality = min(1.0, max(0.0, 1.0 - stats["fvu"]))
        self.current = self.momentum * self.current + (1 - self.momentum) * self.value * quality

    def state_dict(self) -> dict:
        return {"current": self.current}

    def load_state_dict(self, state: dict) -> None:
        self.current = state["current"]
