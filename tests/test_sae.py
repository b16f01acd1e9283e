"""Architectures, loss terms and saving, on small hand-checkable tensors."""

from __future__ import annotations

import json

import pytest
import torch

from posae.losses.auxk import AuxK
from posae.losses.base import LinearWarmup, StepContext
from posae.losses.reconstruction import MSE
from posae.losses.sparsity import L1
from posae.sae import REGISTRY, build_sae, load_sae, save_sae, sparse
from posae.training.batches import Batch

D_IN, D_SAE = 16, 64


def make(name: str, **extra):
    torch.manual_seed(0)
    cls = REGISTRY[name]
    kwargs = {"topk": {"k": 4}, "batchtopk": {"k": 4}, "matryoshka_batchtopk": {"k": 4},
              "position_masked_topk": {"k": 4},
              "multiscale": {"scales": [1, 4]}}.get(name, {})
    return build_sae(cls.config_class(name=name, d_in=D_IN, width=D_SAE, **{**kwargs, **extra}))


def inputs(b=3, t=5):
    torch.manual_seed(1)
    return torch.randn(b, t, D_IN), torch.arange(t).expand(b, t), torch.ones(b, t, dtype=bool)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_saved_sae_reloads_with_the_same_codes(name, tmp_path):
    sae = make(name)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.01 * torch.randn_like(p))
    sae.eval()
    x, pos, mask = inputs()
    save_sae(sae, tmp_path, {"layer": 3})
    posae = json.loads((tmp_path / "cfg.json").read_text())["metadata"]["posae"]
    assert posae["architecture"] == name and posae["layer"] == 3
    loaded = load_sae(tmp_path)
    assert type(loaded) is type(sae) and loaded.cfg == sae.cfg
    assert torch.equal(loaded.encode(x, pos, mask), sae.encode(x, pos, mask))


@pytest.mark.parametrize("damage, message", [
    ("no config", r"cfg\.json: missing"),
    ("no weights", r"sae_weights\.safetensors: missing"),
    ("garbage config", r"cfg\.json: not JSON"),
    ("no posae config", r"cfg\.json: not a posae SAE config"),
    ("other width", r"sae_weights\.safetensors: does not hold the weights .*cfg\.json"),
    ("garbage weights", r"sae_weights\.safetensors: unreadable"),
])
def test_a_damaged_sae_folder_is_refused_naming_the_file(tmp_path, damage, message):
    from posae.config import ConfigError

    save_sae(make("relu"), tmp_path, {"layer": 3})
    config, weights = tmp_path / "cfg.json", tmp_path / "sae_weights.safetensors"
    if damage == "no config":
        config.unlink()
    elif damage == "no weights":
        weights.unlink()
    elif damage == "garbage config":
        config.write_text("{not json")
    elif damage == "other width":
        record = json.loads(config.read_text())
        record["metadata"]["posae"]["config"]["width"] = 2 * D_SAE
        config.write_text(json.dumps(record))
    elif damage == "no posae config":
        record = json.loads(config.read_text())
        del record["metadata"]["posae"]["config"]
        config.write_text(json.dumps(record))
    else:
        weights.write_bytes(b"not safetensors" * 10)
    with pytest.raises(ConfigError, match=message):
        load_sae(tmp_path)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_folding_the_input_scale_keeps_codes_and_rescales_output(name):
    sae = make(name).eval()
    with torch.no_grad():
        sae.b_dec.normal_()
    x, pos, mask = inputs()
    scale = 3.7
    before = sae(scale * x, pos, mask)
    sae.fold_input_scale_(scale)
    after = sae(x, pos, mask)
    torch.testing.assert_close(after.f, before.f, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(after.x_hat, before.x_hat / scale, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,extra", [(name, {}) for name in sorted(REGISTRY)]
                         + [("pa_sae", {"mask": "none"}), ("pa_sae", {"mask": "fixed"})])
def test_an_architecture_declares_when_a_parameter_gets_no_gradient(name, extra):
    """Data parallelism looks for unused parameters only where the architecture says some
    may be (`leaves_parameters_unused`); one it does not declare would fail there. (The
    curriculum's adapters are idle before its delay.)"""
    sae = make(name, **extra).train()
    x, pos, mask = inputs()
    out = sae(x, pos, mask)
    (out.x_hat - x).pow(2).sum().backward()
    unused = [n for n, p in sae.named_parameters() if p.grad is None]
    # and it declares none needlessly: the search costs time on every step
    assert bool(unused) == sae.leaves_parameters_unused(), unused


@pytest.mark.parametrize("name,extra", [("pa_sae", {}), ("curriculum", {}),
                                        ("position_masked", {"schedule_steps": 10})])
def test_an_sae_with_step_hooks_is_freed_without_the_cycle_collector(name, extra):
    """Its hooks point to it; stored on it they would make a reference cycle, and a process
    loading many SAEs (a report, an evaluation) would hold them until a collection."""
    import gc
    import weakref

    sae = make(name, **extra)
    assert sae.step_hooks()
    ref = weakref.ref(sae)
    gc.disable()
    try:
        del sae
        assert ref() is None
    finally:
        gc.enable()


def test_unit_norm_decoder_rows_and_parallel_gradient_removed():
    sae = make("relu")
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(D_SAE, 1) + 0.5)
    sae.normalize_decoder_()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(D_SAE))
    sae.W_dec.grad = torch.randn_like(sae.W_dec)
    sae.remove_parallel_decoder_grad_()
    assert (sae.W_dec.grad * sae.W_dec).sum(1).abs().max() < 1e-5


def test_topk_keeps_k_per_token_and_decodes_sparsely():
    sae = make("topk")
    x, pos, mask = inputs()
    out = sae(x, pos, mask)
    assert ((out.f != 0).sum(-1) <= 4).all()
    torch.testing.assert_close(out.x_hat, out.f @ sae.W_dec + sae.b_dec, rtol=1e-5, atol=1e-5)
    codes = out.sparse_codes
    assert codes is not None and len(codes.values) == 4 * x[..., 0].numel()
    torch.testing.assert_close(codes.to_dense(), sae.encode(x))


def test_batchtopk_selects_k_times_tokens_over_the_batch_then_thresholds():
    sae = make("batchtopk")
    with torch.no_grad():
        sae.b_enc.fill_(1.0)  # every pre-activation positive: exactly k * tokens selected
    x, pos, mask = inputs()
    mask[0, :2] = False
    out = sae.train()(x, pos, mask)
    assert (out.f != 0).sum() == 4 * int(mask.sum())
    assert (out.f[~mask] == 0).all()
    assert sae.threshold > 0 and sae.threshold_batches == 1
    pre = sae.pre_activations(x)
    assert torch.equal(sae.eval().encode(x), pre * (pre > sae.threshold))


@pytest.mark.parametrize("crowded_token", [False, True])
def test_batchtopk_two_stage_selection_is_the_full_batch_topk(crowded_token):
    sae = make("batchtopk").train()  # k = 4: 16 candidates per token
    x, pos, mask = inputs(4, 8)
    mask[1, 3] = False
    pre = sae.pre_activations(x)
    if crowded_token:  # one token holds 40 of the batch's largest values: the full search
        pre = pre.detach().clone()
        pre[2, 5, :40] = 100 + torch.arange(40.0)
    tokens, latents = sae.batch_select(pre, mask)
    acts = (torch.relu(pre) * mask[..., None]).flatten()
    expected = acts.topk(4 * int(mask.sum())).values
    flat = tokens * D_SAE + latents
    values = acts[flat]
    assert len(set(flat.tolist())) == len(flat) and (expected > 0).all()
    torch.testing.assert_close(values.sort(descending=True).values, expected)
    assert ((values >= 100).sum() == 40) == crowded_token


def test_batchtopk_sparse_decode_equals_the_dense_decoder():
    sae = make("batchtopk").train()
    x, pos, mask = inputs()
    out = sae(x, pos, mask)
    torch.testing.assert_close(out.x_hat, out.f @ sae.W_dec + sae.b_dec)
    params = [sae.W_enc, sae.W_dec, sae.b_enc]
    sparse = torch.autograd.grad(out.x_hat.pow(2).sum(), params, retain_graph=True)
    dense = torch.autograd.grad((out.f @ sae.W_dec + sae.b_dec).pow(2).sum(), params)
    for a, b in zip(sparse, dense):
        torch.testing.assert_close(a, b)


def test_jumprelu_forward_and_threshold_gradient():
    sae = make("jumprelu", initial_threshold=0.5, bandwidth=0.2)
    x, pos, mask = inputs()
    out = sae(x, pos, mask)
    pre = out.pre.detach()
    assert torch.equal(out.f.detach(), pre * (pre > 0.5))
    assert torch.equal(out.extras["l0"].detach(), (pre > 0.5).float().sum(-1))
    out.extras["l0"].sum().backward()
    # ∂L0/∂θ_i = -(1/ε) #{tokens with |pre_i - θ_i| < ε/2}; d θ / d log θ = θ
    near = ((pre - 0.5).abs() < 0.1).float().reshape(-1, D_SAE).sum(0)
    torch.testing.assert_close(sae.log_threshold.grad, -near / 0.2 * 0.5)


@pytest.mark.parametrize("sparse_below", [0.0, 1.0])  # dense codes; SparseCodes
def test_gated_codes_are_gate_times_magnitude(sparse_below, monkeypatch):
    monkeypatch.setattr(sparse, "SPARSE_BELOW", sparse_below)
    sae = make("gated")
    with torch.no_grad():
        sae.r_mag.normal_()
        sae.b_mag.normal_()
    x, pos, mask = inputs()
    out = sae(x, pos, mask)
    # π_mag as the paper writes it: its own matmul with exp(r_mag) ⊙ W_gate
    pi_mag = (x - sae.b_dec) @ (sae.W_enc * sae.r_mag.exp()) + sae.b_mag
    assert (out.sparse_codes is not None) == (sparse_below > 0)
    torch.testing.assert_close(out.f, (out.pre > 0) * torch.relu(pi_mag))
    torch.testing.assert_close(out.extras["l1_codes"], torch.relu(out.pre))


def context(sae, n_tokens, dead=None):
    dead = torch.zeros(sae.cfg.d_sae, dtype=bool) if dead is None else dead
    return StepContext(step=0, n_tokens=n_tokens, sae=sae, dead=dead)


def test_mse_and_l1_are_means_over_counted_tokens():
    sae = make("relu")
    x, pos, mask = inputs(1, 3)
    mask[0, 2] = False
    out = sae(x, pos, mask)
    batch = Batch(x, pos, mask, torch.zeros(1, 3, dtype=torch.long))
    mse = MSE()(out, batch, context(sae, 2.0))
    expected = ((out.x_hat - x)[0, :2] ** 2).sum() / 2
    torch.testing.assert_close(mse, expected)
    torch.testing.assert_close(L1()(out, batch, context(sae, 2.0)), out.f[0, :2].abs().sum() / 2)


def test_auxk_is_zero_without_dead_latents_and_uses_only_dead_ones():
    sae = make("topk")
    x, pos, mask = inputs()
    out = sae(x, pos, mask)
    batch = Batch(x, pos, mask, torch.zeros(3, 5, dtype=torch.long))
    assert AuxK(k_aux=8)(out, batch, context(sae, 15.0)) == 0
    dead = torch.zeros(D_SAE, dtype=bool)
    dead[:10] = True
    loss = AuxK(k_aux=8)(out, batch, context(sae, 15.0, dead))
    loss.backward()
    assert loss > 0 and sae.W_dec.grad[10:].abs().sum() == 0 and sae.W_dec.grad[:10].abs().sum() > 0


def test_linear_warmup_coefficient():
    coef = LinearWarmup(0.04, 100)
    assert coef(0) == 0 and coef(50) == pytest.approx(0.02) and coef(100) == coef(500) == 0.04
