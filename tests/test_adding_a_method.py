"""A new position-aware method is one architecture file, one loss file and their configs
(docs/ARCHITECTURE.md, "Adding a method"). The example lives here, in the test: nothing in
posae names it, yet it trains through the real entry-point code, its per-step state moves,
is logged and checkpointed, and its saved SAE loads back.

The example: codes scaled by a learned per-position gain, f_t = ReLU(pre_t) · g_t; a loss
term pulls the gains toward 1; a step hook keeps an EMA of each position's L0.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from conftest import compose_config
from torch import nn

from posae.losses import LossTerm
from posae.sae import build_sae, load_sae, save_sae
from posae.sae.base import SAE, PositionalConfig, per_position
from posae.train import open_training_cache, plan_training
from posae.training.hooks import StepHook
from posae.training.loggers import NoLogger
from posae.training.trainer import Trainer

# ----- the architecture file ---------------------------------------------------------------


@dataclass
class PositionGainConfig(PositionalConfig):
    ema_decay: float = 0.5


class PositionL0Tracker(StepHook):
    """Per-step state: an EMA over steps of each position's L0 in the global batch."""

    def __init__(self, context_size: int, decay: float):
        self.decay = decay
        self.ema = torch.zeros(context_size)
        self.active, self.tokens = torch.zeros(context_size), torch.zeros(context_size)

    def on_batch(self, out, batch):
        active = ((out.f != 0) & batch.mask[..., None]).sum(-1).float()
        self.active.index_add_(0, batch.pos.flatten(), active.flatten())
        self.tokens.index_add_(0, batch.pos.flatten(), batch.mask.flatten().float())

    def on_step_end(self, end, reduce):
        active, tokens = reduce(self.active, "sum"), reduce(self.tokens, "sum")
        seen = tokens > 0
        l0 = active[seen] / tokens[seen]
        self.ema[seen] = self.decay * self.ema[seen] + (1 - self.decay) * l0
        self.active.zero_()
        self.tokens.zero_()

    def logged_state(self):
        return {"position_l0_spread": (self.ema.max() - self.ema.min()).item()}

    def state_dict(self):
        return {"ema": self.ema.clone()}

    def load_state_dict(self, state):
        self.ema.copy_(state["ema"])


class PositionGainSAE(SAE):
    config_class = PositionGainConfig
    provides = frozenset({"position_gain"})
    needs_positions = True

    def __init__(self, cfg: PositionGainConfig):
        super().__init__(cfg)
        self.gain = nn.Parameter(torch.ones(cfg.context_size))
        self.tracker = PositionL0Tracker(cfg.context_size, cfg.ema_decay)

    def encode_with_pre(self, x, pos, mask):
        pre = self.pre_activations(x)
        gain = per_position(self.gain, pos)
        return torch.relu(pre) * gain[..., None], pre, {"position_gain": gain}

    def step_hooks(self):
        return [self.tracker]

    def mechanism_state(self):
        return {"gain_spread": (self.gain.max() - self.gain.min()).item()}


# ----- the loss file -----------------------------------------------------------------------


class GainPenalty(LossTerm):
    """(g_t - 1)² per token: keeps the gains near 1."""

    requires = ("position_gain",)

    def per_token(self, out, batch, ctx):
        return (out.extras["position_gain"] - 1).pow(2)


# ----- their configs -----------------------------------------------------------------------

VARIANT = f"""# @package _global_
defaults:
  - override /loss: [mse, l1, gain_penalty]
variant:
  name: position_gain
  architecture: {__name__}.PositionGainSAE
  context_size: ${{context_size}}
"""
LOSS = f"""# @package loss.gain_penalty
_target_: {__name__}.GainPenalty
coef: 0.1
"""


def test_a_method_defined_outside_posae_trains_logs_checkpoints_and_reloads(tmp_path):
    conf = tmp_path / "conf"
    (conf / "variant").mkdir(parents=True)
    (conf / "loss").mkdir()
    (conf / "variant" / "position_gain.yaml").write_text(VARIANT)
    (conf / "loss" / "gain_penalty.yaml").write_text(LOSS)
    cfg = compose_config(overrides=[
        f"hydra.searchpath=[file://{conf}]", "variant=position_gain", "dataset=synthetic",
        f"cache.root={tmp_path / 'cache'}", "trainer.cpu=true", "eval.enabled=false",
        "n_tokens=16384", "trainer.batch_tokens=512", "trainer.n_tokens=10240",
        "optim.lr=2e-3", "optim.warmup_steps=2"])
    plan = plan_training(cfg)
    assert type(plan.terms["gain_penalty"]) is GainPenalty
    accelerator = Accelerator(cpu=True)
    cache, train_ids, _ = open_training_cache(plan, accelerator)
    trainer = Trainer(build_sae(plan.sae), plan.terms, plan.optim, plan.trainer, cache,
                      train_ids, 0, accelerator, Path(tempfile.mkdtemp()), NoLogger())
    assert isinstance(trainer.sae, PositionGainSAE)
    trainer.fit()

    stats = trainer.last_stats  # the hook's state and the SAE's mechanism state, logged
    assert stats["position_l0_spread"] > 0 and stats["mech/gain_spread"] > 0
    assert stats["loss/gain_penalty"] > 0
    state = trainer.state_dict()["hooks"]["sae/0"]  # checkpointed under the hook's name
    assert torch.equal(state["ema"], trainer.sae.tracker.ema) and state["ema"].max() > 0

    save_sae(trainer.sae, tmp_path / "sae")
    loaded = load_sae(tmp_path / "sae")
    x, pos = torch.randn(2, 8, loaded.cfg.d_in), torch.arange(8).expand(2, 8)
    torch.testing.assert_close(loaded.encode(x, pos), trainer.sae.eval().encode(x, pos))
