"""The published temporal SAEs' headline measurements, each beside its chance value: the
same measurement on the same sequences with their tokens in a seeded random order
(docs/metrics.md, "smoothness" and "predicted_novel").

Smoothness (T-SAE, Bhalla et al. 2025, 2511.05541 §4.3; lower is smoother): per sequence,
over the latents of a group active somewhere in it,

    S = mean_i max_t |f_{t,i} − f_{t−1,i}| / ‖x_t − x_{t−1}‖

t over pairs of consecutive counted tokens, then averaged over sequences. The groups are
`high` (the first prefix of a Matryoshka SAE, T-SAE's high-level features), `low` (the rest)
and `all`; SAEs without prefixes report `all` only.

Predicted vs novel (Temporal SAE, Lubana et al. 2025, 2511.01836 Table 3; readings): with
x̂_p = D z_p / s and x̂_n = D z_n / s the two parts of the reconstruction (b_dec apart),

    norm_share_predicted = Σ‖x̂_p‖² / (Σ‖x̂_p‖² + Σ‖x̂_n‖²)
    variance_ratio_<part> = Σ‖x̂_part − mean x̂_part‖² / Σ‖x − x̄‖²   (the authors' notebook)
    ev_<part> = 1 − Σ‖x − b_dec − x̂_part‖² / Σ‖x − x̄‖²      (the part alone)

over counted tokens. The two differ by what a part holds that does not vary over tokens:
a constant offset counts as variance in neither, but as error in the other part's EV.
Chance: shuffled order leaves the prediction nothing in the past to read but the
sequence's bag of tokens.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import Tensor

from posae.eval.safe import ratio
from posae.losses.temporal import valid_pairs
from posae.sae.base import SAE
from posae.training.batches import Batch

SHUFFLE_SEED = 0


def shuffled_within_sequences(batch: Batch, generator: torch.Generator) -> Batch:
    """The batch with each sequence's tokens in a random order (positions kept in order, so
    a shuffled sequence reads as a sequence; uncounted tokens shuffled along)."""
    order = torch.stack([torch.randperm(batch.x.shape[1], generator=generator)
                         for _ in range(batch.x.shape[0])]).to(batch.x.device)

    def take(t: Tensor) -> Tensor:
        return torch.gather(t, 1, order.view(*order.shape, *[1] * (t.dim() - 2)).expand_as(t))

    return Batch(take(batch.x), batch.pos, take(batch.mask), take(batch.tokens))


def group_bounds(sae: SAE) -> dict[str, tuple[int, int]]:
    """Latent ranges of the groups smoothness reports."""
    width = sae.cfg.d_sae
    prefixes = getattr(sae.cfg, "prefix_widths", None)
    if not prefixes or len(prefixes) < 2:
        return {"all": (0, width)}
    return {"high": (0, prefixes[0]), "low": (prefixes[0], width), "all": (0, width)}


def sequence_smoothness(f: Tensor, x: Tensor, mask: Tensor, pairs: Tensor,
                        bounds: tuple[int, int]) -> list[float]:
    """S of each sequence of [B, T, m] codes that has a pair and an active latent of the
    group (on its counted tokens)."""
    a, b = bounds
    codes = f[..., a:b].float() * mask[..., None]
    step = (x[:, 1:] - x[:, :-1]).float().norm(dim=-1).clamp_min(1e-12)       # [B, T-1]
    change = (codes[:, 1:] - codes[:, :-1]).abs() / step[..., None]            # [B, T-1, m]
    peak = change.masked_fill(~pairs[..., None], 0.0).max(1).values            # [B, m]
    active = (codes != 0).any(1)
    keep = pairs.any(1) & active.any(1)
    return [peak[row][active[row]].mean().item() for row in keep.nonzero().flatten().tolist()]


class SplitSums:
    """Σ over counted tokens of the predicted and novel parts' squares and errors."""

    def __init__(self):
        self.sums = dict.fromkeys(("sq_predicted", "sq_novel", "err_predicted", "err_novel",
                                   "err_total", "tokens"), 0.0)
        self.sum_x, self.sum_sq_x = 0.0, 0.0
        self.sum_part = {"predicted": 0.0, "novel": 0.0}

    def add(self, sae: SAE, x: Tensor, mask: Tensor, out) -> None:
        centred = x - sae.b_dec
        predicted = sae.decode(out.extras["predicted_codes"]) - sae.b_dec
        novel = sae.decode(out.f) - sae.b_dec
        m = mask[..., None].double()
        for key, value in (("sq_predicted", predicted), ("sq_novel", novel),
                           ("err_predicted", centred - predicted),
                           ("err_novel", centred - novel), ("err_total", x - out.x_hat)):
            self.sums[key] += (value.double().pow(2) * m).sum().item()
        self.sums["tokens"] += mask.sum().item()
        for part, value in (("predicted", predicted), ("novel", novel)):
            self.sum_part[part] = self.sum_part[part] + (value.double() * m).sum((0, 1))
        self.sum_x = self.sum_x + (x.double() * m).sum((0, 1))
        self.sum_sq_x += (x.double().pow(2) * m).sum().item()

    def results(self) -> dict:
        s, n = self.sums, self.sums["tokens"]
        total_var = self.sum_sq_x - float((self.sum_x ** 2).sum()) / max(n, 1)
        part_var = {part: s[f"sq_{part}"] - float((total ** 2).sum()) / max(n, 1)
                    for part, total in self.sum_part.items()}
        return {
            "norm_share_predicted": ratio(s["sq_predicted"], s["sq_predicted"] + s["sq_novel"]),
            "variance_ratio_predicted": ratio(part_var["predicted"], total_var),
            "variance_ratio_novel": ratio(part_var["novel"], total_var),
            "ev_predicted_only": 1 - ratio(s["err_predicted"], total_var),
            "ev_novel_only": 1 - ratio(s["err_novel"], total_var),
            "ev_total": 1 - ratio(s["err_total"], total_var),
        }


@torch.no_grad()
def sequence_measurements(sae: SAE, batches: Iterable[Batch]) -> dict:
    """`smoothness` (every SAE) and `predicted_novel` (SAEs whose output carries
    predicted codes), each with the same on shuffled sequences under `chance`."""
    generator = torch.Generator().manual_seed(SHUFFLE_SEED)
    groups = group_bounds(sae)
    per_sequence = {kind: {g: [] for g in groups} for kind in ("value", "chance")}
    splits = {"value": SplitSums(), "chance": SplitSums()}
    has_split = "predicted_codes" in sae.provides
    for batch in batches:
        for kind, seen in (("value", batch), ("chance", shuffled_within_sequences(batch,
                                                                                  generator))):
            out = sae(seen.x, seen.pos, seen.mask)
            pairs = valid_pairs(seen.mask, seen.pos)
            for name, bounds in groups.items():
                per_sequence[kind][name] += sequence_smoothness(out.f, seen.x, seen.mask,
                                                                pairs, bounds)
            if has_split:
                splits[kind].add(sae, seen.x, seen.mask, out)
    smoothness = {"groups": {name: list(bounds) for name, bounds in groups.items()},
                  "sequences": len(per_sequence["value"]["all"])}
    for name in groups:
        value, chance = (float(np.mean(per_sequence[k][name])) if per_sequence[k][name]
                         else None for k in ("value", "chance"))
        smoothness[name] = value
        smoothness[f"{name}_chance"] = chance
    result = {"smoothness": smoothness}
    if has_split:
        chance = splits["chance"].results()
        result["predicted_novel"] = {**splits["value"].results(),
                                     **{f"{k}_chance": v for k, v in chance.items()}}
    return result
