"""One pass over held-out sequences, float64 accumulators, for every cache-based metric
(docs/metrics.md, sections `core`, `by_position`, `temporal`): core reconstruction and
sparsity, the same as curves over positions, the feature × position activity table,
adjacent-position stability, and the global/positional split of architectures that have
one.

    MSE = E‖x − x̂‖²,  EV = 1 − E‖x − x̂‖² / (E‖x‖² − ‖E x‖²),  cosine = E cos(x, x̂),
    L2 ratio = E ‖x̂‖/‖x‖,  relative reconstruction bias = E‖x̂‖² / E[x·x̂],
    L0 = E #{i: f_i ≠ 0},  L1 = E Σ|f_i|,  dead = never active,  dense = active on > 10 %,
    Jaccard(t) = |A_t ∩ A_{t+1}| / |A_t ∪ A_{t+1}|,  code cosine(t) = cos(f_t, f_{t+1})
    over pairs of counted, consecutive tokens of one sequence, each beside its chance
    value: the same over shuffled pairs (token t of one sequence with token t + 1 of the
    sequence half a batch of held-out sequences away, at the same positions: never a
    neighbour, which would often continue the same document), and corrected
    (v − v₀)/(1 − v₀).

Per-position EV uses the per-position mean: 1 − SSE_t / Σ_t ‖x − E_t x‖², null at a
position with fewer than MIN_POSITION_TOKENS tokens.

Activity (L0, L1, firing, Jaccard, the feature × position table) is read from the codes an
input produces, `SAEOutput.input_codes` (before an input-independent offset such as the
hierarchical SAE's g ⊙ α_t; the same rule training and its sparsity controller use), and
the offset's mean norm is reported on its own (`core.code_offset_norm`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from posae.data.cache_reader import ActivationCache
from posae.eval.safe import ratio
from posae.losses.temporal import valid_pairs
from posae.sae.base import SAE, SAEOutput
from posae.training.batches import Batch, BatchLoader, whole_sequences

DENSE_ABOVE = 0.1
MIN_POSITION_TOKENS = 20


class HeldOutAccumulator:
    """Sums over counted tokens; `results()` turns them into metrics."""

    def __init__(self, d_in: int, d_sae: int, context_size: int):
        L, f64 = context_size, dict(dtype=torch.float64)
        self.sum_x = torch.zeros(d_in, **f64)
        self.pos_tokens = torch.zeros(L, **f64)
        self.pos_sum_x = torch.zeros(L, d_in, **f64)
        self.pos = {name: torch.zeros(L, **f64) for name in
                    ("sq_x", "sq_err", "l0", "l1", "cos", "l2_ratio", "sq_x_hat", "x_dot_x_hat")}
        self.fires = torch.zeros(L, d_sae, **f64)       # firing counts per position
        self.activation = torch.zeros(L, d_sae, **f64)  # Σ f per position
        self.pairs = torch.zeros(L, **f64)              # pairs (t, t+1), indexed by t
        self.jaccard = torch.zeros(L, **f64)
        self.code_cos = torch.zeros(L, **f64)
        self.chance = torch.zeros(3, **f64)             # shuffled pairs: count, Σ J, Σ cos
        self.split = torch.zeros(2, **f64)              # Σ|f| of the global, positional halves
        self.offset_norm: Tensor | None = None          # Σ ‖input-independent code offset‖

    @torch.no_grad()
    def add(self, batch: Batch, out: SAEOutput) -> None:
        mask, pos, f = batch.mask, batch.pos, out.input_codes
        if f is not out.f:
            offset = (out.f - f)[mask].double().norm(dim=-1).sum()
            self.offset_norm = offset if self.offset_norm is None else self.offset_norm + offset
        x, x_hat, f = batch.x.double(), out.x_hat.double(), f.double()
        flat_pos = pos[mask]
        xs, xh, fs = x[mask], x_hat[mask], f[mask]
        active = fs != 0
        norm_x, norm_xh = xs.norm(dim=-1), xh.norm(dim=-1)
        per_token = {
            "sq_x": norm_x.pow(2), "sq_err": (xs - xh).pow(2).sum(-1),
            "l0": active.sum(-1).double(), "l1": fs.abs().sum(-1),
            "cos": torch.nn.functional.cosine_similarity(xs, xh, dim=-1),
            "l2_ratio": norm_xh / norm_x.clamp_min(1e-12),
            "sq_x_hat": norm_xh.pow(2), "x_dot_x_hat": (xs * xh).sum(-1),
        }
        for name, values in per_token.items():
            self.pos[name].index_add_(0, flat_pos, values)
        self.pos_tokens.index_add_(0, flat_pos, torch.ones_like(norm_x))
        self.pos_sum_x.index_add_(0, flat_pos, xs)
        self.sum_x += xs.sum(0)
        self.fires.index_add_(0, flat_pos, active.double())
        self.activation.index_add_(0, flat_pos, fs)
        self._add_pairs(f, mask, pos)
        if "global_codes" in out.extras:  # activity of the two halves, before any offset
            half = out.extras["global_codes"].shape[-1]
            self.split += torch.stack([fs[:, :half].abs().sum(), fs[:, half:].abs().sum()])

    def _add_pairs(self, f: Tensor, mask: Tensor, pos: Tensor) -> None:
        pairs = valid_pairs(mask, pos)
        t = pos[:, :-1][pairs]
        jaccard, cos = _pair_similarity(f[:, :-1][pairs], f[:, 1:][pairs])
        self.pairs.index_add_(0, t, torch.ones_like(jaccard))
        self.jaccard.index_add_(0, t, jaccard)
        self.code_cos.index_add_(0, t, cos)
        if len(f) < 2:
            return
        # chance: token t of sequence r with token t + 1 of sequence r - B/2, same positions;
        # half a batch apart, not neighbours, which often continue one document
        shift = len(f) // 2
        successor, successor_pairs = f[:, 1:].roll(shift, 0), pairs.roll(shift, 0)
        shuffled = pairs & successor_pairs & (pos[:, :-1] == pos[:, :-1].roll(shift, 0))
        jaccard, cos = _pair_similarity(f[:, :-1][shuffled], successor[shuffled])
        self.chance += torch.stack([torch.ones_like(jaccard).sum(), jaccard.sum(), cos.sum()])

    def results(self) -> dict:
        """Scalars (over all counted tokens), per-position curves, and the arrays behind
        the plots (`_arrays`: firing frequency per latent, per-position tables)."""
        n = self.pos_tokens.sum().item()
        if n == 0:
            raise ValueError("no held-out tokens to evaluate")
        total = {name: v.sum().item() for name, v in self.pos.items()}
        variance = total["sq_x"] / n - (self.sum_x / n).pow(2).sum().item()
        if variance <= 1e-12 * total["sq_x"] / n:  # rounding error of a constant input
            variance = 0.0
        frequency = self.fires.sum(0) / n
        n_pairs = self.pairs.sum().item()
        core = {
            "mse": total["sq_err"] / n,
            "explained_variance": 1 - ratio(total["sq_err"] / n, variance),
            "cosine_similarity": total["cos"] / n,
            "l2_ratio": total["l2_ratio"] / n,
            "relative_reconstruction_bias": ratio(total["sq_x_hat"], total["x_dot_x_hat"]),
            "l0": total["l0"] / n,
            "l1": total["l1"] / n,
            "dead_fraction": (frequency == 0).double().mean().item(),
            "dense_fraction": (frequency > DENSE_ABOVE).double().mean().item(),
            "n_tokens": int(n),
        }
        n_chance = self.chance[0].item()
        temporal = {"n_pairs": int(n_pairs), "n_chance_pairs": int(n_chance)}
        for name, total_pairs, total_chance in (
                ("adjacent_jaccard", self.jaccard.sum().item(), self.chance[1].item()),
                ("adjacent_code_cosine", self.code_cos.sum().item(), self.chance[2].item())):
            value, chance = ratio(total_pairs, n_pairs), ratio(total_chance, n_chance)
            temporal[name] = value
            temporal[f"{name}_chance"] = chance
            temporal[f"{name}_corrected"] = chance_corrected(value, chance)
        if self.offset_norm is not None:
            core["code_offset_norm"] = self.offset_norm.item() / n
        if self.split.sum() > 0:
            temporal["positional_activation_share"] = (self.split[1] / self.split.sum()).item()
        counted = self.pos_tokens > 0
        t = counted.nonzero().squeeze(-1)
        n_t = self.pos_tokens[t]
        pos_var = self.pos["sq_x"][t] - self.pos_sum_x[t].pow(2).sum(-1) / n_t
        pos_var = torch.where(pos_var > 1e-12 * self.pos["sq_x"][t], pos_var, 0.0)
        with np.errstate(invalid="ignore"):
            curves = {
                "position": t.tolist(),
                "n_tokens": n_t.tolist(),
                "mse": (self.pos["sq_err"][t] / n_t).tolist(),
                "explained_variance": torch.where(
                    (n_t >= MIN_POSITION_TOKENS) & (pos_var > 0),
                    1 - self.pos["sq_err"][t] / pos_var.clamp_min(1e-12),
                    torch.full_like(n_t, float("nan"))).tolist(),
                "l0": (self.pos["l0"][t] / n_t).tolist(),
                # NaN (null in metrics.json) where position t has no counted successor
                "adjacent_jaccard": (self.jaccard[t] / self.pairs[t]).tolist(),
                "adjacent_code_cosine": (self.code_cos[t] / self.pairs[t]).tolist(),
            }
        arrays = {
            "frequency": frequency.numpy(),
            "positions": t.numpy(),
            "firing_rate": (self.fires[t] / n_t[:, None]).numpy(),      # [T, d_sae]
            "fire_counts": self.fires[t].round().long().numpy(),         # [T, d_sae] integers
            "position_tokens": n_t.round().long().numpy(),               # [T]
            "mean_activation": (self.activation[t] / n_t[:, None]).numpy(),
        }
        return {"core": core, "temporal": temporal, "by_position": curves, "_arrays": arrays}


def _pair_similarity(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Jaccard of the active sets (two empty sets count as identical: 1) and cosine of the
    codes, for each row of two [pairs, d_sae] code tables."""
    on_a, on_b = a != 0, b != 0
    union = (on_a | on_b).sum(-1).double()
    inter = (on_a & on_b).sum(-1).double()
    jaccard = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))
    return jaccard, torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


def chance_corrected(value: float, chance: float) -> float:
    """(v − v₀)/(1 − v₀): 0 at chance, 1 at identity; NaN where undefined."""
    if not (math.isfinite(value) and math.isfinite(chance)) or chance >= 1:
        return float("nan")
    return (value - chance) / (1 - chance)


@torch.no_grad()
def held_out_pass(sae: SAE, batches: Iterable[Batch], context_size: int) -> dict:
    """Run the SAE over `batches` once and accumulate everything."""
    acc = HeldOutAccumulator(sae.cfg.d_in, sae.cfg.d_sae, context_size)
    for batch in batches:
        acc.add(batch, sae(batch.x, batch.pos, batch.mask))
    return acc.results()


def raw_batches(cache: ActivationCache, ids: np.ndarray, batch_sequences: int,
                train_on_special_tokens: bool, device: torch.device) -> Iterator[Batch]:
    """Whole sequences `ids` of the cache, `batch_sequences` a batch, unscaled (a saved SAE
    has the training input scale folded in: it reads raw activations), counting the tokens
    training counted."""
    loader = BatchLoader(cache, cache.context_size, 1.0, train_on_special_tokens, device)
    return (loader.load(units) for units in whole_sequences(ids, batch_sequences))


@dataclass
class HeldOutPass:
    """A `held_out_pass` result and what decides its numbers: the SAE, the sequences, how
    many a batch (the chance pairs are half a batch apart), the device, and the mixed
    precision the SAE ran under (accelerate's name: "no", "bf16", "fp16"). Training's end
    hands its pass to the evaluation, which runs the saved SAE at full precision."""

    result: dict
    sae: SAE
    sequences: np.ndarray
    batch_sequences: int
    device: torch.device
    mixed_precision: str = "no"

    def same_pass(self, sae: SAE, sequences: np.ndarray, batch_sequences: int,
                  device: torch.device) -> bool:
        """Whether a full-precision pass of `sae` over `sequences`, `batch_sequences` a
        batch on `device`, computes these numbers: the same architecture, settings and
        weights, and the same data in the same batches on the same device."""
        return (self.mixed_precision == "no" and self.batch_sequences == batch_sequences
                and _concrete(self.device) == _concrete(device)
                and np.array_equal(self.sequences, sequences) and _same_weights(self.sae, sae))


def _same_weights(a: SAE, b: SAE) -> bool:
    """One architecture and config, and equal parameters and buffers (on one device)."""
    if type(a) is not type(b) or a.cfg != b.cfg:
        return False
    ours, theirs = a.state_dict(), b.state_dict()
    return ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def _concrete(device: torch.device) -> torch.device:
    """`cuda` as the GPU it means now (`cuda:<current>`); other devices as they are."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device
