"""Reconstruction and sparsity metrics over held-out sequences, float64 accumulators.

    MSE = E‖x - x̂‖²,  EV = 1 - E‖x - x̂‖² / (E‖x‖² - ‖E x‖²),  L0 = E #{i: f_i ≠ 0},
    L1 = E Σ|f_i|,  dead = latents never active,  dense = active on > 10 % of tokens.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from posae.sae.base import SAE
from posae.training.batches import Batch


@torch.no_grad()
def core_metrics(sae: SAE, batches: Iterable[Batch]) -> dict[str, float]:
    n = 0
    sum_x = sq_x = sq_err = l0 = l1 = 0.0
    fires = None
    for batch in batches:
        x = batch.x[batch.mask].double()
        out = sae(batch.x, batch.pos, batch.mask)
        x_hat, f = out.x_hat[batch.mask].double(), out.f[batch.mask].double()
        n += len(x)
        sum_x = sum_x + x.sum(0)
        sq_x += x.pow(2).sum().item()
        sq_err += (x - x_hat).pow(2).sum().item()
        active = f != 0
        l0 += active.sum().item()
        l1 += f.abs().sum().item()
        fires = active.sum(0) if fires is None else fires + active.sum(0)
    if n == 0:
        raise ValueError("no tokens to evaluate")
    mean = sum_x / n
    variance = sq_x / n - mean.pow(2).sum().item()
    return {
        "mse": sq_err / n,
        "explained_variance": 1 - (sq_err / n) / variance,
        "l0": l0 / n,
        "l1": l1 / n,
        "dead_fraction": (fires == 0).double().mean().item(),
        "dense_fraction": (fires > 0.1 * n).double().mean().item(),
        "n_tokens": n,
    }
