"""`python -m posae.evaluate run_dir=...`: evaluate a trained SAE (metrics.json + plots/).

    python -m posae.evaluate run_dir=outputs/runs/2026-11-22/10-00-00_minilm_L3_topk
    python -m posae.evaluate run_dir=... eval.families=[structure,preservation] logger=wandb
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from posae.cli import CONFIG_PATH, exit_on_user_error, log
from posae.config import eval_config
from posae.eval.run import evaluate_run
from posae.training.loggers import make_logger


def evaluate_logged(cfg: DictConfig, run_dir: Path, wandb_run_id: str | None = None) -> dict:
    """Evaluate `run_dir` with `cfg.eval`, logging to `cfg.logger` (into the W&B run
    `wandb_run_id` when given), and log the headline numbers; the metrics."""
    ecfg = eval_config(cfg.eval)  # a bad key fails before W&B is touched
    logger = make_logger(cfg, run_dir, run_dir.name, None, wandb_run_id, True)
    try:
        metrics = evaluate_run(run_dir, ecfg, logger)
    finally:
        logger.finish()
    core = metrics["core"]
    log.info("%s: explained variance %.4f, L0 %.1f; metrics.json and %d plots in %s",
             metrics["sae"]["name"], core["explained_variance"], core["l0"],
             len(metrics["plots"]), run_dir)
    return metrics


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="evaluate")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    run_dir = Path(cfg.run_dir)
    summary = run_dir / "train_summary.json"
    run_id = json.loads(summary.read_text()).get("wandb_run_id") if summary.exists() else None
    evaluate_logged(cfg, run_dir, run_id)


if __name__ == "__main__":
    if not any(arg.startswith(("run_dir=", "-")) for arg in sys.argv[1:]):  # -h, --cfg pass
        print("posae.evaluate: run_dir=<the folder of a finished `python -m posae.train` run> "
              "is required", file=sys.stderr)
        sys.exit(2)
    main()
