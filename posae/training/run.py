"""A run's folder: one per run even with several processes, its saved config, resuming."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from posae.config import ConfigError
from posae.training.checkpoint import latest_checkpoint

RUN_CONFIG = "run_config.yaml"
LOCK_FILE = ".lock"


def shared_run_dir(accelerator: Accelerator) -> Path:
    """Rank 0's Hydra output folder, on every rank; other ranks' folders are removed."""
    own = Path(HydraConfig.get().runtime.output_dir)
    chosen = Path(broadcast_object_list([str(own)])[0])
    if chosen != own:
        shutil.rmtree(own, ignore_errors=True)
    return chosen


@contextlib.contextmanager
def hold_run_folder(run_dir: Path, is_main: bool) -> Iterator[None]:
    """Hold an exclusive lock on `run_dir` (its `.lock`, which names the holder) while a run
    trains there, so that a second training into the same folder is refused before it
    writes anything, instead of mixing two runs in one folder. The main process holds it;
    the lock goes with the process (a killed run leaves no stale lock)."""
    if not is_main:
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / LOCK_FILE, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise ConfigError(f"hydra.run.dir: {run_dir} is in use by another training "
                              f"({holder}); wait for it to end or choose another folder") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def save_launch(cfg: DictConfig, run_dir: Path) -> None:
    """`.hydra/config.yaml` and `.hydra/overrides.yaml` of the launch that started this run,
    written once, when it starts (Hydra's own writing is off: `hydra.output_subdir: null`),
    so that a resumed or refused launch cannot relabel the run (posae.report reads them)."""
    folder = run_dir / ".hydra"
    folder.mkdir(exist_ok=True)
    OmegaConf.save(cfg, folder / "config.yaml")
    OmegaConf.save(OmegaConf.create(list(HydraConfig.get().overrides.task)),
                   folder / "overrides.yaml")


def run_name_and_group(run_dir: Path) -> tuple[str, str | None]:
    """W&B name and group: multirun jobs are grouped by their sweep."""
    hydra = HydraConfig.get()
    if hydra.mode == RunMode.MULTIRUN:
        sweep = Path(hydra.sweep.dir)
        group = f"{sweep.parent.name}/{sweep.name}"  # e.g. tc_sae_matched/embedded
        return f"{group}/{run_dir.name}", group
    return run_dir.name, None


def finished(run_dir: Path) -> bool:
    """The run in this folder trained and was evaluated (a metrics.json that parses), or
    needs no evaluation."""
    try:
        return isinstance(json.loads((run_dir / "metrics.json").read_text()), dict)
    except (OSError, ValueError):
        pass
    return ((run_dir / "train_summary.json").exists() and (run_dir / RUN_CONFIG).exists()
            and not OmegaConf.load(run_dir / RUN_CONFIG).eval.enabled)


def flat_config(tree: dict, prefix: str = "") -> dict[str, object]:
    """{dotted key: leaf value} of a config tree."""
    flat: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_finished_run(cfg: DictConfig, run_dir: Path) -> list[str]:
    """A finished run that `resume=auto` skips must be the run now asked for: refuse one
    whose saved config has a different value for a key (the experiment or a run file was
    edited since). Keys only one side has (the code gained or lost an option since) are
    returned for a warning. `resume` and the report's `paper` block are not compared."""
    saved = flat_config(OmegaConf.to_container(OmegaConf.load(run_dir / RUN_CONFIG)))
    current = flat_config(OmegaConf.to_container(cfg, resolve=True))
    compared = {k for k in saved.keys() | current.keys()
                if k != "resume" and not k.startswith("paper.")}
    changed = sorted(k for k in compared & saved.keys() & current.keys()
                     if saved[k] != current[k])
    if changed:
        listing = ", ".join(f"{k}: {saved[k]!r} then, {current[k]!r} now" for k in changed)
        raise ConfigError(f"{run_dir} holds a finished run of another config ({listing}); "
                          f"remove that folder to rerun it, or choose another hydra.sweep.dir")
    return sorted(compared - (saved.keys() & current.keys()))


# Config groups whose package is not their name: where an override of one lands.
GROUP_PACKAGES = {"resample": "trainer.resample"}


def run_config(cfg: DictConfig, run_dir: Path, is_main: bool) -> tuple[DictConfig, Path | None]:
    """The config this run uses and the checkpoint to continue from, if any.

    A new run saves its resolved config. `resume=true` reloads it: overrides given again must
    match it (a sweep can be relaunched as it was), and other overrides are refused.
    `resume=auto` resumes a folder that holds a checkpoint and starts one that does not
    (a relaunched sweep; `finished` tells which jobs to skip).
    """
    saved = run_dir / RUN_CONFIG
    auto = cfg.resume == "auto"
    if auto:  # not finished (main skips those): continue from a checkpoint, or start over
        cfg.resume = bool(saved.exists() and latest_checkpoint(run_dir))
    if not cfg.resume:
        trained = latest_checkpoint(run_dir) or (run_dir / "train_summary.json").exists()
        if not auto and saved.exists() and trained:
            raise ConfigError(f"hydra.run.dir: {run_dir} already holds a run; pass resume=true to "
                              f"continue it or choose another folder")
        if is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            OmegaConf.save(cfg, saved, resolve=True)
            save_launch(cfg, run_dir)
        return cfg, None
    if not saved.exists():
        raise ConfigError(f"resume=true: no {RUN_CONFIG} in {run_dir}; set hydra.run.dir to the "
                          f"folder of the run to continue")
    previous = OmegaConf.load(saved)
    for override in OverridesParser.create().parse_overrides(HydraConfig.get().overrides.task):
        key = GROUP_PACKAGES.get(override.key_or_group, override.key_or_group)
        if key == "resume" or key.startswith("hydra"):
            continue
        if OmegaConf.select(cfg, key) != OmegaConf.select(previous, key):
            raise ConfigError(f"resume=true: {override.input_line} differs from the run's saved "
                              f"config in {saved}")
    previous.resume = True
    return previous, latest_checkpoint(run_dir)
