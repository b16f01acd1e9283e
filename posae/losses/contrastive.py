"""Contrastive terms on codes: 002's position-contrastive variant, and T-SAE's temporal
InfoNCE between adjacent tokens (2511.05541 §3.2). Under data parallelism each process
contrasts the pairs of its own share of the batch.

Position contrast, reading (docs/variants.md): 002 cites SimCLR and aims at codes that
identify position, so the term is a supervised contrastive loss (Khosla et al. 2020) with
the token position as the label: over a sample of counted tokens, with z = f/‖f‖,
    L = -mean_a log( Σ_{p: pos_p = pos_a, p ≠ a} e^{z_a·z_p/τ} / Σ_{b ≠ a} e^{z_a·z_b/τ} ),
anchors without a positive left out. Tokens are sampled without replacement with the
torch generator, so runs stay reproducible.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from posae.losses.base import LossTerm, StepContext
from posae.losses.temporal import valid_pairs
from posae.sae.sparse import gram


def supervised_contrastive(z: Tensor, labels: Tensor, temperature: float,
                           sparse_gradient: bool = False) -> Tensor:
    """The loss above for unit rows z; `sparse_gradient`: z's gradient counts only at its
    non-zero entries, so the similarities may come from those alone (`gram`)."""
    sim = gram(z, sparse_gradient) / temperature
    self_mask = torch.eye(len(z), dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(self_mask, float("-inf"))
    positive = (labels[:, None] == labels[None, :]) & ~self_mask
    has_positive = positive.any(1)
    if not has_positive.any():
        return z.new_zeros(())
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    pos_log = torch.logsumexp(log_prob.masked_fill(~positive, float("-inf")), dim=1)
    return -pos_log[has_positive].mean()


class PositionContrastive(LossTerm):
    def __init__(self, coef: float = 0.1, temperature: float = 0.1, sample: int = 512,
                 warmup_steps: int = 0):
        super().__init__(coef, warmup_steps)
        self.temperature, self.sample = temperature, sample

    def __call__(self, out, batch, ctx: StepContext) -> Tensor:
        counted = batch.mask.flatten().nonzero().squeeze(1)
        if len(counted) > self.sample:  # sampled before gathering: no copy of all codes
            counted = counted[torch.randperm(len(counted), device=counted.device)[: self.sample]]
        f = out.codes_of(counted).float()
        pos = batch.pos.flatten()[counted]
        z = f / f.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        sparse_gradient = out.sparse_codes is not None or ctx.sae.decodes_sparsely
        return supervised_contrastive(z, pos, self.temperature, sparse_gradient)


class AdjacentInfoNCE(LossTerm):
    """T-SAE's temporal contrastive loss (Bhalla et al. 2025, 2511.05541 §3.2):

        S_ij = s(z_t^i, z_{t-1}^j) / τ,
        L = -Σ_i log softmax_j(S)_ii - Σ_j log softmax_i(S)_jj

    over the N pairs (t-1, t) of adjacent counted tokens of one sequence in the batch (the
    pair i is the positive; the other pairs' tokens the negatives), z the high-level codes,
    s the cosine similarity (the paper; `similarity=dot`: the inner product of the released
    code). The paper's printed second term repeats the first; read as the CLIP-style
    transpose, summed. The paper averages over pairs; here the sum is divided by the
    batch's counted tokens, as every term (N is the counted tokens less one per sequence),
    so that micro-batches and processes weigh it as one batch would.

    The high-level codes are the SAE's first Matryoshka prefix (T-SAE's first 20 %), or the
    first `high_level_fraction` of the latents when that is set (any SAE).
    `same_sequence_negatives=false` (default) leaves out of each anchor's negatives the
    pairs of its own sequence (batch row): the paper's batches are 8192 pairs shuffled from
    ~1000 contexts, where a negative almost never shares the anchor's sequence, while
    posae's batches are whole windows. `max_pairs` subsamples pairs (0: all).
    """

    SIMILARITIES = ("cosine", "dot")

    def __init__(self, high_level_fraction: float | None = None, coef: float = 1.0,
                 temperature: float = 1.0, similarity: str = "cosine",
                 same_sequence_negatives: bool = False, max_pairs: int = 0,
                 warmup_steps: int = 0):
        super().__init__(coef, warmup_steps)
        if similarity not in self.SIMILARITIES:
            raise ValueError(f"loss.temporal_infonce.similarity: {similarity!r} is not one of "
                             f"{', '.join(self.SIMILARITIES)}")
        if high_level_fraction is not None and not 0 < high_level_fraction <= 1:
            raise ValueError("loss.temporal_infonce.high_level_fraction: must be in (0, 1] "
                             "or null (the SAE's first Matryoshka prefix)")
        if temperature <= 0:
            raise ValueError("loss.temporal_infonce.temperature: must be positive")
        # without a fraction, the groups are the architecture's (checked at config time)
        self.requires = ("prefix_x_hats",) if high_level_fraction is None else ()
        self.high_level_fraction, self.temperature = high_level_fraction, temperature
        self.similarity, self.same_sequence_negatives = similarity, same_sequence_negatives
        self.max_pairs = max_pairs

    def high_level_width(self, sae) -> int:
        if self.high_level_fraction is None:
            return sae.cfg.prefix_widths[0]
        return round(self.high_level_fraction * sae.cfg.d_sae)

    def __call__(self, out, batch, ctx: StepContext) -> Tensor:
        h = self.high_level_width(ctx.sae)
        rows, t = valid_pairs(batch.mask, batch.pos).nonzero(as_tuple=True)
        if self.max_pairs and len(rows) > self.max_pairs:
            keep = torch.randperm(len(rows), device=rows.device)[: self.max_pairs]
            rows, t = rows[keep], t[keep]
        if not self.same_sequence_negatives and len(rows.unique()) < 2:
            raise ValueError(
                "loss.temporal_infonce: this share of the batch holds pairs of one sequence "
                "only, so no anchor has a negative; give each micro-batch of each process at "
                "least two sequences (raise trainer.batch_tokens, lower trainer.micro_batches) "
                "or set loss.temporal_infonce.same_sequence_negatives=true")
        if len(rows) < 2:
            return out.f.new_zeros((), dtype=torch.float32)
        later, earlier = out.f[rows, t + 1, :h].float(), out.f[rows, t, :h].float()
        if self.similarity == "cosine":
            later, earlier = F.normalize(later, dim=-1), F.normalize(earlier, dim=-1)
        logits = later @ earlier.t() / self.temperature
        if not self.same_sequence_negatives:
            other_pair_same_row = (rows[:, None] == rows[None, :]) & ~torch.eye(
                len(rows), dtype=torch.bool, device=rows.device)
            logits = logits.masked_fill(other_pair_same_row, float("-inf"))
        target = torch.arange(len(rows), device=rows.device)
        total = (F.cross_entropy(logits, target, reduction="sum")
                 + F.cross_entropy(logits.t(), target, reduction="sum"))
        return total / ctx.n_tokens
