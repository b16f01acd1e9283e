"""The step-hook protocol: per-step state that lives beside the SAE's parameters.

The trainer owns the loop and calls every registered hook at fixed points of a step:

    on_step_start(ctx)       before the forward, with the step's `StepContext`
    on_batch(out, batch)     after each micro-batch's backward, with its output and batch
    on_step_end(end, reduce) after the optimiser step, with the global statistics (`StepEnd`)
                             and the trainer's cross-process `reduce(tensor, op)`
    logged_state()           scalars logged (under the hook's prefix) at each log step
    state_dict() / load_state_dict(state)   saved in every checkpoint, under the hook's name

Hooks are registered in this order (posae/training/trainer.py): dead-latent tracking,
resampling, each loss term's coefficient, then the SAE's own (`SAE.step_hooks`: PA-SAE's
gradient statistics, the curriculum's α, the progressive mask). State a hook sets in
`on_step_end` is the state of the next step, so a checkpoint, written after a step ends,
holds nothing pending. No hook calls `torch.distributed` itself: it is handed `reduce` (and
the resampler the trainer's broadcast), and every process must take the same decisions,
since a collective called by some processes only would hang the others. A hook whose state
lives in the SAE's buffers is made by `SAE.step_hooks()` when asked, not stored on the SAE
(which would make a reference cycle).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from torch import Tensor, nn

if TYPE_CHECKING:
    from posae.sae.base import SAE, SAEOutput

# reduce(tensor, "sum" | "max" | "mean") -> the tensor reduced over all processes
Reduce = Callable[[Tensor, str], Tensor]


@dataclass
class StepContext:
    """What a loss term or a hook may need beyond the output and the batch."""

    step: int
    # Normaliser of token means: counted tokens in the global batch / number of processes,
    # so that data-parallel gradient averaging gives the exact global-batch mean.
    n_tokens: float
    sae: SAE
    # Latents that have not fired for trainer.dead_after_tokens (bool [d_sae]).
    dead: Tensor
    # The fp16 loss scale the backward pass multiplies the loss by (1 without one).
    loss_scale: float = 1.0


@dataclass
class StepEnd:
    """A finished step, as the hooks see it."""

    step: int  # steps completed, this one included
    stats: dict[str, float]  # the step's global statistics (posae/training/trainer.py)
    fired: Tensor  # bool [d_sae]: the latent fired on some counted token of the global batch
    n_tokens: int  # counted tokens of the global batch
    batch: Any  # this process's last micro-batch (posae.training.batches.Batch)
    x_hat: Tensor  # its reconstruction, detached


class StepHook:
    """A piece of per-step state; every method defaults to doing nothing."""

    def on_step_start(self, ctx: StepContext) -> None:
        pass

    def on_batch(self, out: SAEOutput, batch) -> None:
        pass

    def on_step_end(self, end: StepEnd, reduce: Reduce) -> None:
        pass

    def logged_state(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class FollowSchedule(StepHook):
    """Keeps the scalar buffer `name` of `module` at `schedule(step)` (a
    `posae.training.schedule.Ramp`): the curriculum's α (004 eq. 3), the progressive mask's
    strength (004 runs 6-8). The buffer is part of the SAE's state, so it is checkpointed and
    saved with the SAE; it is looked up by name at each step, since moving the module to a
    device replaces its buffers."""

    def __init__(self, module: nn.Module, name: str, schedule: Callable[[int], float]):
        self.module, self.name, self.schedule = module, name, schedule

    def on_step_end(self, end: StepEnd, reduce: Reduce) -> None:
        getattr(self.module, self.name).fill_(self.schedule(end.step))
