"""Sparse steps: decode and the encoder's weight gradient from the non-zero entries alone
(docs/ARCHITECTURE.md, "Sparse steps").

An SAE's codes f and the gradient of its pre-activations are mostly zeros: at L0 32 of
3072 latents, 1 %. A dense matmul over them costs d·m per token; summing the rows of the
non-zero entries costs d·nnz. `linear_decode` and `CentredAffine`'s backward choose per
call: below `SPARSE_BELOW` non-zero entries they take the sparse path (one
`embedding_bag`), above it the dense matmul. TopK-family SAEs hold their codes as
`SparseCodes` and differentiate them through `SelectedPreActivations`: sparse always.
The results are the same to float rounding (tests/test_sparse.py).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

# products_at builds CSR patterns only to say where to sample a matmul
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")

# Fraction of non-zero entries below which the sparse path is taken; measured on the
# 2-core development CPU (make bench-train): the sparse path wins up to about 10 %.
SPARSE_BELOW = 0.05


def sparse_decode(indices: Tensor, values: Tensor, W_dec: Tensor) -> Tensor:
    """Σ_j values[..., j] * W_dec[indices[..., j]] for [..., k] indices and values."""
    lead, k = indices.shape[:-1], indices.shape[-1]
    n_bags = lead.numel()
    indices, order = indices.sort(-1)
    values = values.gather(-1, order)
    bags = torch.arange(n_bags, device=indices.device).repeat_interleave(k)
    out = bag_sums(bags, indices.reshape(-1), values.reshape(-1), n_bags, W_dec, grouped=True)
    return out.reshape(*lead, W_dec.shape[1])


class TripleSums(torch.autograd.Function):
    """out[b] = Σ values · W[latents] over the (bag, latent, value) triples of bag b, the
    triples sorted by (bag, latent), each pair once (`starts` [n_bags]: where each bag
    begins): one `embedding_bag`. Backward, k · d work per token each: ∂L/∂values are the
    entries of G Wᵀ at the triples alone (`products_at` on the triples' CSR pattern, in
    float32, its lowest precision), and ∂L/∂W sums G's rows into bags by latent
    (`bag_sums` of the transposed triples). Autograd's own backward of embedding_bag adds
    W's gradient row by row, about 3x slower on the development CPU (make bench-train)."""

    @staticmethod
    def forward(ctx, values, W, bags, latents, starts):
        ctx.save_for_backward(values, W, bags, latents, starts)
        return F.embedding_bag(latents, W, starts, mode="sum",
                               per_sample_weights=values.to(W.dtype))

    @staticmethod
    def backward(ctx, G):
        values, W, bags, latents, starts = ctx.saved_tensors
        grad_values = grad_W = None
        if ctx.needs_input_grad[0]:
            rows = torch.cat([starts, starts.new_full((1,), len(latents))])
            acc = torch.promote_types(G.dtype, torch.float32)
            grad_values = products_at(rows, latents, G.to(acc), W.t().to(acc))
            grad_values = grad_values.values().to(values.dtype)
        if ctx.needs_input_grad[1]:
            grad_W = bag_sums(latents, bags, values.to(G.dtype), W.shape[0], G).to(W.dtype)
        return grad_values, grad_W, None, None, None


def products_at(crow: Tensor, cols: Tensor, A: Tensor, B: Tensor) -> Tensor:
    """A @ B at the entries of a CSR pattern alone (row pointers `crow`, columns `cols`
    ascending within each row, as cuSPARSE requires), as a sparse CSR tensor: d work per
    entry (`torch.sparse.sampled_addmm`) instead of the full product's."""
    pattern = torch.sparse_csr_tensor(crow, cols, A.new_zeros(len(cols)),
                                      (A.shape[0], B.shape[1]), check_invariants=False)
    return torch.sparse.sampled_addmm(pattern, A, B, beta=0.0)


def bag_sums(bags: Tensor, latents: Tensor, values: Tensor, n_bags: int, W_dec: Tensor,
             grouped: bool = False) -> Tensor:
    """[n_bags, d]: per bag, Σ values · W_dec[latents] over the (bag, latent, value) triples
    in it (k · d work per token, not a dense decode), differentiable in values and W_dec
    with sparse gradients (`TripleSums`). `grouped`: the triples already come sorted by
    (bag, latent) (codes from `nonzero()`, `SparseCodes`); else they are sorted here."""
    if not grouped:
        order = (bags * W_dec.shape[0] + latents).argsort()
        bags, latents, values = bags[order], latents[order], values[order]
    return TripleSums.apply(values, W_dec, bags, latents, segment_starts(bags, n_bags))


def segment_starts(sorted_ids: Tensor, n: int) -> Tensor:
    """[n]: where each of the ids 0..n-1 begins in `sorted_ids` (ascending); no host sync,
    unlike bincount on a GPU."""
    return torch.searchsorted(sorted_ids, torch.arange(n, device=sorted_ids.device))


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
    rows, cols = chosen.nonzero().unbind(1)  # row-major: grouped by row
    out = bag_sums(rows, cols, flat[rows, cols], flat.shape[0], W_dec, grouped=True)
    return out.to(torch.promote_types(f.dtype, W_dec.dtype)).reshape(*f.shape[:-1], -1)


class SparseGram(torch.autograd.Function):
    """Z Zᵀ for a [n, m] Z of few non-zero entries whose gradient counts only there (codes
    of an SAE whose codes have no gradient where they are 0: `decodes_sparsely`, or
    TopK-family codes): forward and backward cost nnz · n instead of n² · m. The gradient
    is ((G + Gᵀ) Z) at Z's non-zero entries (`products_at`), 0 elsewhere."""

    @staticmethod
    def forward(ctx, Z):
        rows, cols = Z.nonzero().unbind(1)  # row-major, columns ascending in each row
        crow = segment_starts(rows, Z.shape[0] + 1)
        ctx.save_for_backward(Z, crow, cols)
        entries = torch.sparse_csr_tensor(crow, cols, Z[rows, cols], Z.shape,
                                          check_invariants=False)
        return entries @ Z.t().contiguous()

    @staticmethod
    def backward(ctx, G):
        Z, crow, cols = ctx.saved_tensors
        return products_at(crow, cols, (G + G.t()).to(Z.dtype), Z).to_dense()


def gram(Z: Tensor, zero_gradient_at_zeros: bool) -> Tensor:
    """Z Zᵀ; from Z's non-zero entries (`SparseGram`, in float32 outside autocast: the CPU's
    sparse kernels have no bf16) when they are few and its gradient where Z is 0 does not
    matter (`zero_gradient_at_zeros`), else the dense matmul."""
    if zero_gradient_at_zeros and is_sparse(Z):
        with torch.autocast(Z.device.type, enabled=False):
            return SparseGram.apply(Z.float())
    return Z @ Z.t()


def _matmul_dtype(W: Tensor) -> torch.dtype:
    """The precision autocast gives a forward's matmuls, for the backward's."""
    device = W.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else W.dtype


def _encoder_grads(needs: tuple[bool, ...], x: Tensor, b: Tensor, W: Tensor,
                   dtype: torch.dtype, dense: Tensor | None = None,
                   triples: tuple[Tensor, Tensor, Tensor] | None = None):
    """(∂L/∂x, ∂L/∂b, ∂L/∂W, ∂L/∂c) of pre = (x - b) @ W + c, from ∂L/∂pre given either
    `dense` ([tokens, m]) or as (token, latent, value) `triples`, its non-zero entries in
    ascending token order.

    ∂L/∂c = Σ_t g_t and ∂L/∂b = -W ∂L/∂c cost a vector each; from triples ∂L/∂W =
    (x - b)ᵀ g and ∂L/∂x = g Wᵀ are sums over the triples (d · nnz work, not a
    [d, tokens] x [tokens, m] matmul). Matmuls run in `dtype` (autocast's)."""
    n_tokens, m = x[..., 0].numel(), W.shape[1]
    if triples is not None:
        tokens, latents, values = triples
        acc = torch.promote_types(values.dtype, torch.float32)  # a bf16 or fp16 sum drifts
        column_sums = values.new_zeros(m, dtype=acc).index_add_(0, latents, values.to(acc))
    else:
        column_sums = dense.sum(0, dtype=torch.promote_types(dense.dtype, torch.float32))
    grad_b = -(W @ column_sums.to(W.dtype)) if needs[1] else None
    grad_x = grad_W = None
    if needs[0]:
        if triples is not None:
            grad_x = bag_sums(tokens, latents, values, n_tokens, W.t().to(dtype).contiguous(),
                              grouped=True)
        else:
            grad_x = dense.to(dtype) @ W.to(dtype).t()
        grad_x = grad_x.reshape(x.shape)
    if needs[2]:
        centred = (x - b).to(dtype).reshape(n_tokens, -1)  # rounded after the subtraction
        if triples is not None:
            grad_W = bag_sums(latents, tokens, values, m, centred).t()
        else:
            grad_W = centred.t() @ dense.to(dtype)
    return grad_x, grad_b, grad_W, column_sums if needs[3] else None


class CentredAffine(torch.autograd.Function):
    """(x - b) @ W + c, computed as x @ W + (c - b @ W), the bias added inside the matmul
    (`addmm`) outside autocast: the encoder's pre-activations.

    Backward: g = ∂L/∂pre is zero wherever a latent is off and no loss term reads its
    pre-activation, so when its non-zero entries are few the gradients are sums over them
    (`_encoder_grads`). Under autocast the matmuls run in autocast's dtype, as autograd's
    own backward of x @ W would.
    """

    @staticmethod
    def forward(ctx, x, b, W, c):
        ctx.save_for_backward(x, b, W)
        ctx.matmul_dtype = _matmul_dtype(W)
        bias, flat = c - b @ W, x.reshape(-1, x.shape[-1])
        if torch.is_autocast_enabled(x.device.type):
            # the matmul in autocast's dtype, the sum in float32, as autograd's own; addmm
            # would round the sum to the low dtype too
            pre = flat @ W + bias
        else:
            pre = torch.addmm(bias, flat, W)
        return pre.view(*x.shape[:-1], W.shape[1])

    @staticmethod
    def backward(ctx, g):
        x, b, W = ctx.saved_tensors
        flat = g.reshape(-1, g.shape[-1])
        if is_sparse(flat):
            tokens, latents = flat.nonzero().unbind(1)
            return _encoder_grads(ctx.needs_input_grad, x, b, W, ctx.matmul_dtype,
                                  triples=(tokens, latents, flat[tokens, latents]))
        return _encoder_grads(ctx.needs_input_grad, x, b, W, ctx.matmul_dtype, dense=flat)


def centred_affine(x: Tensor, b: Tensor, W: Tensor, c: Tensor) -> Tensor:
    """(x - b) @ W + c with the sparse-aware backward (`CentredAffine`)."""
    return CentredAffine.apply(x, b, W, c)


class SelectedPreActivations(torch.autograd.Function):
    """pre[token, latent] for chosen (token, latent) pairs, differentiable in the encoder's
    x, b, W and c directly: its backward is the sums over the pairs (`_encoder_grads`),
    k · d work per token, with no dense [tokens, m] gradient. `pre` is the forward's
    (x - b) @ W + c, already computed (it is what the pairs were chosen from)."""

    @staticmethod
    def forward(ctx, x, b, W, c, pre, tokens, latents):
        ctx.save_for_backward(x, b, W, tokens, latents)
        ctx.matmul_dtype = _matmul_dtype(W)
        return pre.reshape(-1, pre.shape[-1])[tokens, latents]

    @staticmethod
    def backward(ctx, g):
        x, b, W, tokens, latents = ctx.saved_tensors
        grads = _encoder_grads(ctx.needs_input_grad, x, b, W, ctx.matmul_dtype,
                               triples=(tokens, latents, g))
        return (*grads, None, None, None)


def selected_pre_activations(x: Tensor, b: Tensor, W: Tensor, c: Tensor, pre: Tensor,
                             tokens: Tensor, latents: Tensor) -> Tensor:
    """[pairs]: pre[tokens, latents] (pre flattened to [tokens, m]) with the sparse
    backward of `SelectedPreActivations`; TopK-family codes are these, ReLU'd."""
    return SelectedPreActivations.apply(x, b, W, c, pre.detach(), tokens, latents)


@dataclass
class SparseCodes:
    """Codes [..., m] held as their (token, latent, value) triples, tokens indexing the
    codes flattened to [tokens, m], sorted by (token, latent) (each token's triples one
    bag, its latents ascending): what TopK-family SAEs produce in training. The dense
    tensor is built only when something reads `SAEOutput.f`."""

    tokens: Tensor
    latents: Tensor
    values: Tensor
    shape: torch.Size

    @property
    def n_tokens(self) -> int:
        return self.shape[:-1].numel()

    def to_dense(self) -> Tensor:
        flat = self.values.new_zeros(self.n_tokens, self.shape[-1])
        return flat.index_put((self.tokens, self.latents), self.values).view(self.shape)

    def dense_rows(self, rows: Tensor) -> Tensor:
        """[len(rows), m]: the dense codes of the distinct tokens `rows` alone."""
        where = torch.full((self.n_tokens,), -1, dtype=torch.long, device=rows.device)
        where[rows] = torch.arange(len(rows), device=rows.device)
        at = where[self.tokens]
        keep = at >= 0
        out = self.values.new_zeros(len(rows), self.shape[-1])
        return out.index_put((at[keep], self.latents[keep]), self.values[keep])

    def decode(self, W_dec: Tensor) -> Tensor:
        """codes @ W_dec from the triples (k · d work per token, forward and backward)."""
        out = bag_sums(self.tokens, self.latents, self.values, self.n_tokens, W_dec,
                       grouped=True)
        return out.view(*self.shape[:-1], W_dec.shape[1])
