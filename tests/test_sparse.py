"""Sparse steps (posae.sae.sparse): the sparse decode and the sparse encoder weight
gradient give what the dense matmuls give, for every architecture, to float rounding."""

from __future__ import annotations

import pytest
import torch
from test_sae import inputs, make

from posae.sae import REGISTRY, sparse
from posae.sae.sparse import centred_affine, linear_decode


def grads_of(name: str, sparse_below: float, monkeypatch) -> dict[str, torch.Tensor]:
    """Every parameter's gradient of MSE + L1 (+ the gated auxiliary) after one forward
    and backward in training mode, with the sparse path always (1.0) or never (0.0), and
    every buffer after it (statistics hooks record from the gradients). Parameters that
    start at zero stay there (the hierarchical routing's output), as in training."""
    monkeypatch.setattr(sparse, "SPARSE_BELOW", sparse_below)
    sae = make(name)
    with torch.no_grad():
        for p in sae.parameters():
            if p.abs().sum() > 0:
                p.add_(0.05 * torch.randn_like(p))
        if hasattr(sae, "b_enc"):
            sae.b_enc.sub_(0.3)  # codes mostly off, as in training at low L0
    sae.train()
    x, pos, mask = inputs()
    out = sae(x, pos, mask)
    loss = (out.x_hat - x).pow(2).sum() + 0.1 * out.f.abs().sum()
    if "aux_x_hat" in out.extras:
        loss = loss + (out.extras["aux_x_hat"] - x).pow(2).sum()
    loss.backward()
    return {**{n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None},
            **{f"buffer {n}": b.clone() for n, b in sae.named_buffers()}}


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_sparse_and_dense_steps_give_the_same_gradients(name, monkeypatch):
    dense = grads_of(name, 0.0, monkeypatch)
    sparse_grads = grads_of(name, 1.0, monkeypatch)
    assert dense.keys() == sparse_grads.keys() and dense
    for key, value in dense.items():
        torch.testing.assert_close(sparse_grads[key], value, rtol=1e-4, atol=1e-5,
                                   msg=f"{name}: {key}")


@pytest.mark.parametrize("density", [0.02, 0.5])
def test_the_encoder_weight_gradient_equals_the_dense_one(density, monkeypatch):
    """A loss that reads a few pre-activations (as TopK's does): ∂/∂W, ∂/∂b, ∂/∂c and ∂/∂x
    from the sparse path, and from the dense one, equal plain autograd's."""
    torch.manual_seed(0)
    x = torch.randn(2, 7, 12, requires_grad=True)
    b, W, c = (torch.randn(12, requires_grad=True), torch.randn(12, 40, requires_grad=True),
               torch.randn(40, requires_grad=True))
    weights = torch.randn(2, 7, 40) * (torch.rand(2, 7, 40) < density)
    reference = torch.autograd.grad(((x - b) @ W + c).mul(weights).sum(), (x, b, W, c))
    for sparse_below in (0.0, 1.0):
        monkeypatch.setattr(sparse, "SPARSE_BELOW", sparse_below)
        got = torch.autograd.grad(centred_affine(x, b, W, c).mul(weights).sum(), (x, b, W, c))
        for ours, theirs in zip(got, reference):
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_under_bf16_autocast_the_encoder_gradient_is_computed_in_bf16_both_ways(monkeypatch):
    """The backward's matmuls run in autocast's dtype, as autograd's own would: the sparse
    and dense paths agree to bf16 rounding."""
    torch.manual_seed(0)
    x = torch.randn(64, 12)
    W = torch.randn(12, 40, requires_grad=True)
    b, c = torch.zeros(12, requires_grad=True), torch.zeros(40, requires_grad=True)
    weights = torch.randn(64, 40) * (torch.rand(64, 40) < 0.03)
    grads = []
    for sparse_below in (0.0, 1.0):
        monkeypatch.setattr(sparse, "SPARSE_BELOW", sparse_below)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pre = centred_affine(x, b, W, c)
        (grad,) = torch.autograd.grad(pre.float().mul(weights).sum(), W)
        grads.append(grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=2e-2, atol=2e-2)
    (exact,) = torch.autograd.grad(((x - b) @ W + c).mul(weights).sum(), W)
    torch.testing.assert_close(grads[1], exact, rtol=5e-2, atol=5e-2)


def test_the_sparse_decode_chooses_by_density_and_equals_the_matmul(monkeypatch):
    torch.manual_seed(0)
    W = torch.randn(50, 8, requires_grad=True)
    f = torch.relu(torch.randn(3, 4, 50) - 2)  # about 2 % non-zero
    assert sparse.is_sparse(f) and not sparse.is_sparse(torch.relu(torch.randn(3, 50)))
    torch.testing.assert_close(linear_decode(f, W), f @ W, rtol=1e-5, atol=1e-5)
    (g_sparse,) = torch.autograd.grad(linear_decode(f, W).sum(), W)
    (g_dense,) = torch.autograd.grad((f @ W).sum(), W)
    torch.testing.assert_close(g_sparse, g_dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("grouped", [True, False])
def test_bag_sums_and_their_gradients_equal_the_dense_products(grouped):
    """Irregular bags, one of them empty, and a latent in no triple: the sums, ∂/∂values
    (the sampled matmul) and ∂/∂W (bags by latent) equal autograd through a dense matrix."""
    torch.manual_seed(0)
    W = torch.randn(6, 4, requires_grad=True)
    bags = torch.tensor([0, 0, 0, 2, 3, 3])  # bag 1 empty
    latents = torch.tensor([4, 1, 0, 4, 2, 1])  # latents 3 and 5 in no triple
    values = torch.randn(6, requires_grad=True)
    if not grouped:
        shuffle = torch.tensor([3, 0, 5, 1, 4, 2])
        bags, latents, values = bags[shuffle], latents[shuffle], values[shuffle]
    dense = torch.zeros(4, 6).index_put((bags, latents), values)
    weights = torch.randn(4, 4)
    got = sparse.bag_sums(bags, latents, values, 4, W, grouped=grouped)
    torch.testing.assert_close(got, dense @ W)
    assert torch.equal(got[1], torch.zeros(4))
    grads = torch.autograd.grad((got * weights).sum(), (values, W))
    exact = torch.autograd.grad(((dense @ W) * weights).sum(), (values, W))
    for a, b in zip(grads, exact):
        torch.testing.assert_close(a, b)
    assert torch.equal(grads[1][[3, 5]], torch.zeros(2, 4))


def sorted_by_token_then_latent(codes) -> bool:
    key = codes.tokens * codes.shape[-1] + codes.latents
    return bool((key.diff() > 0).all())


@pytest.mark.parametrize("name", ["topk", "batchtopk", "matryoshka_batchtopk", "gated",
                                  "position_masked_topk"])
def test_sparse_codes_come_sorted_by_token_then_latent(name, monkeypatch):
    """`SparseCodes` promise (token, latent) order: their decode and the encoder's backward
    read each token's triples as one bag without sorting, and the sampled matmul of the
    decode's backward needs each bag's latents ascending."""
    monkeypatch.setattr(sparse, "SPARSE_BELOW", 1.0)  # gated: sparse codes always
    torch.manual_seed(0)
    sae = make(name).train()
    x, pos, mask = inputs()
    codes = sae(x, pos, mask).sparse_codes
    assert codes is not None and len(codes.tokens) > 1
    assert sorted_by_token_then_latent(codes)


def test_batchtopk_full_search_keeps_the_order_and_the_exact_selection(monkeypatch):
    """One token holding more than its candidates' share of the batch's largest values
    sends the selection to the full search; its result is sorted as the fast path's."""
    torch.manual_seed(0)
    sae = make("batchtopk").train()
    pre = torch.randn(6, sae.cfg.d_sae)
    pre[2] += 10  # token 2 alone holds more than candidates_per_k x k of the top values
    tokens, latents = sae.batch_select(pre, None)
    budget = sae.cfg.k * 6
    expected = torch.relu(pre).flatten().topk(budget).indices.sort().values
    assert torch.equal(tokens * sae.cfg.d_sae + latents, expected)
    assert (tokens == 2).sum() > sae.candidates_per_k * sae.cfg.k


@pytest.mark.parametrize("name", ["topk", "batchtopk", "matryoshka_batchtopk"])
def test_topk_family_sparse_codes_give_the_dense_gradients(name):
    """TopK-family training never builds a dense code or pre-activation gradient; every
    parameter's gradient equals plain autograd's through the dense codes at the same
    selection, for a loss reading x̂, f (built on demand) and pre (as AuxK does)."""
    torch.manual_seed(0)
    sae = make(name).train()
    x, pos, mask = inputs()
    out = sae(x, pos, mask)
    codes = out.sparse_codes
    assert codes is not None
    weights = torch.randn_like(out.pre) * (torch.rand_like(out.pre) < 0.1)

    def loss_of(x_hat, f, pre):
        return (x_hat - x).pow(2).sum() + 0.1 * f.abs().sum() + (pre * weights).sum()

    params = [p for p in sae.parameters()]
    got = torch.autograd.grad(loss_of(out.x_hat, out.f, out.pre), params)
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    flat = pre.reshape(-1, pre.shape[-1])
    dense = torch.zeros_like(flat).index_put((codes.tokens, codes.latents),
                                             torch.relu(flat[codes.tokens, codes.latents]))
    f = dense.view_as(pre)
    expected = torch.autograd.grad(loss_of(f @ sae.W_dec + sae.b_dec, f, pre), params)
    for p, ours, theirs in zip(params, got, expected):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["relu", "topk"])
def test_under_bf16_autocast_the_pre_activations_stay_float32(name):
    """The encoder matmul runs in bf16 and its bias is added in float32, as autograd's
    own x @ W + c would: the codes and every statistic read from them keep float32."""
    sae = make(name).train()
    x, pos, mask = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sae(x, pos, mask)
    assert out.pre.dtype == torch.float32 and out.f.dtype == torch.float32


@pytest.mark.parametrize("name", ["relu", "topk"])
def test_data_parallel_finds_the_outputs_tensors(name):
    """DDP with find_unused_parameters walks the forward's output for tensors (lists,
    dicts and dataclasses only): SAEOutput must stay a dataclass, its sparse codes too,
    or every parameter looks unused and the backward fails."""
    from torch.nn.parallel.distributed import _find_tensors  # what DDP itself calls

    sae = make(name).train()
    out = sae(*inputs())
    found = {id(t) for t in _find_tensors(out)}
    assert id(out.x_hat) in found and id(out.pre) in found
    if out.sparse_codes is not None:
        assert id(out.sparse_codes.values) in found
