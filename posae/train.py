"""`python -m posae.train`: train an SAE on cached activations, save it, report held-out metrics.

    python -m posae.train variant=topk layer=3
    accelerate launch --multi_gpu --num_processes 4 -m posae.train model=gemma-2-2b layer=12
    python -m posae.train resume=true hydra.run.dir=outputs/runs/<date>/<run>
"""

from __future__ import annotations

import json
import resource
import sys
from dataclasses import dataclass
from pathlib import Path

import hydra
import numpy as np
import torch
from accelerate import Accelerator
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from posae.cli import CONFIG_PATH, exit_on_user_error, log
from posae.config import (
    CacheRequest,
    ConfigError,
    EvalConfig,
    OptimConfig,
    TrainerConfig,
    cache_request,
    eval_config,
    optim_config,
    trainer_config,
)
from posae.data.cache_format import CacheSpec
from posae.data.cache_reader import ActivationCache
from posae.data.cache_writer import build_cache
from posae.eval.held_out import HeldOutPass, held_out_pass, raw_batches
from posae.eval.run import evaluate_run
from posae.losses import LossTerm, build_loss_terms, check_contracts, match_l0
from posae.losses.controllers import SparsityNotControlled
from posae.provenance import provenance
from posae.sae import SAE, SAEConfig, architecture, build_sae, sae_config
from posae.sae.export import save_folded
from posae.training.batches import held_out_split, split_fingerprint
from posae.training.checkpoint import latest_checkpoint, resume_state
from posae.training.loggers import make_logger
from posae.training.run import (
    check_finished_run,
    finished,
    hold_run_folder,
    run_config,
    run_name_and_group,
    shared_run_dir,
)
from posae.training.schedule import unfinished_schedules
from posae.training.trainer import Trainer, TrainingDiverged, TrainingInterrupted

# Exit status of a run that trained but failed (diverged, or its L0 could not be set):
# 1 is an uncaught exception, 2 a bad config or cache (posae.cli), 128 + n a signal.
TRAINING_FAILED = 3
# Sequences a batch of the held-out pass at training's end: eval.batch_sequences' default,
# so that the evaluation that follows can use that pass (the chance pairs depend on it).
HELD_OUT_BATCH = 32


def make_accelerator(trainer_node) -> Accelerator:
    cpu = bool(trainer_node.cpu) or not torch.cuda.is_available()
    precision = trainer_node.mixed_precision
    if precision == "auto":
        precision = "no" if cpu else "bf16"
    # whether DDP looks for parameters without a gradient is the SAE's to say (Trainer)
    return Accelerator(cpu=cpu, mixed_precision=precision)


@dataclass
class TrainingPlan:
    """Everything a run needs, validated from the composed config before any compute."""

    req: CacheRequest
    optim: OptimConfig
    trainer: TrainerConfig
    sae: SAEConfig
    terms: dict[str, LossTerm]
    eval: EvalConfig

    @property
    def layer(self) -> int:
        return self.req.layers[0]


# Top-level keys posae/conf/config.yaml and its groups define, and those experiment files add:
# `paper` (the report's block) and `layers` (dataset=synthetic's, for posae.cache).
TOP_LEVEL_KEYS = {"layer", "layers", "context_size", "n_tokens", "seed", "match_l0", "resume",
                  "model", "dataset", "cache", "loss", "optim", "trainer", "logger", "eval",
                  "variant", "scale", "paper"}


def plan_training(cfg: DictConfig) -> TrainingPlan:
    """Validate every part of the config (a bad key raises ConfigError naming it, a loss
    term the architecture cannot feed is refused) and warn of schedules that never finish."""
    if unknown := sorted(set(cfg) - TOP_LEVEL_KEYS):
        raise ConfigError(f"{', '.join(unknown)}: no such top-level key (a typo, or `+` where "
                          f"a group's key was meant?); known: {', '.join(sorted(TOP_LEVEL_KEYS))}")
    req = cache_request(cfg, "layer")
    tcfg = trainer_config(cfg.trainer, req.context_size)
    sequences = req.n_tokens // req.context_size  # about what the cache will hold
    training = sequences - max(1, round(sequences * tcfg.eval_fraction))
    if training * req.context_size < tcfg.batch_tokens:
        raise ConfigError(f"trainer.eval_fraction={tcfg.eval_fraction} leaves {max(training, 0)} "
                          f"of the {sequences} sequences of n_tokens={req.n_tokens} for "
                          f"training, less than one batch (trainer.batch_tokens="
                          f"{tcfg.batch_tokens}); lower it or raise n_tokens")
    plan = TrainingPlan(req, optim_config(cfg.optim), tcfg, sae_config(cfg.variant,
                                                                        req.model.d_model),
                        build_loss_terms(cfg.loss), eval_config(cfg.eval))
    check_contracts(plan.terms, plan.sae.name, architecture(plan.sae.arch))
    if tcfg.resample_every and not architecture(plan.sae.arch).resamplable:
        raise ConfigError(f"trainer.resample_every={tcfg.resample_every}: variant="
                          f"{plan.sae.name} has no encoder of its own to resample; set 0")
    if cfg.match_l0:
        log.info("match_l0: %s", match_l0(plan.sae, plan.terms, int(cfg.scale.target_l0)))
    for term in plan.terms.values():
        term.coefficient.plan(tcfg.total_steps)
    for warning in unfinished_schedules(cfg, tcfg.total_steps):
        log.warning(warning)
    return plan


def open_training_cache(plan: TrainingPlan, accelerator: Accelerator):
    """Build the activation cache if missing (one process builds, the others wait) and open
    it: (cache, training sequence ids, held-out sequence ids)."""
    with accelerator.main_process_first():
        build_cache(plan.req)
    # build_cache has just checked every shard (its sha256 too with cache.verify)
    cache = ActivationCache.open(CacheSpec.from_request(plan.req), plan.layer, verify=False)
    try:
        return (cache, *held_out_split(cache, plan.req.dataset.pack, plan.trainer.eval_fraction))
    except ValueError as err:  # the cache holds fewer or longer documents than planned
        raise ConfigError(f"trainer.eval_fraction={plan.trainer.eval_fraction}: {err} "
                          f"({cache.dir})") from None


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="config")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    accelerator = make_accelerator(cfg.trainer)
    run_dir = shared_run_dir(accelerator)
    with hold_run_folder(run_dir, accelerator.is_main_process):
        train_in(cfg, run_dir, accelerator)


def train_in(cfg: DictConfig, run_dir: Path, accelerator: Accelerator) -> None:
    """Train (or resume, or skip a finished) run in `run_dir`, which this process holds."""
    if skipped_as_finished(cfg, run_dir):
        return
    cfg, checkpoint = run_config(cfg, run_dir, accelerator.is_main_process)
    plan = plan_training(cfg)  # everything validated before any compute
    # the newest intact checkpoint, loaded once: the trainer's state and its W&B run's id
    resumed = resume_state(run_dir, accelerator.device) if checkpoint is not None else None
    cache, train_ids, eval_ids = open_training_cache(plan, accelerator)
    torch.manual_seed(cfg.seed)
    name, group = run_name_and_group(run_dir)
    logger = make_logger(cfg, run_dir, name, group,
                         resumed and resumed[1]["wandb_run_id"], accelerator.is_main_process)
    trainer = Trainer(build_sae(plan.sae), plan.terms, plan.optim, plan.trainer, cache,
                      train_ids, cfg.seed, accelerator, run_dir, logger)
    if resumed is not None:
        trainer.load_state_dict(resumed[1])
        log.info("resuming %s from step %d (%s)", run_dir, trainer.step, resumed[0].name)
    log.info("training %s (%d latents) on %s layer %d: %d steps of %d tokens, %d processes",
             plan.sae.name, plan.sae.d_sae, plan.req.model.name, plan.layer, trainer.total_steps,
             plan.trainer.batch_tokens, accelerator.num_processes)
    origin = provenance(accelerator.device)  # the code this process imported, at its start
    seconds = fit_or_exit(trainer, run_dir, logger)
    if accelerator.is_main_process:
        final = save_folded(trainer.sae, trainer.scale, run_dir / "sae",
                            sae_provenance(plan, cache, eval_ids))
        held_out = held_out_at_end(final, plan, cache, eval_ids, accelerator)
        write_train_summary(run_dir, held_out.result["core"], trainer, seconds, logger.run_id,
                            origin)
        evaluate_at_end(run_dir, plan.eval, held_out, logger)
    logger.finish()


def skipped_as_finished(cfg: DictConfig, run_dir: Path) -> bool:
    """resume=auto on a folder that holds a finished run of this config: skip it (a run of
    another config there is refused; keys only one side has are warned of)."""
    if cfg.resume != "auto" or not finished(run_dir):
        return False
    if added_or_removed := check_finished_run(cfg, run_dir):
        log.warning("%s: keys the saved config of this finished run lacks or has beyond "
                    "today's: %s", run_dir, ", ".join(added_or_removed))
    log.info("%s already holds a finished run (resume=auto): skipped", run_dir)
    return True


def fit_or_exit(trainer: Trainer, run_dir: Path, logger) -> float:
    """Train to the end; the seconds it took. A signal exits 128 + n (resumable); a run
    that diverged or whose L0 could not be set saves no model and exits TRAINING_FAILED
    (in a multirun it raises, so that Hydra runs the sweep's other jobs first)."""
    try:
        return trainer.fit()
    except TrainingInterrupted as stop:
        log.warning("%s; continue with resume=true hydra.run.dir=%s", stop, run_dir)
        logger.finish()
        sys.exit(128 + stop.signum)
    except (TrainingDiverged, SparsityNotControlled) as failure:
        kept = latest_checkpoint(run_dir)
        log.error("%s: %s; no model saved; %s", type(failure).__name__, failure,
                  f"the last checkpoint, from before, is kept: {kept}" if kept else
                  "no checkpoint was written before it")
        logger.finish()
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # Hydra runs the sweep's other jobs, then fails the sweep with this
        sys.exit(TRAINING_FAILED)


def sae_provenance(plan: TrainingPlan, cache: ActivationCache, eval_ids: np.ndarray) -> dict:
    """Where the saved SAE's inputs come from (its cfg.json; the evaluation checks the
    held-out split against it)."""
    return {"model": {"name": plan.req.model.name, "hf_id": plan.req.model.hf_id},
            "layer": plan.layer, "hook": cache.manifest["hook"],
            "context_size": plan.req.context_size, "prepend_bos": plan.req.model.prepend_bos,
            "dataset": plan.req.dataset.name,
            "cache": str(cache.dir),
            "train_on_special_tokens": plan.trainer.train_on_special_tokens,
            "held_out_split": split_fingerprint(eval_ids)}


def held_out_at_end(final: SAE, plan: TrainingPlan, cache: ActivationCache,
                    eval_ids: np.ndarray, accelerator: Accelerator) -> HeldOutPass:
    """The held-out pass of the saved SAE over every held-out sequence: train_summary.json's
    `held_out`, and the evaluation's own pass where that would be the same (HeldOutPass)."""
    batches = raw_batches(cache, eval_ids, HELD_OUT_BATCH, plan.trainer.train_on_special_tokens,
                          accelerator.device)
    return HeldOutPass(held_out_pass(final, batches, plan.req.context_size), final, eval_ids,
                       HELD_OUT_BATCH, accelerator.device, accelerator.mixed_precision)


def peak_memory() -> dict:
    """This process's peak resident memory and, on a GPU, peak allocated GPU memory (bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    return {"rss_bytes": rss, "gpu_bytes": gpu}


def write_train_summary(run_dir: Path, held_out: dict, trainer: Trainer, seconds: float,
                        wandb_run_id: str | None, origin: dict) -> None:
    """train_summary.json: held-out core metrics, the last step's statistics (the
    mechanisms' among them), steps, tokens, time, peak memory, W&B run and code
    provenance."""
    mechanisms = {k: v for k, v in trainer.last_stats.items()
                  if k.startswith(("mech/", "coef/", "resample/"))}
    summary = {"held_out": held_out, "final_train_stats": trainer.last_stats,
               "mechanisms": mechanisms,
               "steps": trainer.step, "tokens": trainer.step * trainer.cfg.batch_tokens,
               "train_seconds": seconds, "peak_memory": peak_memory(),
               "wandb_run_id": wandb_run_id, "provenance": origin}
    (run_dir / "train_summary.json").write_text(json.dumps(summary, indent=1))
    log.info("held-out: explained variance %.4f, L0 %.1f, MSE %.4g, dead %.3f (%s)",
             held_out["explained_variance"], held_out["l0"], held_out["mse"],
             held_out["dead_fraction"], run_dir / "sae")


def evaluate_at_end(run_dir: Path, ecfg: EvalConfig, held_out: HeldOutPass, logger) -> None:
    """The evaluation of the saved SAE (eval.enabled), which uses training's held-out pass
    where it is the pass it would run; without it, the held-out core metrics to W&B."""
    if ecfg.enabled:
        log.info("evaluating (eval.enabled=false skips this)")
        evaluate_run(run_dir, ecfg, logger, held_out)
    else:
        logger.summary({f"eval/core/{k}": v for k, v in held_out.result["core"].items()})


if __name__ == "__main__":
    main()
