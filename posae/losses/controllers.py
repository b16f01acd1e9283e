"""Coefficients that change during training, from the schedule or from training statistics.

Each is a `Coefficient`: the trainer reads its value before a step and calls `update`
with that step's global statistics after it; its state is checkpointed.
"""

from __future__ import annotations

import math

from posae.losses.base import Coefficient


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


class SparsityNotControlled(RuntimeError):
    """The sparsity controller saturated: L0 does not respond to the penalty's coefficient."""


class IntegralL1(Coefficient):
    """Ours, not 001's: proportional-integral control of the sparsity coefficient toward a
    target L0, in log space. After step t, with s_t its L0 and s*_t the setpoint,

        e_t = log(s_t / s*_t),   I_t = I_{t-1} + κ_I e_t,   log λ_{t+1} = log λ0 + I_t + κ_P e_t,

    so λ keeps rising while L0 is above the setpoint and falling while below, and can
    settle only at s = s* (the integral removes 001 eq. 4's standing error). L0 answers λ
    tens of steps late and recovers slowly from an undershoot (latents silenced by a λ peak
    come back slowly), so a step from the initial L0 (≈ 1500 on MiniLM) to s* makes the
    integral overshoot. The setpoint therefore glides log-linearly down from the first
    step's L0 to s* over the first `ramp_fraction` of the run, s*_t = s* (s_0 / s*)^{1 - t/R}
    (a first L0 already below s* has no glide), and the proportional term answers the
    current error at once (measured on MiniLM, docs/protocol.md). The error is a log-ratio,
    so the gains mean the same at every width and target. I reaching ±`max_exponent` (λ a
    factor e^20 from λ0) means L0 does not answer the penalty: the run stops with
    `SparsityNotControlled` instead of training on with a meaningless λ."""

    def __init__(self, value: float = 0.04, gain: float = 0.02, proportional: float = 1.0,
                 target_l0: float = 32.0, ramp_fraction: float = 0.4,
                 max_exponent: float = 20.0):
        if target_l0 <= 0 or gain <= 0 or value <= 0 or proportional < 0 \
                or not 0 <= ramp_fraction <= 1:
            raise ValueError("the sparsity coefficient's controller: value, gain and target_l0 "
                             "must be positive, proportional non-negative, ramp_fraction in "
                             f"[0, 1]; got value={value}, gain={gain}, target_l0={target_l0}, "
                             f"proportional={proportional}, ramp_fraction={ramp_fraction}")
        self.value, self.gain, self.target = float(value), float(gain), float(target_l0)
        self.proportional, self.ramp_fraction = float(proportional), float(ramp_fraction)
        self.max_exponent = max_exponent
        self.ramp_steps = 0
        self.log_ratio = 0.0
        self.error = 0.0
        self.steps = 0
        self.initial_l0 = None

    def plan(self, total_steps: int) -> None:
        self.ramp_steps = round(self.ramp_fraction * total_steps)

    def __call__(self, step: int) -> float:
        return self.value * math.exp(self.log_ratio + self.proportional * self.error)

    def setpoint(self) -> float:
        """s*_t: the target of the current step, on its glide from the first L0."""
        if self.initial_l0 is None or self.steps >= self.ramp_steps:
            return self.target
        remaining = 1.0 - self.steps / self.ramp_steps
        return self.target * max(1.0, self.initial_l0 / self.target) ** remaining

    def logged_state(self) -> dict[str, float]:
        return {"l0_setpoint": self.setpoint()}

    def update(self, stats: dict[str, float]) -> None:
        l0 = max(stats["l0"], 1e-3)
        if self.initial_l0 is None:
            self.initial_l0 = l0
        self.error = max(-self.max_exponent,
                         min(self.max_exponent, math.log(l0 / self.setpoint())))
        self.log_ratio = max(-self.max_exponent,
                             min(self.max_exponent, self.log_ratio + self.gain * self.error))
        self.steps += 1
        if abs(self.log_ratio) >= self.max_exponent:
            raise SparsityNotControlled(
                f"the sparsity coefficient reached {self(0):.3g} (e^{self.log_ratio:+.0f} times "
                f"its start, {self.value:g}) while L0 stayed at {l0:.4g} against a setpoint of "
                f"{self.setpoint():.4g} (step {self.steps}): this SAE's L0 does not answer "
                f"its penalty, so match_l0 cannot set it")

    def state_dict(self) -> dict:
        return {"log_ratio": self.log_ratio, "error": self.error, "steps": self.steps,
                "initial_l0": self.initial_l0}

    def load_state_dict(self, state: dict) -> None:
        missing = {"log_ratio", "error", "steps", "initial_l0"} - set(state)
        if missing:
            raise ValueError(f"checkpointed L1 controller state lacks {sorted(missing)}: it "
                             "was saved by the integral-only controller, which cannot be "
                             "resumed as the current one; start the run again")
        self.log_ratio, self.error = state["log_ratio"], state["error"]
        self.steps, self.initial_l0 = state["steps"], state["initial_l0"]


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
