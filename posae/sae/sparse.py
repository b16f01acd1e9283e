"""Sparse steps: decode and the encoder's weight gradient from the non-zero entries alone
(docs/ARCHITECTURE.md, "Sparse steps").

An SAE's codes f and the gradient of its pre-activations are mostly zeros: at L0 32 of
3072 latents, 1 %. A dense matmul over them costs d·m per token; summing the rows of the
non-zero entries costs d·nnz. Both functions below choose per call: below `SPARSE_BELOW`
non-zero entries they take the sparse path (one `embedding_bag`), above it the dense
matmul. The results are the same to float rounding (tests/test_sparse.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Fraction of non-zero entries below which the sparse path is taken; measured on the
# 2-core development CPU (make bench-train): the sparse path wins up to about 10 %.
SPARSE_BELOW = 0.05


def sparse_decode(indices: Tensor, values: Tensor, W_dec: Tensor) -> Tensor:
    """Σ_j values[..., j] * W_dec[indices[..., j]] for [..., k] indices and values."""
    lead = indices.shape[:-1]
    out = F.embedding_bag(indices.reshape(-1, indices.shape[-1]), W_dec,
                          per_sample_weights=values.reshape(-1, values.shape[-1]).to(W_dec.dtype),
                          mode="sum")
    return out.reshape(*lead, W_dec.shape[1])


def bag_sums(bags: Tensor, latents: Tensor, values: Tensor, n_bags: int, W_dec: Tensor) -> Tensor:
    """[n_bags, d]: per bag, Σ values · W_dec[latents] over the (bag, latent, value) triples
    in it, one `embedding_bag` (k · d work per token, not a dense decode)."""
    order = (bags * W_dec.shape[0] + latents).argsort()  # each bag's triples contiguous
    counts = torch.bincount(bags, minlength=n_bags)
    return F.embedding_bag(latents[order], W_dec, counts.cumsum(0) - counts, mode="sum",
                           per_sample_weights=values[order].to(W_dec.dtype))


def is_sparse(t: Tensor) -> bool:
    return int(torch.count_nonzero(t)) <= SPARSE_BELOW * t.numel()


def linear_decode(f: Tensor, W_dec: Tensor, support: Tensor | None = None) -> Tensor:
    """f @ W_dec, from the entries in `support` when they are few: by default f's non-zero
    ones, enough wherever ∂f/∂θ vanishes at f = 0 (ReLU, gates); JumpReLU's straight-
    through estimator also reads ∂L/∂f at the zeros near its threshold, which it adds."""
    flat = f.reshape(-1, f.shape[-1])
    chosen = flat if support is None else support.reshape(flat.shape)
    if not is_sparse(chosen):
        return f @ W_dec
    rows, cols = chosen.nonzero().unbind(1)
    out = bag_sums(rows, cols, flat[rows, cols], flat.shape[0], W_dec)
    return out.to(torch.promote_types(f.dtype, W_dec.dtype)).reshape(*f.shape[:-1], -1)


class CentredAffine(torch.autograd.Function):
    """(x - b) @ W + c, computed as x @ W + (c - b @ W): the encoder's pre-activations.

    Backward: g = ∂L/∂pre is zero wherever a latent is off and no loss term reads its
    pre-activation, so ∂L/∂W = (x - b)ᵀ g is summed over g's non-zero entries when they are
    few (d·nnz work, not a [d, tokens] x [tokens, m] matmul); ∂L/∂c = Σ_t g_t and
    ∂L/∂b = -W Σ_t g_t cost a vector each. Under autocast the matmuls run in autocast's
    dtype, as autograd's own backward of x @ W would.
    """

    @staticmethod
    def forward(ctx, x, b, W, c):
        ctx.save_for_backward(x, b, W)
        device = x.device.type
        # the backward's matmuls run in the precision autocast gave the forward's
        ctx.matmul_dtype = (torch.get_autocast_dtype(device)
                            if torch.is_autocast_enabled(device) else W.dtype)
        return x @ W + (c - b @ W)

    @staticmethod
    def backward(ctx, g):
        x, b, W = ctx.saved_tensors
        flat = g.reshape(-1, g.shape[-1])
        column_sums = flat.sum(0)
        grad_b = -(W @ column_sums.to(W.dtype)) if ctx.needs_input_grad[1] else None
        dtype = ctx.matmul_dtype
        flat, W_ = flat.to(dtype), W.to(dtype)
        grad_x = (flat @ W_.t()).reshape(x.shape) if ctx.needs_input_grad[0] else None
        grad_W = None
        if ctx.needs_input_grad[2]:
            centred = (x.to(dtype) - b.to(dtype)).reshape(-1, x.shape[-1])
            if is_sparse(flat):
                tokens, latents = flat.nonzero().unbind(1)
                grad_W = bag_sums(latents, tokens, flat[tokens, latents], flat.shape[1],
                                  centred).t()
            else:
                grad_W = centred.t() @ flat
        return grad_x, grad_b, grad_W, column_sums if ctx.needs_input_grad[3] else None


def centred_affine(x: Tensor, b: Tensor, W: Tensor, c: Tensor) -> Tensor:
    """(x - b) @ W + c with the sparse-aware backward (`CentredAffine`)."""
    return CentredAffine.apply(x, b, W, c)
