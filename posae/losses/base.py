"""Loss terms and their coefficients (docs/ARCHITECTURE.md, "Loss terms").

A term reads the SAE output and the batch and returns an unweighted scalar: by default
the mean over the batch's counted tokens of a per-token value. Its coefficient is a
`Coefficient`: constant, a linear warmup, or a controller that updates itself from
training statistics after each step. Coefficients are checkpointed with the trainer.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from posae.sae.base import SAEOutput
from posae.training.hooks import StepContext, StepEnd, StepHook
from posae.training.schedule import Ramp


class Coefficient(StepHook):
    """A loss coefficient: value at a step, optionally updated from training statistics.
    `value` is the configured value (the `coef` or `coef.value` key) it starts from or
    scales. A step hook (posae/training/hooks.py): the trainer registers each term's
    coefficient, logs its `logged_state` as `coef/<term>_<key>` and checkpoints it."""

    value: float

    def __call__(self, step: int) -> float:
        raise NotImplementedError

    def plan(self, total_steps: int) -> None:
        """Called once before training with the run's length (a schedule that is a fraction
        of the run turns it into steps here)."""

    def update(self, stats: dict[str, float]) -> None:
        """Called after every optimiser step with that step's global statistics."""

    def on_step_end(self, end: StepEnd, reduce) -> None:
        self.update(end.stats)


class Constant(Coefficient):
    def __init__(self, value: float):
        self.value = float(value)

    def __call__(self, step: int) -> float:
        return self.value


class LinearWarmup(Coefficient):
    """0 at step 0, rising linearly to `value` at `steps`, constant after."""

    def __init__(self, value: float, steps: int):
        self.value, self.ramp = float(value), Ramp(value, delay=0, length=steps)

    def __call__(self, step: int) -> float:
        return self.ramp(step)


def make_coefficient(coef: float | Coefficient, warmup_steps: int = 0) -> Coefficient:
    """A fixed coefficient, ramped in over `warmup_steps`; a negative one would reward the
    term (gradient ascent on it) and is refused, as is a negative warmup."""
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be non-negative, got {warmup_steps}")
    if isinstance(coef, Coefficient):
        return coef
    if not coef >= 0:
        raise ValueError(f"coef must be non-negative, got {coef}")
    return LinearWarmup(coef, warmup_steps) if warmup_steps > 0 else Constant(coef)


class LossTerm:
    """A weighted term of the training loss. Subclasses define `per_token` or `__call__`."""

    # Keys of `SAEOutput.extras` this term reads; checked against the architecture's
    # `SAE.provides` when the config is read (posae.losses.check_contracts).
    requires: ClassVar[tuple[str, ...]] = ()
    # A penalty whose coefficient sets the SAE's L0 (L1, importance-weighted L1, L0): the
    # one `match_l0=true` puts under proportional-integral control toward the target L0.
    sets_sparsity: ClassVar[bool] = False

    def __init__(self, coef: float | Coefficient = 1.0, warmup_steps: int = 0):
        self.coefficient = make_coefficient(coef, warmup_steps)

    def per_token(self, out: SAEOutput, batch, ctx: StepContext) -> Tensor:
        raise NotImplementedError

    def __call__(self, out: SAEOutput, batch, ctx: StepContext) -> Tensor:
        return token_mean(self.per_token(out, batch, ctx), batch.mask, ctx)


def token_mean(values: Tensor, mask: Tensor, ctx: StepContext) -> Tensor:
    """Σ over counted tokens / ctx.n_tokens, in float32 whatever the autocast dtype."""
    return (values.float() * mask).sum() / ctx.n_tokens
