"""Resampling latents: which to re-initialise (a policy, `trainer.resample`, chosen by
`_target_`: posae/conf/resample/), how, and when (`Resampler`, a step hook).

`ResampleDead` (Bricken et al. 2023): latents that have not fired for `dead_after_tokens`.
`ResampleByTemporalImportance` (001 eq. 6): every latent's score
    s_i = (1/T) Σ_t a_{t,i} · (1 + γ var_t a_{t,i}),
with a_{t,i} its mean |activation| at position t over the steps since the last
resampling (001's "activation history window"); the lowest `fraction` are re-initialised.
`ResampleRandom` (a control for eq. 6's score): a uniformly random `fraction` of the latents.
001 says γ "penalizes high variance" but its formula rewards it; we implement the formula
as written (docs/variants.md).

Rounds happen after steps r, 2r, … (r = `trainer.resample_every`) but never in the last r
steps: a re-initialised latent always gets a full interval to recover before the run ends.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from posae.sae.base import SAE
from posae.training.hooks import Reduce, StepEnd, StepHook


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


def resample_policy(node) -> ResamplePolicy:
    """The policy `trainer.resample` names by `_target_` (a ResamplePolicy class, resolved and
    checked before it is called) with its keyword arguments."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from posae.config import ConfigError
    from posae.losses import check_targets

    node = OmegaConf.create(dict(node))
    if "_target_" not in node:
        raise ConfigError("trainer.resample: needs a _target_ naming its ResamplePolicy class "
                          "(posae/conf/resample/)")
    check_targets(node, "trainer.resample", ResamplePolicy)
    try:
        return instantiate(node)
    except Exception as err:  # Hydra wraps the cause: name the key and the cause
        raise ConfigError(f"trainer.resample: {err.__cause__ or err}") from None


class ResamplePolicy:
    """Which latents a resampling round re-initialises. `bind` hands it the run's shapes
    and random generator before training; `observe` sees each micro-batch's codes."""

    def bind(self, d_sae: int, context_size: int, device: torch.device,
             generator: torch.Generator) -> None:
        self.d_sae, self.device, self.generator = d_sae, device, generator

    def observe(self, codes: Tensor, batch) -> None:
        pass

    def select(self, dead: Tensor, reduce: Reduce) -> Tensor:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def _fraction(value: float, key: str) -> float:
    if not 0 <= value <= 1:
        raise ValueError(f"{key} must be in [0, 1], got {value}")
    return float(value)


class ResampleDead(ResamplePolicy):
    def select(self, dead, reduce):
        return dead.nonzero().squeeze(-1)


class ResampleRandom(ResamplePolicy):
    def __init__(self, fraction: float = 0.1):
        self.fraction = _fraction(fraction, "fraction")

    def select(self, dead, reduce):
        scores = torch.rand(self.d_sae, generator=self.generator)
        return lowest_fraction(scores, self.fraction).to(self.device)


class ResampleByTemporalImportance(ResamplePolicy):
    def __init__(self, fraction: float = 0.1, gamma: float = 5.0):
        self.fraction = _fraction(fraction, "fraction")
        if not gamma >= 0:
            raise ValueError(f"gamma must be non-negative, got {gamma}")
        self.gamma = float(gamma)

    def bind(self, d_sae, context_size, device, generator):
        super().bind(d_sae, context_size, device, generator)
        self.activity = PositionActivity(context_size, d_sae, device)

    def observe(self, codes, batch):
        self.activity.update(codes, batch.mask, batch.pos)

    def select(self, dead, reduce):
        self.activity.sums.copy_(reduce(self.activity.sums, "sum"))
        self.activity.counts.copy_(reduce(self.activity.counts, "sum"))
        latents = lowest_fraction(self.activity.scores(self.gamma), self.fraction)
        self.activity.reset()
        return latents

    def state_dict(self):
        return self.activity.state_dict()

    def load_state_dict(self, state):
        self.activity.load_state_dict(state)


class Resampler(StepHook):
    """Runs a resampling round when one is due: the policy's latents are re-initialised
    from this process's last micro-batch (the inputs broadcast from process 0), their
    dead-latent clocks reset; `resample/...` records the last round."""

    def __init__(self, policy: ResamplePolicy, every: int, total_steps: int, sae: SAE,
                 optimizer: torch.optim.Optimizer, dead, generator: torch.Generator,
                 explained_variance: Callable[[object], float],
                 broadcast: Callable[[Tensor], Tensor]):
        self.policy, self.every, self.total_steps = policy, every, total_steps
        self.sae, self.optimizer, self.dead, self.generator = sae, optimizer, dead, generator
        self.explained_variance, self.broadcast = explained_variance, broadcast
        self.record = {"resample/rounds": 0.0}

    def due(self, step: int) -> bool:
        return step % self.every == 0 and step + self.every <= self.total_steps

    def on_batch(self, out, batch):
        self.policy.observe(out.input_codes.detach(), batch)

    def on_step_end(self, end: StepEnd, reduce: Reduce) -> None:
        if not self.due(end.step):
            return
        latents = self.policy.select(self.dead.dead, reduce)
        if latents.numel() == 0:
            return
        batch = end.batch
        x = batch.x[batch.mask]
        scores = (x - end.x_hat[batch.mask].float()).pow(2).sum(-1).pow(2)
        ev_before = self.explained_variance(batch)
        resample_latents(self.sae, self.optimizer, latents, x, scores, self.generator)
        for param in (self.sae.W_enc, self.sae.W_dec, self.sae.b_enc):
            param.data.copy_(self.broadcast(param.data))
        self.dead.tokens_since_fired[latents] = 0
        self.record = {"resample/rounds": self.record["resample/rounds"] + 1,
                       "resample/step": float(end.step),
                       "resample/latents": float(latents.numel()),
                       "resample/ev_before": ev_before,
                       "resample/ev_after": self.explained_variance(batch)}

    def logged_state(self) -> dict[str, float]:
        return dict(self.record)

    def state_dict(self) -> dict:
        return {"record": dict(self.record), "policy": self.policy.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.record = dict(state["record"])
        self.policy.load_state_dict(state["policy"])
