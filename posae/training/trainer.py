"""The training loop: Accelerate data parallelism over cached windows, one global batch per step.

Each step: this process's share of the global batch → SAE forward (bf16 autocast on GPU)
→ weighted loss terms, each a mean over the global batch's counted tokens → backward
(gradients averaged across processes) → decoder-gradient projection, clipping, optimiser
and LR step → unit-norm decoder → global statistics (losses, L0, firing, the stop flag:
one all-reduce) → step hooks (posae/training/hooks.py): dead-latent tracking, resampling,
the loss coefficients' controllers, the SAE's own per-step state. Checkpoints every N
steps and on SIGTERM/SIGINT. At each log step the statistics, with every mechanism's state
(`mech/...` from `SAE.mechanism_state`, and each hook's `logged_state`), go to the logger
and to the run folder's `train_log.jsonl`.
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
from accelerate.utils import DistributedDataParallelKwargs, broadcast
from tqdm.auto import tqdm

from posae.config import ConfigError, OptimConfig, TrainerConfig
from posae.data.cache_reader import ActivationCache
from posae.losses import LossTerm
from posae.sae.base import SAE
from posae.training.batches import BatchLoader, WindowOrder
from posae.training.checkpoint import save_checkpoint
from posae.training.dead import DeadLatents
from posae.training.hooks import StepContext, StepEnd, StepHook
from posae.training.host_memory import keep_freed_host_memory
from posae.training.resampling import Resampler, resample_policy
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
        # read by `prepare` when it wraps the SAE for data parallelism
        accelerator.ddp_handler = DistributedDataParallelKwargs(
            find_unused_parameters=sae.leaves_parameters_unused())
        self.model, self.optimizer = accelerator.prepare(sae, make_optimizer(sae.parameters(),
                                                                             optim))
        self.sae: SAE = accelerator.unwrap_model(self.model)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer.optimizer, lr_multiplier(optim, self.total_steps))
        self.dead = DeadLatents(self.sae.cfg.d_sae, cfg.dead_after_tokens, accelerator.device)
        self.generator = torch.Generator().manual_seed(seed)
        self.hooks = self._register_hooks(cache.context_size)
        self.step = 0
        self.stop_signal = 0
        self.stop_requested = False  # some process was asked to stop (set by each step)
        self.last_stats: dict[str, float] = {}
        self.last_batch = None  # the last step's last micro-batch (checked before a save)
        self.step_log = StepLog(run_dir, accelerator.is_main_process)

    def _register_hooks(self, context_size: int) -> dict[str, tuple[str, StepHook]]:
        """name → (log prefix, hook), in the order they run (posae/training/hooks.py)."""
        hooks: dict[str, tuple[str, StepHook]] = {"dead": ("", self.dead)}
        if self.cfg.resample_every:
            policy = resample_policy(self.cfg.resample)
            policy.bind(self.sae.cfg.d_sae, context_size, self.accelerator.device, self.generator)
            hooks["resampling"] = ("", Resampler(
                policy, self.cfg.resample_every, self.total_steps, self.sae,
                self.optimizer.optimizer, self.dead, self.generator, self._explained_variance,
                lambda tensor: broadcast(tensor, from_process=0)))
        for name, term in self.terms.items():
            hooks[f"coef/{name}"] = (f"coef/{name}_", term.coefficient)
        for i, hook in enumerate(self.sae.step_hooks()):
            hooks[f"sae/{i}"] = ("", hook)
        return hooks

    # ----- state -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "sae": self.sae.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "order": self.order.state_dict(),
            "hooks": {name: hook.state_dict() for name, (_, hook) in self.hooks.items()},
            "rng": {"torch": torch.get_rng_state(), "generator": self.generator.get_state()},
            "wandb_run_id": self.logger.run_id,
        }

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.sae.load_state_dict(state["sae"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.order.load_state_dict(state["order"])
        hook_states = state["hooks"] if "hooks" in state else hook_states_before_hooks(state)
        for name, (_, hook) in self.hooks.items():
            hook.load_state_dict(hook_states.get(name, {}))
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
        scaler = self.accelerator.scaler
        ctx = StepContext(self.step, max(n_global, 1.0) / self.world, self.sae, self.dead.dead,
                          scaler.get_scale() if scaler else 1.0)
        coefs = {name: term.coefficient(self.step) for name, term in self.terms.items()}
        for _, hook in self.hooks.values():
            hook.on_step_start(ctx)
        local = 0
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            with contextlib.nullcontext() if last else self.accelerator.no_sync(self.model):
                with self.accelerator.autocast():
                    out = self.model(batch.x, batch.pos, batch.mask)
                    values = {name: term(out, batch, ctx) for name, term in self.terms.items()}
                    loss = sum(coefs[name] * value for name, value in values.items())
                self.accelerator.backward(loss)
            local = local + self._local_stats(out, batch, values)
            for _, hook in self.hooks.values():
                hook.on_batch(out, batch)
        if self.sae.cfg.normalize_decoder:
            self.sae.remove_parallel_decoder_grad_()
        if self.cfg.grad_clip:
            self.accelerator.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.sae.cfg.normalize_decoder:
            self.sae.normalize_decoder_()
        stats, fired, self.stop_requested = self._global_stats(local, list(values), coefs,
                                                               n_global)
        self.last_batch = batch
        self.step += 1
        end = StepEnd(self.step, stats, fired, int(n_global), batch, out.x_hat.detach())
        for _, hook in self.hooks.values():
            hook.on_step_end(end, self.accelerator.reduce)
        return stats

    def _local_stats(self, out, batch, values) -> torch.Tensor:
        """This piece's sums: term values, L0, squared error, Σx², Σx, latents fired, and
        whether this process was asked to stop (folded into the statistics' all-reduce)."""
        n_active, fired = out.active_codes(batch.mask)
        x, err = batch.x[batch.mask], (out.x_hat.detach().float() - batch.x)[batch.mask]
        return torch.cat([torch.stack([v.detach().float() for v in values.values()]),
                          n_active.float()[None], err.pow(2).sum()[None],
                          x.pow(2).sum()[None], x.sum(0), fired.float(),
                          x.new_tensor([float(self.stop_signal != 0)])])

    def _global_stats(self, local, names, coefs, n_global):
        """One all-reduce of the step's sums: the logged statistics, the latents that fired
        somewhere in the global batch, and whether any process was asked to stop."""
        total = self.accelerator.reduce(local, "sum")
        k, d = len(names), self.sae.cfg.d_in
        sq_err, sq_x, sum_x = total[k + 1], total[k + 2], total[k + 3 : k + 3 + d]
        fired = total[k + 3 + d : -1] > 0
        n = max(n_global, 1.0)
        stats = {f"loss/{name}": total[i].item() / self.world for i, name in enumerate(names)}
        stats["loss/total"] = sum(coefs[name] * stats[f"loss/{name}"] for name in names)
        stats.update({f"coef/{name}": c for name, c in coefs.items()})
        stats["l0"] = total[k].item() / n
        stats["fvu"] = (sq_err / (sq_x - sum_x.pow(2).sum() / n).clamp_min(1e-12)).item()
        stats["lr"] = self.scheduler.get_last_lr()[0]
        return stats, fired, bool(total[-1].item())

    def mechanism_stats(self) -> dict[str, float]:
        """The state of every mechanism: the SAE's own (`mech/`) and every hook's."""
        stats = {f"mech/{name}": value for name, value in self.sae.mechanism_state().items()}
        for prefix, hook in self.hooks.values():
            stats.update({f"{prefix}{key}": value for key, value in hook.logged_state().items()})
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
                if self.step % self.cfg.checkpoint_every == 0 or self.stop_requested:
                    self.save_checkpoint()
                if self.stop_requested:
                    raise TrainingInterrupted(self.stop_signal or signal.SIGTERM)
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


def hook_states_before_hooks(state: dict) -> dict:
    """The hooks' states in a checkpoint written before the step hooks (2026-12-02), which
    kept them under their own keys."""
    return {"dead": state["dead"],
            "resampling": {"record": state.get("resampled", {"resample/rounds": 0.0}),
                           "policy": state.get("activity", {})},
            **{f"coef/{name}": value for name, value in state["coefficients"].items()}}
