"""PA-SAE's importance weights (000 eq. 6) in trained runs: how many latents collapsed, in
runs whose loss uses them and in runs that only track them.

Every PA-SAE tracks the EMA of eq. 6; only runs with the `importance_l1` term feed the
weights back into the loss (and so into the gradient the EMA averages). A collapsed latent
has more than half of its weight L·w (L in all) on one position, as
`mech/importance_collapsed_latents` counts it; the weights here are unclipped.

    python experiments/analysis/importance_collapse.py outputs/sweeps/pa_sae_matched/embedded/*@*
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from posae.sae.pa_sae import collapsed_latents as collapsed
from posae.sae.pa_sae import importance_weights


def collapsed_latents(importance_ema: torch.Tensor) -> tuple[int, float]:
    """(latents with more than half their weight on one position, the largest L·w), from
    the EMA of eq. 6, [positions, latents]."""
    weights = importance_weights(importance_ema)
    return int(collapsed(weights).sum()), weights.max().item()


def main(run_dirs: list[Path]) -> None:
    for run in run_dirs:
        weights = run / "sae" / "sae_weights.safetensors"
        if not weights.exists():
            continue
        ema = load_file(str(weights)).get("importance_ema")
        if ema is None:
            continue
        config = yaml.safe_load((run / "run_config.yaml").read_text())
        in_loss = "importance_l1" in config["loss"]
        count, largest = collapsed_latents(ema)
        print(f"{run.name:38s} importance L1 in the loss: {str(in_loss):5s} "
              f"largest L·w {largest:7.2f}  collapsed latents {count}")


if __name__ == "__main__":
    main([Path(p) for p in sys.argv[1:]])
