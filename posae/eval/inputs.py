"""What an evaluation reads from a training run's folder, and what its families share.

The run's saved config names the cache, layer and model; its held-out sequences (the
held-out split of `trainer.eval_fraction`, never trained on) feed the cache-based metrics
and the model-preservation splice (docs/metrics.md, "Held-out data").
"""

from __future__ import annotations

import logging
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from posae.config import ConfigError, EvalConfig, cache_request, trainer_config
from posae.data.cache_format import CacheSpec
from posae.data.cache_reader import ActivationCache
from posae.data.sequences import SpecialTokens
from posae.eval.held_out import HeldOutPass, held_out_pass, raw_batches
from posae.models.lm import LanguageModel, load_language_model, resolve_device
from posae.sae import load_sae, read_saved
from posae.sae.base import SAE
from posae.training.batches import held_out_split, split_fingerprint

log = logging.getLogger("posae")

RUN_CONFIG = "run_config.yaml"


class RunInputs:
    """What an evaluation reads from a run folder, checked before any compute."""

    def __init__(self, run_dir: Path, device: torch.device):
        self.run_dir = Path(run_dir)
        for needed in (RUN_CONFIG, "sae/cfg.json"):
            if not (self.run_dir / needed).exists():
                raise ConfigError(f"run_dir: {self.run_dir} has no {needed}; pass the folder "
                                  f"of a finished `python -m posae.train` run")
        self.cfg = OmegaConf.load(self.run_dir / RUN_CONFIG)
        self.req = cache_request(self.cfg, "layer")
        self.layer = self.req.layers[0]
        self.trainer = trainer_config(self.cfg.trainer, self.req.context_size)
        self.device = device
        self.sae: SAE = load_sae(self.run_dir / "sae", str(device))
        self.cache = ActivationCache.open(CacheSpec.from_request(self.req), self.layer,
                                          self.req.cache.verify)
        _, self.eval_ids = held_out_split(self.cache, self.req.dataset.pack,
                                          self.trainer.eval_fraction)
        trained_with = read_saved(self.run_dir / "sae")[1].get("held_out_split")
        if trained_with != split_fingerprint(self.eval_ids):
            raise ConfigError(
                f"run_dir: {self.run_dir} was trained holding out other sequences "
                f"({trained_with or 'the last 5 % of the cache, before 2026-12'}) than "
                f"the evaluation would use now ({split_fingerprint(self.eval_ids)}): its "
                f"numbers would include sequences it trained on; retrain it")

    def held_out_batches(self, ids: np.ndarray, batch_sequences: int):
        return raw_batches(self.cache, ids, batch_sequences,
                           self.trainer.train_on_special_tokens, self.device)


def subsample(ids: np.ndarray, n: int | None) -> np.ndarray:
    """A seeded random subset of n held-out sequences, in order (all of them for None), so
    that a budget of sequences samples the whole held-out set, not its first blocks."""
    if n is None or n >= len(ids):
        return ids
    return np.sort(np.random.default_rng(0).choice(ids, n, replace=False))


class EvalInputs(RunInputs):
    """A run folder as one evaluation (`eval.*` settings) sees it: its held-out sequences
    (`eval.max_sequences` of them), where its plots go, and what several families use,
    each made once: the held-out pass (on first use) and the language model (loaded by
    the evaluation when a family it runs needs it)."""

    lm: LanguageModel | None = None
    special: SpecialTokens | None = None

    def __init__(self, run_dir: Path, cfg: EvalConfig, handed_over: HeldOutPass | None = None):
        super().__init__(run_dir, resolve_device(cfg.device))
        self.ids = subsample(self.eval_ids, cfg.max_sequences)
        self.batch_sequences = cfg.batch_sequences
        self.handed_over = handed_over
        self.plot_dir = self.run_dir / "plots"
        self.title = f"{self.sae.cfg.name} · {self.req.model.name} layer {self.layer}"

    @cached_property
    def held_out(self) -> dict:
        """`held_out_pass` over the held-out sequences: the pass training's end handed over
        when it is the same pass, else run now."""
        if self.handed_over is not None and self.handed_over.same_pass(
                self.sae, self.ids, self.batch_sequences, self.device):
            log.info("held-out pass: the one at the end of training (same SAE, sequences, "
                     "batches and device)")
            return self.handed_over.result
        return held_out_pass(self.sae, self.held_out_batches(self.ids, self.batch_sequences),
                             self.req.context_size)

    def load_language_model(self) -> None:
        """`lm` and its `special` tokens, for the families that run the model."""
        self.lm = load_language_model(self.req.model, self.device)
        self.special = SpecialTokens.for_tokenizer(self.lm.tokenizer, self.req.model.prepend_bos)
