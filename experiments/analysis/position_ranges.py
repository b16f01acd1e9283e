"""Position-range latents of trained SAEs, and whether they read the position-mean input.

A range latent fires on nearly every held-out token inside a contiguous range of positions
and rarely outside it: its longest run of positions with firing rate >= `EDGE` spans at
least `MIN_LENGTH` positions, its mean rate there is >= `INSIDE` and elsewhere <= `OUTSIDE`.
A position-blind latent of the same frequency fires at that frequency at every position,
so it cannot pass; the chance count is 0.

Control: the encoder applied to the per-position mean input μ_t = E[x | position t] alone
(one vector per position, no token content). A range latent that also fires on μ_t over
its range reads the position component of the residual stream rather than token content.

    python experiments/analysis/position_ranges.py \
        outputs/sweeps/pa_sae_matched/embedded/{t1_0_baseline,topk}@l0_32_seed0
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from posae.eval.run import RunInputs

EDGE, INSIDE, OUTSIDE, MIN_LENGTH = 0.5, 0.85, 0.1, 4


def longest_run(active: np.ndarray) -> tuple[int, int]:
    """(start, length) of the longest run of True in a 1-d boolean array."""
    best, start = (0, 0), None
    for i, on in enumerate(np.append(active, False)):
        if on and start is None:
            start = i
        elif not on and start is not None:
            best = max(best, (i - start, start))
            start = None
    return best[1], best[0]


def range_latents(rate: np.ndarray) -> list[tuple[int, int, int]]:
    """(latent, start, length) of each range latent, from firing rates [position, latent]."""
    found = []
    for latent in range(rate.shape[1]):
        start, length = longest_run(rate[:, latent] >= EDGE)
        if not MIN_LENGTH <= length < len(rate):  # too short, or every position: no range
            continue
        inside = rate[start:start + length, latent]
        outside = np.delete(rate[:, latent], np.s_[start:start + length])
        if inside.mean() >= INSIDE and outside.mean() <= OUTSIDE:
            found.append((latent, start, length))
    return found


@torch.no_grad()
def analyse(run_dir: Path) -> dict:
    inputs = RunInputs(run_dir, torch.device("cpu"))
    sae = inputs.sae
    fires, counts, sums = None, None, None
    for batch in inputs.held_out_batches(inputs.eval_ids, 32):
        codes = sae.encode(batch.x, batch.pos, batch.mask) > 0            # [B, T, d_sae]
        mask = batch.mask[..., None].float()
        fires = (codes * mask).sum(0) if fires is None else fires + (codes * mask).sum(0)
        counts = mask.sum(0) if counts is None else counts + mask.sum(0)
        x = (batch.x * mask).sum(0)
        sums = x if sums is None else sums + x
    rate = (fires / counts.clamp_min(1)).numpy()                           # [T, d_sae]
    valid = counts[:, 0].numpy() > 0
    rate = rate[valid]
    mean_input = (sums / counts.clamp_min(1))[torch.from_numpy(valid)]     # [T', d]
    positions = torch.arange(len(counts))[torch.from_numpy(valid)]
    on_mean = (sae.encode(mean_input[None], positions[None],
                          torch.ones(1, len(positions), dtype=torch.bool))[0] > 0).numpy()
    ranges = range_latents(rate)
    reads_mean = sum(on_mean[start:start + length, latent].mean() >= 0.5
                     for latent, start, length in ranges)
    return {"run": str(run_dir), "sae": sae.cfg.name, "range_latents": len(ranges),
            "ranges": sorted((int(positions[start]), int(positions[start + length - 1]))
                             for _, start, length in ranges),
            "fire_on_position_mean": int(reads_mean)}


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print(analyse(Path(path)))
