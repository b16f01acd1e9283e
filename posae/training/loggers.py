"""Experiment logging: `logger=wandb` or `logger=none`, on the main process only."""

from __future__ import annotations

import netrc
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf


class NoLogger:
    run_id: str | None = None

    def log(self, metrics: dict, step: int) -> None:
        pass

    def summary(self, metrics: dict) -> None:
        pass

    def images(self, paths: dict) -> None:
        pass

    def finish(self) -> None:
        pass


def wandb_mode(requested: str) -> str:
    """online when an API key is configured, offline otherwise; WANDB_MODE always wins."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        logged_in = netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        logged_in = False
    return "online" if logged_in else "offline"


class WandbLogger:
    def __init__(self, cfg: DictConfig, run_dir: Path, name: str, group: str | None,
                 run_id: str | None):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(
            project=cfg.logger.project, entity=cfg.logger.entity, name=name, group=group,
            dir=str(run_dir), id=run_id, resume="allow", mode=wandb_mode(cfg.logger.mode),
            config=OmegaConf.to_container(cfg, resolve=True),
        )
        self.run_id = self.run.id

    def log(self, metrics: dict, step: int) -> None:
        self.run.log(metrics, step=step)

    def summary(self, metrics: dict) -> None:
        self.run.summary.update(metrics)

    def images(self, paths: dict) -> None:
        """PNG files as W&B images under `plots/<name>`."""
        if paths:
            self.run.log({f"plots/{name}": self.wandb.Image(str(path))
                          for name, path in paths.items()})

    def table(self, key: str, columns: list[str], rows: list[list]) -> None:
        self.run.log({key: self.wandb.Table(columns=columns, data=rows)})

    def finish(self) -> None:
        self.run.finish()


def make_logger(cfg: DictConfig, run_dir: Path, name: str, group: str | None,
                run_id: str | None, is_main: bool):
    if cfg.logger.name == "wandb" and is_main:
        return WandbLogger(cfg, run_dir, name, group, run_id)
    return NoLogger()
