"""The training loop: Accelerate data parallelism over cached windows, one global batch per step.

Each step: this process's share of the global batch → SAE forward (bf16 autocast on GPU)
→ weighted loss terms, each a mean over the global batch's counted tokens → backward
(gradients averaged across processes) → decoder-gradient projection, clipping, optimiser
and LR step → unit-norm decoder → global statistics (losses, L0, firing) → dead-latent
tracker and coefficient controllers. Checkpoints every N steps and on SIGTERM/SIGINT.
At each log step the statistics, with every mechanism's state (`mech/...`, from
`SAE.mechanism_state`) and the resampling record (`resample/...`), go to the logger and
to the run folder's `train_log.jsonl`.

Resampling (`trainer.resample_every` = r) happens after steps r, 2r, … but never in the
last r steps: a re-initialised latent always gets a full interval to recover before the
run ends, at every scale.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast
from tqdm.auto import tqdm

from posae.config import ConfigError, OptimConfig, TrainerConfig
from posae.data.cache_reader import ActivationCache
from posae.losses import LossTerm, StepContext
from posae.sae.base import SAE
from posae.training.batches import BatchLoader, WindowOrder
from posae.training.checkpoint import save_checkpoint
from posae.training.dead import DeadLatents
from posae.training.host_memory import keep_freed_host_memory
from posae.training.resampling import PositionActivity, lowest_fraction, resample_latents
from posae.training.schedule import lr_multiplier
from posae.training.step_log import StepLog

# Training FVU above this is divergence, not a bad start: a tied initialisation's overshoot
# gives FVU ~10-10^3 (its ‖x̂‖/‖x‖ grows with width/d), a diverged run 10^20 and more.
DIVERGED_FVU = 1e6


class TrainingDiverged(RuntimeError):
    """The loss, the reconstruction or a parameter left the finite range; raised before any
    checkpoint of that state is written, so the last checkpoint on disk is a finite one."""

    def __init__(self, step: int, what: str):
        super().__init__(f"training diverged at step {step}: {what}")
        self.step = step


class TrainingInterrupted(Exception):
    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} after saving a checkpoint")
        self.signum = signum


def input_scale(cache: ActivationCache, normalize: bool) -> float:
    """√d / E‖x‖, so that scaled inputs have E‖x‖ = √d (1 when normalisation is off)."""
    return math.sqrt(cache.d_model) / cache.stats["mean_norm"] if normalize else 1.0


def make_optimizer(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


class Trainer:
    def __init__(self, sae: SAE, terms: dict[str, LossTerm], optim: OptimConfig,
                 cfg: TrainerConfig, cache: ActivationCache, train_ids: np.ndarray, seed: int,
                 accelerator: Accelerator, run_dir: Path, logger):
        self.cfg, self.terms, self.accelerator = cfg, terms, accelerator
        self.run_dir, self.logger = run_dir, logger
        if accelerator.device.type == "cpu":
            keep_freed_host_memory()
        self.world, self.rank = accelerator.num_processes, accelerator.process_index
        self.units_per_step = cfg.batch_tokens // cfg.window
        if self.units_per_step % self.world:
            raise ConfigError(
                f"trainer.batch_tokens={cfg.batch_tokens} gives {self.units_per_step} windows, "
                f"which do not split evenly across {self.world} processes")
        if cfg.micro_batches > self.units_per_step // self.world:
            raise ConfigError(
                f"trainer.micro_batches={cfg.micro_batches} exceeds the "
                f"{self.units_per_step // self.world} windows each process gets per step")
        self.total_steps = cfg.total_steps
        self.scale = input_scale(cache, cfg.normalize_activations)
        self.order = WindowOrder(train_ids, cache.context_size, cfg.window, seed)
        self.loader = BatchLoader(cache, cfg.window, self.scale, cfg.train_on_special_tokens,
                                  accelerator.device)
        with torch.no_grad():
            sae.b_dec.copy_(torch.tensor(cache.stats["mean"]) * self.scale)
        self.model, self.optimizer = accelerator.prepare(sae, make_optimizer(sae.parameters(),
                                                                             optim))
        self.sae: SAE = accelerator.unwrap_model(self.model)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer.optimizer, lr_multiplier(optim, self.total_steps))
        self.dead = DeadLatents(self.sae.cfg.d_sae, cfg.dead_after_tokens, accelerator.device)
        self.activity = (PositionActivity(cache.context_size, self.sae.cfg.d_sae,
                                          accelerator.device)
                         if cfg.resample_select == "temporal_importance" else None)
        self.generator = torch.Generator().manual_seed(seed)
        self.step = 0
        self.stop_signal = 0
        self.last_stats: dict[str, float] = {}
        self.resampled = {"resample/rounds": 0.0}
        self.last_batch = None  # the last step's last micro-batch (checked before a save)
        self.step_log = StepLog(run_dir, accelerator.is_main_process)

    # ----- state -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "sae": self.sae.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "order": self.order.state_dict(),
            "dead": self.dead.state_dict(),
            "activity": self.activity.state_dict() if self.activity else {},
            "resampled": dict(self.resampled),
            "coefficients": {n: t.coefficient.state_dict() for n, t in self.terms.items()},
            "rng": {"torch": torch.get_rng_state(), "generator": self.generator.get_state()},
            "wandb_run_id": self.logger.run_id,
        }

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.sae.load_state_dict(state["sae"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.order.load_state_dict(state["order"])
        self.dead.load_state_dict(state["dead"])
        if self.activity:
            self.activity.load_state_dict(state["activity"])
        self.resampled = dict(state.get("resampled", {"resample/rounds": 0.0}))
        for name, term in self.terms.items():
            term.coefficient.load_state_dict(state["coefficients"][name])
        torch.set_rng_state(state["rng"]["torch"].cpu())
        self.generator.set_state(state["rng"]["generator"].cpu())

    def check_finite(self, stats: dict[str, float] | None = None) -> None:
        """Raise `TrainingDiverged` if the step's loss is non-finite or its FVU (`stats`,
        measured before the step's update) exceeds DIVERGED_FVU; without `stats`, before a
        checkpoint or the final save, if a parameter is non-finite or the current weights'
        FVU on the last batch does (the update just made is checked before it is kept)."""
        if stats is not None:
            loss, fvu = stats["loss/total"], stats["fvu"]
            if not (math.isfinite(loss) and fvu < DIVERGED_FVU):  # NaN fails the comparison
                raise TrainingDiverged(self.step, f"loss {loss:.4g}, training FVU {fvu:.4g}")
            return
        for name, param in self.sae.named_parameters():
            if not torch.isfinite(param).all():
                raise TrainingDiverged(self.step, f"parameter {name} holds non-finite values")
        if self.last_batch is not None:
            fvu = 1 - self._explained_variance(self.last_batch)
            worst = self.accelerator.reduce(torch.tensor(fvu, device=self.accelerator.device),
                                            "max").item()
            if not worst < DIVERGED_FVU:
                raise TrainingDiverged(self.step, f"the weights after this step have FVU "
                                                  f"{worst:.4g} on its batch")

    def save_checkpoint(self) -> None:
        # apply state an SAE keeps pending for its next step (PA-SAE's recorded gradients,
        # all-reduced: every process takes part), so a checkpoint holds no per-process state
        self.sae.before_step(self.step)
        self.check_finite()
        if self.accelerator.is_main_process:
            save_checkpoint(self.run_dir, self.step, self.state_dict(), self.cfg.keep_checkpoints)
        self.accelerator.wait_for_everyone()

    # ----- one step ----------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        """One optimiser step on the global batch, in `trainer.micro_batches` pieces per
        process (gradient accumulation: one gradient sync, same result as one piece)."""
        units = self.order.take(self.units_per_step)[self.rank :: self.world]
        batches = [self.loader.load(part) for part in np.array_split(units, self.cfg.micro_batches)]
        n_local = sum(batch.mask.sum() for batch in batches).float()
        n_global = self.accelerator.reduce(n_local, "sum").item()
        ctx = StepContext(self.step, max(n_global, 1.0) / self.world, self.sae, self.dead.dead)
        coefs = {name: term.coefficient(self.step) for name, term in self.terms.items()}
        self.sae.before_step(self.step)
        scaler = self.accelerator.scaler
        self.sae.set_token_gradient_scale(ctx.n_tokens / (scaler.get_scale() if scaler else 1.0))
        local = 0
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            with contextlib.nullcontext() if last else self.accelerator.no_sync(self.model):
                with self.accelerator.autocast():
                    out = self.model(batch.x, batch.pos, batch.mask)
                    values = {name: term(out, batch, ctx) for name, term in self.terms.items()}
                    loss = sum(coefs[name] * value for name, value in values.items())
                self.accelerator.backward(loss)
            codes = out.input_codes.detach()
            local = local + self._local_stats(codes, out.x_hat.detach(), batch, values)
            if self.activity:
                self.activity.update(codes, batch.mask, batch.pos)
        if self.sae.cfg.normalize_decoder:
            self.sae.remove_parallel_decoder_grad_()
        if self.cfg.grad_clip:
            self.accelerator.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.sae.cfg.normalize_decoder:
            self.sae.normalize_decoder_()
        stats = self._global_stats(local, list(values), coefs, n_global)
        self.last_batch = batch
        self.step += 1
        if self.resampling_due():
            self._resample(batch, out.x_hat.detach())
        for term in self.terms.values():
            term.coefficient.update(stats)
        return stats

    @staticmethod
    def _local_stats(f, x_hat, batch, values) -> torch.Tensor:
        """This piece's sums: term values, L0, squared error, Σx², Σx, latents fired."""
        active = f != 0
        active &= batch.mask[..., None]
        x, err = batch.x[batch.mask], (x_hat.float() - batch.x)[batch.mask]
        return torch.cat([torch.stack([v.detach().float() for v in values.values()]),
                          torch.count_nonzero(active).float()[None],  # bool .sum() is slow
                          err.pow(2).sum()[None], x.pow(2).sum()[None], x.sum(0),
                          active.flatten(0, -2).any(0).float()])

    def _global_stats(self, local, names, coefs, n_global) -> dict[str, float]:
        """One all-reduce of the step's sums, turned into logged statistics."""
        total = self.accelerator.reduce(local, "sum")
        k, d = len(names), self.sae.cfg.d_in
        sq_err, sq_x, sum_x = total[k + 1], total[k + 2], total[k + 3 : k + 3 + d]
        self.dead.update(total[k + 3 + d :] > 0, int(n_global))
        n = max(n_global, 1.0)
        stats = {f"loss/{name}": total[i].item() / self.world for i, name in enumerate(names)}
        stats["loss/total"] = sum(coefs[name] * stats[f"loss/{name}"] for name in names)
        stats.update({f"coef/{name}": c for name, c in coefs.items()})
        stats["l0"] = total[k].item() / n
        stats["fvu"] = (sq_err / (sq_x - sum_x.pow(2).sum() / n).clamp_min(1e-12)).item()
        stats["dead_fraction"] = self.dead.dead.float().mean().item()
        stats["lr"] = self.scheduler.get_last_lr()[0]
        return stats

    def resampling_due(self) -> bool:
        every = self.cfg.resample_every
        return bool(every) and self.step % every == 0 and self.step + every <= self.total_steps

    def mechanism_stats(self) -> dict[str, float]:
        """The state of every mechanism: the SAE's own (`mech/`), the resampling record."""
        stats = {f"mech/{name}": value for name, value in self.sae.mechanism_state().items()}
        stats.update({f"coef/{term}_{key}": value for term, t in self.terms.items()
                      for key, value in t.coefficient.logged_state().items()})
        if self.cfg.resample_every:
            stats.update(self.resampled)
        return stats

    @torch.no_grad()
    def _explained_variance(self, batch) -> float:
        """1 - FVU of the SAE in inference mode on this process's piece of the batch, counted
        tokens only (inference mode: no training state such as BatchTopK's threshold moves)."""
        x = batch.x[batch.mask].float()
        self.sae.eval()
        with self.accelerator.autocast():
            x_hat = self.sae(batch.x, batch.pos, batch.mask).x_hat[batch.mask].float()
        self.sae.train()
        return 1 - ((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)).item()

    def _resample(self, batch, x_hat) -> None:
        if self.activity:
            self.activity.sums.copy_(self.accelerator.reduce(self.activity.sums, "sum"))
            self.activity.counts.copy_(self.accelerator.reduce(self.activity.counts, "sum"))
            latents = lowest_fraction(self.activity.scores(self.cfg.resample_gamma),
                                      self.cfg.resample_fraction)
            self.activity.reset()
        elif self.cfg.resample_select == "random":
            latents = lowest_fraction(torch.rand(self.sae.cfg.d_sae, generator=self.generator),
                                      self.cfg.resample_fraction).to(self.accelerator.device)
        else:
            latents = self.dead.dead.nonzero().squeeze(-1)
        if latents.numel() == 0:
            return
        x = batch.x[batch.mask]
        scores = (x - x_hat[batch.mask].float()).pow(2).sum(-1).pow(2)
        ev_before = self._explained_variance(batch)
        resample_latents(self.sae, self.optimizer.optimizer, latents, x, scores, self.generator)
        for param in (self.sae.W_enc, self.sae.W_dec, self.sae.b_enc):
            param.data.copy_(broadcast(param.data, from_process=0))
        self.dead.tokens_since_fired[latents] = 0
        self.resampled = {"resample/rounds": self.resampled["resample/rounds"] + 1,
                          "resample/step": float(self.step),
                          "resample/latents": float(latents.numel()),
                          "resample/ev_before": ev_before,
                          "resample/ev_after": self._explained_variance(batch)}

    # ----- the loop ----------------------------------------------------------------------
    def fit(self) -> float:
        """Train to the end; return the wall time of this process's share."""
        tokens_per_step = self.units_per_step * self.cfg.window
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        bar = tqdm(total=self.total_steps * tokens_per_step, initial=self.step * tokens_per_step,
                   unit="tok", unit_scale=True, desc="training", dynamic_ncols=True,
                   disable=not self.accelerator.is_main_process)
        start = time.perf_counter()
        self.step_log.truncate_after(self.step)
        try:
            while self.step < self.total_steps:
                stats = self.last_stats = self.train_step()
                self.check_finite(stats)
                bar.update(tokens_per_step)
                if self.step % self.cfg.log_every == 0 or self.step == self.total_steps:
                    stats.update(self.mechanism_stats())
                    self.logger.log(stats, self.step)
                    self.step_log.write(self.step, stats)
                    bar.set_postfix(loss=f"{stats['loss/total']:.3g}", l0=f"{stats['l0']:.1f}",
                                    dead=f"{stats['dead_fraction']:.2f}")
                stop = self.accelerator.reduce(
                    torch.tensor(float(self.stop_signal), device=self.accelerator.device), "max")
                if self.step % self.cfg.checkpoint_every == 0 or stop.item():
                    self.save_checkpoint()
                if stop.item():
                    raise TrainingInterrupted(self.stop_signal or signal.SIGTERM)
            self.sae.before_step(self.step)  # apply pending state before the SAE is saved
            self.check_finite()
            self.last_stats.update(self.mechanism_stats())
            self.last_stats.setdefault("dead_fraction", self.dead.dead.float().mean().item())
        finally:
            bar.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return time.perf_counter() - start

    def _on_signal(self, signum, frame) -> None:
        self.stop_signal = signum
