"""The papers' position and time mechanisms pinned to their equations on hand-computable tensors."""

from __future__ import annotations

import math

import pytest
import torch

from posae.losses.base import StepContext
from posae.losses.controllers import AdaptiveL1, MomentumFromReconstruction
from posae.losses.reconstruction import PositionWeightedMSE
from posae.losses.temporal import AdjacentDifference, WindowConsistency
from posae.sae.base import SAEOutput
from posae.training.batches import Batch
from posae.training.hooks import StepEnd
from posae.training.schedule import Ramp


def end_step(sae, step: int) -> None:
    """What the trainer does for the SAE's own state when step `step` ends (one process)."""
    for hook in sae.step_hooks():
        hook.on_step_end(StepEnd(step, {}, None, 0, None, None), lambda tensor, op: tensor)


def start_step(sae, n_tokens: float) -> None:
    """What the trainer does before a forward whose loss is a mean over n_tokens tokens."""
    for hook in sae.step_hooks():
        hook.on_step_start(StepContext(0, n_tokens, sae, torch.zeros(0, dtype=bool)))


def codes_batch(f, mask=None, pos=None):
    b, t, _ = f.shape
    mask = torch.ones(b, t, dtype=bool) if mask is None else mask
    pos = torch.arange(t).expand(b, t) if pos is None else pos
    x = torch.zeros(b, t, 2)
    out = SAEOutput(x_hat=x.clone(), f=f, pre=f)
    return out, Batch(x, pos, mask, torch.zeros(b, t, dtype=torch.long))


def ctx(n_tokens):
    return StepContext(step=0, n_tokens=n_tokens, sae=None, dead=None)


# one sequence of 4 tokens, 2 features; adjacent squared differences: 1, 4+1=5, 9
F = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [3.0, 1.0], [0.0, 1.0]]])


def test_adjacent_difference_equals_the_hand_sum():
    out, batch = codes_batch(F)
    assert AdjacentDifference()(out, batch, ctx(4.0)).item() == pytest.approx((1 + 5 + 9) / 4)


def test_adjacent_difference_ignores_masked_tokens_and_non_consecutive_positions():
    mask = torch.tensor([[True, True, False, True]])  # token 2 is padding/special
    out, batch = codes_batch(F, mask=mask)
    assert AdjacentDifference()(out, batch, ctx(3.0)).item() == pytest.approx(1 / 3)
    # two windows glued in one row: positions 0,1 | 7,8 -- the (1, 7) pair is not adjacent
    pos = torch.tensor([[0, 1, 7, 8]])
    out, batch = codes_batch(F, pos=pos)
    assert AdjacentDifference()(out, batch, ctx(4.0)).item() == pytest.approx((1 + 9) / 4)


def test_adjacent_difference_never_pairs_two_sequences():
    f = torch.stack([F[0], F[0] + 100.0])  # two sequences of the batch
    out, batch = codes_batch(f)
    assert AdjacentDifference()(out, batch, ctx(8.0)).item() == pytest.approx(2 * 15 / 8)


def test_window_consistency_adjacent_form_equals_the_hand_sum():
    out, batch = codes_batch(F)
    # T = 3: windows [0..2] pairs (1, 5) and [1..3] pairs (5, 9), each divided by T - 1 = 2
    expected = ((1 + 5) / 2 + (5 + 9) / 2) / 4
    term = WindowConsistency(window=3, form="adjacent")
    assert term(out, batch, ctx(4.0)).item() == pytest.approx(expected)
    mask = torch.tensor([[True, True, True, False]])
    out, batch = codes_batch(F, mask=mask)
    assert term(out, batch, ctx(3.0)).item() == pytest.approx(3 / 3)
    assert WindowConsistency(window=5, form="adjacent")(out, batch, ctx(3.0)).item() == 0


def test_window_consistency_window_mean_form_equals_the_hand_sum():
    out, batch = codes_batch(F)
    # T = 3, windows ending at t = 2 and t = 3: z_2 - (4/3, 1/3) = (5/3, 2/3) -> 29/9;
    # z_3 - (4/3, 2/3) = (-4/3, 1/3) -> 17/9; over 4 counted tokens
    term = WindowConsistency(window=3)
    assert term.form == "window_mean"
    assert term(out, batch, ctx(4.0)).item() == pytest.approx((29 / 9 + 17 / 9) / 4)
    mask = torch.tensor([[True, True, False, True]])  # no complete window of 3 remains
    out, batch = codes_batch(F, mask=mask)
    assert term(out, batch, ctx(3.0)).item() == 0


def test_window_size_matters_in_the_window_mean_form_only():
    """003's T = 5 vs 3 ablation: the adjacent form is nearly the adjacent-pair loss for any
    T (003 issue: ratio 0.99), the window-mean form is not."""
    torch.manual_seed(0)
    on = torch.rand(8, 128, 64) < 0.1  # codes that switch on and off independently
    out, batch = codes_batch(on.float() * torch.rand(8, 128, 64))
    def loss(window, form):
        return WindowConsistency(window=window, form=form)(out, batch, ctx(8 * 128.0)).item()
    assert loss(5, "adjacent") / loss(3, "adjacent") == pytest.approx(1, abs=0.03)
    assert loss(5, "window_mean") / loss(3, "window_mean") > 1.15


def test_position_weights_run_from_one_to_two_minus_one_over_l():
    L = 8
    term = PositionWeightedMSE(context_size=L)
    x_hat = torch.ones(1, L, 1)
    out = SAEOutput(x_hat=x_hat, f=x_hat, pre=x_hat)
    batch = Batch(torch.zeros(1, L, 1), torch.arange(L)[None], torch.ones(1, L, dtype=bool),
                  torch.zeros(1, L, dtype=torch.long))
    weights = term.per_token(out, batch, ctx(L))[0]
    assert weights[0].item() == 1.0 and weights[-1].item() == pytest.approx(2 - 1 / L)
    assert torch.allclose(weights, 1 + torch.arange(L) / L)


def test_curriculum_coefficient_is_zero_before_warmup_and_one_after_the_ramp():
    ramp = Ramp(1.0, delay=1000, length=9000)
    assert ramp(0) == ramp(1000) == 0.0
    assert ramp(5500) == pytest.approx(0.5)
    assert ramp(10_000) == ramp(50_000) == 1.0


def test_adaptive_l1_rises_above_target_and_falls_below():
    coef = AdaptiveL1(value=0.04, eta=0.002, target_l0=320)
    coef.update({"l0": 820})
    high = coef(1)
    assert high == pytest.approx(0.04 * math.exp(1.0))
    coef.update({"l0": 20})
    assert coef(2) == pytest.approx(0.04 * math.exp(-0.6)) and coef(2) < 0.04 < high
    coef.update({"l0": 1e9})
    assert math.isfinite(coef(3))
    restored = AdaptiveL1(value=0.04)
    restored.load_state_dict(coef.state_dict())
    assert restored(0) == coef(0)


def test_momentum_strength_follows_reconstruction_quality():
    alpha = MomentumFromReconstruction(value=0.002, momentum=0.95)
    for _ in range(200):
        alpha.update({"fvu": 0.25})
    assert alpha(0) == pytest.approx(0.002 * 0.75, rel=1e-3)
    alpha.update({"fvu": 2.0})  # worse than the mean: quality 0, α decays
    assert alpha(0) == pytest.approx(0.95 * 0.002 * 0.75, rel=1e-3)


def pa_sae(**kwargs):
    from posae.sae import REGISTRY, build_sae

    torch.manual_seed(0)
    cfg = REGISTRY["pa_sae"].config_class(name="pa_sae", d_in=8, width=16, context_size=6,
                                          **kwargs)
    return build_sae(cfg)


def test_pa_sae_mask_scales_exactly_one_feature_at_one_position():
    sae = pa_sae(adaptive_rates=False)
    with torch.no_grad():
        sae.mask_logits.fill_(float("inf"))
        sae.mask_logits[3, 5] = 0.0  # sigmoid = 1/2 for feature 5 at position 3 only
    x, pos = torch.randn(2, 6, 8), torch.arange(6).expand(2, 6)
    f = sae.encode(x, pos)
    plain = torch.relu(sae.pre_activations(x))
    expected = plain.clone()
    expected[:, 3, 5] = plain[:, 3, 5] / 2
    torch.testing.assert_close(f, expected)


def test_pa_sae_hard_mask_is_binary_with_a_straight_through_gradient():
    sae = pa_sae(mask="hard", adaptive_rates=False)
    with torch.no_grad():
        sae.mask_logits[2] = -1.0  # closed at position 2
    x, pos = torch.randn(2, 6, 8), torch.arange(6).expand(2, 6)
    out = sae(x, pos)
    assert (out.f[:, 2] == 0).all()
    torch.testing.assert_close(out.f[:, 0], torch.relu(out.pre[:, 0]))
    out.f.sum().backward()
    assert sae.mask_logits.grad[0].abs().sum() > 0


def test_pa_sae_rates_follow_eq4_and_importance_ema_eq6():
    sae = pa_sae(rate_gamma=0.5, importance_beta=0.9)
    with torch.no_grad():
        sae.grad_sum[0], sae.grad_sum[1] = 3.0, 1.0  # mean |grad| 3 at pos 0, 1 at pos 1
        sae.grad_count[:2] = 1.0
    end_step(sae, 1)
    # mean over the seen positions is 2: α0 = 0.01 (1 + 0.5 (3 - 2)), α1 = 0.01 (1 - 0.5)
    torch.testing.assert_close(sae.rates[0], torch.full((16,), 0.015))
    torch.testing.assert_close(sae.rates[1], torch.full((16,), 0.005))
    assert (sae.rates[2:] == 0.01).all()
    torch.testing.assert_close(sae.importance_ema[0], torch.full((16,), 0.3))
    assert sae.grad_count.sum() == 0
    with torch.no_grad():
        sae.grad_sum[0], sae.grad_count[:2] = 1000.0, 1.0
    end_step(sae, 2)
    assert sae.rates.max() <= 0.1 and sae.rates.min() >= 0.001


def test_pa_sae_records_code_gradients_per_position():
    sae = pa_sae().train()
    x, pos = torch.randn(2, 6, 8), torch.arange(6).expand(2, 6)
    mask = torch.ones(2, 6, dtype=bool)
    mask[:, 4] = False
    out = sae(x, pos, mask)
    (out.f * torch.arange(6).float()[None, :, None]).sum().backward()  # dL/df = position
    assert sae.grad_count.tolist() == [2, 2, 2, 2, 0, 2]
    assert sae.grad_sum[3].tolist() == [6.0] * 16 and sae.grad_sum[4].abs().sum() == 0


def test_curriculum_adapters_are_off_before_the_delay_and_routed_by_position_range():
    from posae.sae import REGISTRY, build_sae

    torch.manual_seed(0)
    cfg = REGISTRY["curriculum"].config_class(name="curriculum", d_in=8, width=16,
                                              context_size=8, curriculum_delay=10,
                                              curriculum_length=10, adapter_dropout=0.0)
    sae = build_sae(cfg)
    x, pos = torch.randn(1, 8, 8), torch.arange(8)[None]
    end_step(sae, 5)
    out = sae(x, pos)
    torch.testing.assert_close(out.f, out.extras["l1_codes"])
    assert sae.position_range(pos).tolist() == [[0, 0, 1, 1, 2, 2, 3, 3]]
    end_step(sae, 20)
    out = sae(x, pos)
    h_b = out.extras["l1_codes"]
    expected = h_b[0, 6] + sae.adapters[3](h_b[0, 6])
    torch.testing.assert_close(out.f[0, 6], expected)
    assert out.extras["curriculum"] == 1.0


def test_schedules_move_the_buffers_of_a_moved_module():
    """Moving a module (to a GPU, to another dtype) replaces its buffers: the step hook must
    move the module's current buffer, not the one it was built with."""
    sae = build("curriculum", context_size=8, curriculum_delay=0, curriculum_length=10)
    sae.double()
    end_step(sae, 5)
    assert sae.curriculum.item() == 0.5


def test_tc_sae_initialisation_is_kaiming_uniform_encoder_and_orthogonal_decoder():
    from posae.sae import REGISTRY, build_sae

    cfg = REGISTRY["relu"].config_class(name="tc_sae", architecture="relu", d_in=8, width=32,
                                        encoder_init="kaiming_uniform", decoder_init="orthogonal")
    sae = build_sae(cfg)
    torch.testing.assert_close(sae.W_dec.t() @ sae.W_dec, torch.eye(8), atol=1e-5, rtol=0)
    assert sae.W_enc.abs().max() <= 1 / math.sqrt(8) + 1e-6


def build(name, **kwargs):
    from posae.sae import REGISTRY, build_sae

    torch.manual_seed(0)
    return build_sae(REGISTRY[name].config_class(name=name, d_in=8, width=16, **kwargs))


def test_hierarchical_global_half_ignores_position_and_positional_half_does_not():
    sae = build("hierarchical", context_size=8, heads=2, head_dim=4)
    with torch.no_grad():
        sae.position_embedding.normal_()
        sae.output.weight.normal_()
        sae.gate_logits.normal_()
    x = torch.randn(1, 1, 8).expand(1, 8, 8)  # the same vector at every position
    f = sae.encode(x, torch.arange(8)[None])
    global_half, positional_half = f[0, :, :8], f[0, :, 8:]
    assert torch.equal(global_half, global_half[:1].expand(8, -1))
    assert not torch.allclose(positional_half, positional_half[:1].expand(8, -1))


def test_hierarchical_codes_follow_eq_2_to_5_as_written():
    sae = build("hierarchical", context_size=8, heads=2, head_dim=4)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x, pos = torch.randn(2, 8, 8), torch.arange(8).expand(2, 8)
    half, centred = 8, x - sae.b_dec
    W_g, W_p = sae.W_enc[:, :half], sae.W_enc[:, half:]
    b_g, b_p = sae.b_enc[:half], sae.b_enc[half:]
    f_g = torch.relu(centred @ W_g + b_g)                                   # eq. 2
    f_p = torch.relu((centred + sae.position_embedding[pos]) @ W_p + b_p)  # eq. 3
    gate = torch.sigmoid(sae.gate_logits[pos])                              # eq. 4
    expected = torch.cat([f_g, gate * (f_p + sae.routing()[pos])], -1)      # eq. 5
    torch.testing.assert_close(sae.encode(x, pos), expected)


@pytest.mark.parametrize("penalise_offset", [True, False])
def test_hierarchical_l1_reads_the_offset_unless_told_not_to(penalise_offset):
    from posae.losses.sparsity import L1

    sae = build("hierarchical", context_size=8, heads=2, head_dim=4,
                penalise_offset=penalise_offset)
    with torch.no_grad():
        sae.output.weight.normal_()  # a non-zero routing offset
    x, pos = torch.randn(2, 8, 8), torch.arange(8).expand(2, 8)
    out = sae(x, pos)
    assert not torch.equal(out.f, out.input_codes)
    penalised = out.f if penalise_offset else out.input_codes
    batch = Batch(x, pos, torch.ones(2, 8, dtype=torch.bool), torch.zeros(2, 8, dtype=torch.long))
    torch.testing.assert_close(L1().per_token(out, batch, None), penalised.abs().sum(-1))


def test_hard_position_mask_opens_each_latent_group_on_its_quarter_only():
    sae = build("position_masked", context_size=8, mask="hard", n_ranges=4)
    # 16 latents in 4 groups of 4; positions 0-1 → group 0, 2-3 → group 1, ...
    expected = torch.zeros(8, 16)
    for t in range(8):
        expected[t, (t // 2) * 4 : (t // 2) * 4 + 4] = 1
    assert torch.equal(sae.mask, expected)
    x, pos = torch.randn(1, 8, 8), torch.arange(8)[None]
    f = sae.encode(x, pos)
    assert torch.equal(f, torch.relu(sae.pre_activations(x)) * expected)


def test_gaussian_mask_and_progressive_schedule():
    sae = build("position_masked", context_size=8, mask="gaussian", schedule_steps=10)
    centre = (torch.arange(16) + 0.5) * 8 / 16
    torch.testing.assert_close(sae.mask[3], torch.exp(-((3 - centre) ** 2) / (2 * 1.0 ** 2)))
    pos = torch.arange(8)[None]
    end_step(sae, 0)
    assert torch.equal(sae.effective_mask(pos), torch.ones(1, 8, 16))
    end_step(sae, 5)
    torch.testing.assert_close(sae.effective_mask(pos)[0], 1 - 0.5 * (1 - sae.mask))
    end_step(sae, 50)
    torch.testing.assert_close(sae.effective_mask(pos)[0], sae.mask)


def test_gaussian_mask_cutoff_closes_latents_beyond_it_and_keeps_the_gaussian_inside():
    exact = build("position_masked", context_size=8, mask="gaussian")
    cut = build("position_masked", context_size=8, mask="gaussian", cutoff=1.5)
    distance = (torch.arange(8.0)[:, None] - (torch.arange(16) + 0.5) * 8 / 16).abs()
    assert bool((exact.mask > 0).all())  # the exact Gaussian opens every latent everywhere
    assert torch.equal(cut.mask == 0, distance > 1.5)  # σ = L/8 = 1
    torch.testing.assert_close(cut.mask[distance <= 1.5], exact.mask[distance <= 1.5])


def test_topk_hard_masks_select_each_tokens_k_largest_among_its_ranges_latents():
    sae = build("position_masked_topk", context_size=8, mask="hard", n_ranges=4, k=2)
    with torch.no_grad():
        sae.b_enc.normal_()
    x, pos = torch.randn(3, 8, 8), torch.arange(8).expand(3, 8)
    pre = sae.pre_activations(x)
    open_pre = pre.masked_fill(sae.mask[pos] == 0, float("-inf"))
    chosen = open_pre.topk(2, dim=-1).indices
    expected = torch.zeros_like(pre).scatter(-1, chosen, torch.relu(pre.gather(-1, chosen)))
    out = sae(x, pos)
    torch.testing.assert_close(out.f, expected)
    assert bool((out.f[sae.mask[pos] == 0] == 0).all())
    assert bool(((out.f != 0).sum(-1) <= 2).all())
    # the encoder's gradient reaches the selected open latents only
    out.x_hat.pow(2).sum().backward()
    assert bool((sae.b_enc.grad[(sae.mask[pos] * (expected != 0)).sum((0, 1)) == 0] == 0).all())


def test_range_encoders_use_the_encoder_of_each_tokens_range():
    sae = build("range_encoders", context_size=8, n_ranges=4)
    with torch.no_grad():
        sae.W_enc.normal_()
    x, pos = torch.randn(1, 8, 8), torch.arange(8)[None]
    pre = sae.pre_activations(x, pos)
    torch.testing.assert_close(pre[0, 5], (x[0, 5] - sae.b_dec) @ sae.W_enc[2] + sae.b_enc[2])


def test_supervised_contrastive_prefers_codes_that_identify_position():
    from posae.losses.contrastive import supervised_contrastive

    labels = torch.tensor([0, 0, 1, 1])
    aligned = torch.nn.functional.normalize(torch.tensor(
        [[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]]), dim=-1)
    crossed = aligned[[0, 2, 1, 3]]
    assert supervised_contrastive(aligned, labels, 0.1) < supervised_contrastive(crossed,
                                                                                labels, 0.1)
    # two anchors per label, each with one positive among three others: hand value
    z = torch.eye(4)[:, :4]
    expected = -math.log(1 / 3)
    assert supervised_contrastive(z, labels, 1.0).item() == pytest.approx(expected)


def test_position_contrastive_reads_counted_tokens_and_samples_without_replacement():
    from posae.losses.contrastive import PositionContrastive, supervised_contrastive

    torch.manual_seed(0)
    f = torch.relu(torch.randn(2, 6, 5))
    pos = torch.arange(6).repeat(2, 1)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    batch = Batch(f, pos, mask, torch.zeros(2, 6, dtype=torch.long))
    out = SAEOutput(x_hat=f, f=f, pre=f)
    ctx = StepContext(step=0, n_tokens=10, sae=build("relu"), dead=torch.zeros(16, dtype=bool))
    z = torch.nn.functional.normalize(f[mask], dim=-1)
    whole = PositionContrastive(sample=100)(out, batch, ctx)
    assert whole.item() == pytest.approx(supervised_contrastive(z, pos[mask], 0.1).item())
    torch.manual_seed(1)
    sampled = PositionContrastive(sample=4)(out, batch, ctx)
    torch.manual_seed(1)
    keep = torch.randperm(10)[:4]  # the same draw, over the 10 counted tokens
    expected = supervised_contrastive(z[keep], pos[mask][keep], 0.1)
    assert sampled.item() == pytest.approx(expected.item())


def test_contrastive_similarities_from_the_codes_support_give_the_dense_gradient():
    """On ReLU codes (no gradient where a code is 0) the sparse Gram's loss and encoder
    gradient equal the dense matmul's; on TopK codes the codes of the sampled tokens come
    from the triples without the dense f."""
    from posae.losses.contrastive import PositionContrastive, supervised_contrastive
    from posae.sae import sparse

    torch.manual_seed(0)
    x, labels = torch.randn(40, 8), torch.arange(40) % 5
    W = torch.randn(8, 64, requires_grad=True)
    z = torch.nn.functional.normalize(torch.relu(x @ W - 5), dim=-1)  # about 4 % non-zero
    assert sparse.is_sparse(z)
    losses = [supervised_contrastive(z, labels, 0.1, sparse_gradient=s) for s in (True, False)]
    torch.testing.assert_close(losses[0], losses[1])
    grads = [torch.autograd.grad(loss, W, retain_graph=True)[0] for loss in losses]
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the CPU's sparse kernels lack bf16
        in_bf16 = supervised_contrastive(z, labels, 0.1, sparse_gradient=True)
    torch.testing.assert_close(in_bf16, losses[0])
    from posae.sae import REGISTRY, build_sae

    sae = build_sae(REGISTRY["topk"].config_class(name="topk", d_in=8, width=64, k=1)).train()
    xs, pos = torch.randn(2, 8, 8), torch.arange(8).repeat(2, 1)
    mask = torch.ones(2, 8, dtype=torch.bool)
    out = sae(xs, pos, mask)
    assert sparse.is_sparse(out.codes_of(torch.arange(6)))  # the sparse Gram's path
    ctx = StepContext(step=0, n_tokens=16, sae=sae, dead=torch.zeros(64, dtype=bool))
    torch.manual_seed(1)
    loss = PositionContrastive(sample=6)(out, Batch(xs, pos, mask, torch.zeros_like(pos)), ctx)
    assert out._f is None  # the dense codes were never built
    torch.manual_seed(1)
    keep = torch.randperm(16)[:6]
    z = torch.nn.functional.normalize(out.f.reshape(16, -1)[keep], dim=-1)
    torch.testing.assert_close(loss, supervised_contrastive(z, pos.flatten()[keep], 0.1))


def test_multiscale_groups_see_causal_means_within_the_sequence():
    from posae.sae.multiscale import causal_means

    x = torch.arange(6, dtype=torch.float32).view(1, 6, 1)
    mask = torch.tensor([[True, True, True, False, True, True]])
    means = causal_means(x, mask, 2)[0, :, 0]
    # windows of the last 2 positions, counting only unmasked tokens
    assert means.tolist() == pytest.approx([0.0, 0.5, 1.5, 2.0, 4.0, 4.5])
    sae = build("multiscale", scales=[1, 2])
    x = torch.randn(2, 6, 8)
    f = sae.encode(x, torch.arange(6).expand(2, 6))
    torch.testing.assert_close(f[..., :8], torch.relu((x - sae.b_dec) @ sae.W_enc[:, :8]
                                                       + sae.b_enc[:8]))


def test_per_position_broadcasts_shared_rows_and_gathers_otherwise():
    from posae.sae.base import per_position

    table = torch.randn(10, 3)
    same = torch.arange(4).expand(5, 4)
    assert per_position(table, same).shape == (1, 4, 3)
    torch.testing.assert_close(per_position(table, same).expand(5, 4, 3), table[same])
    mixed = torch.stack([torch.arange(4), torch.arange(4) + 6])
    torch.testing.assert_close(per_position(table, mixed), table[mixed])


def test_hierarchical_switches_remove_each_mechanism():
    sae = build("hierarchical", context_size=8, heads=2, head_dim=4, position_embedding=False,
                routing=False, gate=False)
    assert {name for name, _ in sae.named_parameters()} == {"W_enc", "W_dec", "b_enc", "b_dec"}
    x = torch.randn(2, 8, 8)
    f = sae.encode(x, torch.arange(8).expand(2, 8))
    torch.testing.assert_close(f, torch.relu(sae.pre_activations(x)))


def test_hierarchical_routing_is_multi_head_attention_with_an_output_projection():
    sae = build("hierarchical", context_size=8, heads=2, head_dim=4)
    with torch.no_grad():
        sae.output.weight.normal_()
    P = sae.position_embedding
    heads = []
    for h in range(2):
        rows = slice(4 * h, 4 * h + 4)
        q, k, v = (proj.weight[rows] @ P.T for proj in (sae.query, sae.key, sae.value))
        weights = torch.softmax(q.T @ k / math.sqrt(8), dim=-1)  # eq. 4 divides by sqrt(d)
        heads.append(weights @ v.T)
    expected = torch.cat(heads, -1) @ sae.output.weight.T
    torch.testing.assert_close(sae.routing(), expected)


def test_routing_without_position_embedding_gets_a_gradient_at_initialisation():
    """002 run 8 ("pure attention routing"): P is not in eq. 3 but must still move."""
    sae = build("hierarchical", context_size=8, heads=2, head_dim=4, position_embedding=False)
    assert sae.routing().abs().max() == 0  # routing starts as a no-op
    x, pos = torch.randn(2, 8, 8), torch.arange(8).expand(2, 8)
    out = sae(x, pos)
    (out.x_hat - x).pow(2).sum().backward()
    assert sae.output.weight.grad.abs().max() > 0


def test_pa_sae_records_per_token_gradients_and_scales_the_backward_by_its_rates():
    sae = pa_sae(mask="none").train()
    n = 12.0
    start_step(sae, n)  # the trainer: the loss is a mean over n tokens
    with torch.no_grad():
        sae.rates[2] = 0.02  # twice α_0 at position 2
    x, pos = torch.randn(2, 6, 8), torch.arange(6).expand(2, 6)
    out = sae(x, pos, torch.ones(2, 6, dtype=bool))
    (out.f * 3.0).sum().div(n).backward()  # per-token ∂L/∂f = 3 everywhere
    sae_grad_pos2 = sae.W_enc.grad.clone()
    assert sae.grad_sum[0].tolist() == [2 * 3.0] * 16  # two tokens at position 0, |3| each
    end_step(sae, 1)
    torch.testing.assert_close(sae.importance_ema[0], torch.full((16,), 0.3))  # (1-β) 3
    # the gradient reaching the encoder: tokens at position 2 count twice
    sae.zero_grad()
    reference = pa_sae(mask="none", adaptive_rates=False).train()
    ref_out = reference(x, pos, torch.ones(2, 6, dtype=bool))
    weight = torch.ones(2, 6, 1)
    weight[:, 2] = 2.0
    (ref_out.f * 3.0 * weight).sum().div(n).backward()
    torch.testing.assert_close(sae_grad_pos2, reference.W_enc.grad)


def test_fixed_mask_control_starts_as_the_soft_mask_and_never_moves(tmp_path):
    from posae.sae import load_sae, save_sae

    soft, fixed = pa_sae(mask="soft"), pa_sae(mask="fixed")
    fixed.load_state_dict(soft.state_dict())
    x, pos = torch.randn(2, 6, 8), torch.arange(6).expand(2, 6)
    torch.testing.assert_close(fixed(x, pos).f, soft(x, pos).f)
    for sae in (soft, fixed):
        optimiser = torch.optim.Adam(sae.parameters(), lr=0.1)
        sae(x, pos).x_hat.pow(2).sum().backward()
        optimiser.step()
    assert soft.mechanism_state()["mask_mean"] != pytest.approx(0.8808, abs=1e-3)
    assert fixed.mechanism_state()["mask_mean"] == pytest.approx(0.8808, abs=1e-4)
    save_sae(fixed, tmp_path)  # the frozen logits travel with the weights
    torch.testing.assert_close(load_sae(tmp_path).mask_logits, fixed.mask_logits)


def test_importance_weights_feed_back_and_the_bound_limits_what_the_loss_sees():
    """The importance L1's own gradient (λ·L·w) enters g (eq. 6): a position whose weight
    is large records a large gradient, so its weight grows until the latent's whole L1 sits
    there; `importance_bound` keeps the weights the loss uses within [1/b, b], while the
    softmax underneath still collapses (counted on the unclipped weights)."""
    def run(bound):
        sae = pa_sae(mask="none", adaptive_rates=False, importance_bound=bound).train()
        start_step(sae, 12.0)
        with torch.no_grad():
            sae.importance_ema[2] = 1.0  # position 2 starts slightly heavier
        x, pos = torch.rand(2, 6, 8), torch.arange(6).expand(2, 6)
        for step in range(60):
            out = sae(x, pos, torch.ones(2, 6, dtype=bool))
            (out.extras["position_weights"] * out.f.abs()).sum().mul(2.0).div(12).backward()
            end_step(sae, step)
            sae.zero_grad()
        return sae.mechanism_state()

    free, bounded = run(None), run(2.0)
    assert free["importance_weight_max"] == pytest.approx(6.0, rel=1e-3)  # L = 6: collapsed
    assert free["importance_collapsed_latents"] > 0
    assert free["importance_weight_clipped_fraction"] == 0
    assert bounded["importance_weight_max"] == pytest.approx(2.0)
    assert bounded["importance_weight_min"] == pytest.approx(0.5)
    assert bounded["importance_collapsed_latents"] > 0  # the loop still runs underneath
    assert bounded["importance_weight_clipped_fraction"] > 0


def lagged_plant(controller, steps: int, delay: int = 20, response: float = 0.1
                 ) -> list[float]:
    """L0 drifts toward 40 / λ (λ0 = 0.04 gives L0 = 1000) of `delay` steps before,
    closing `response` of the log-gap each step, as an SAE's L0 answers its L1 coefficient
    late (Adam's momentum, the encoder's drift); the L0 of each step."""
    l0, coefficients, trace = 1000.0, [], []
    for step in range(steps):
        coefficients.append(controller(step))
        l0 *= (40 / coefficients[max(0, step - delay)] / l0) ** response
        controller.update({"l0": l0})
        trace.append(l0)
    return trace


def test_adaptive_l1_keeps_a_standing_error_and_integral_control_removes_it():
    """001 eq. 4 is proportional control: it settles far above the target of 32; the
    proportional-integral form reaches it."""
    from posae.losses.controllers import IntegralL1

    proportional = lagged_plant(AdaptiveL1(value=0.04, eta=0.002, target_l0=32), 3000)
    integral = lagged_plant(IntegralL1(value=0.04, target_l0=32), 3000)
    assert proportional[-1] > 300  # standing error: λ0 exp(η (s - s*)) = 40 / s has s >> s*
    assert integral[-1] == pytest.approx(32, rel=0.01)


def gliding(total_steps: int, **kwargs):
    from posae.losses.controllers import IntegralL1

    controller = IntegralL1(value=0.04, target_l0=32, **kwargs)
    controller.plan(total_steps)
    return controller


def test_integral_l1_setpoint_glides_so_l0_approaches_the_target_from_above():
    """With the setpoint gliding from the first L0 to the target over the first
    `ramp_fraction` of the run, L0 follows it down without undershooting the target by more
    than 10 % (a step to the target undershoots to about half of it on this plant) and then
    settles within 3 % of it; `setpoint()` is the log-linear glide and then the target."""
    trace = lagged_plant(gliding(800, ramp_fraction=0.25), 800)
    assert min(trace) > 0.9 * 32
    assert min(lagged_plant(gliding(800, ramp_fraction=0.0), 800)) < 0.6 * 32
    assert max(abs(l0 / 32 - 1) for l0 in trace[600:]) < 0.03
    fresh = gliding(250, ramp_fraction=0.4)  # a glide of 100 steps
    fresh.update({"l0": 3200.0})
    assert fresh.setpoint() == pytest.approx(32 * 100 ** 0.99)
    fresh.steps = 50
    assert fresh.setpoint() == pytest.approx(320)
    fresh.steps = 100
    assert fresh.setpoint() == 32


def test_integral_l1_resumes_mid_glide_exactly_and_refuses_an_old_state():
    from posae.losses.controllers import IntegralL1

    first, second = gliding(400), gliding(400)
    lagged_plant(first, 60)
    second.load_state_dict(first.state_dict())
    for l0 in (900.0, 700.0, 650.0):
        first.update({"l0": l0})
        second.update({"l0": l0})
        assert second(0) == first(0) and second.setpoint() == first.setpoint()
    with pytest.raises(ValueError, match="lacks .*'error'.*start the run again"):
        IntegralL1().load_state_dict({"log_ratio": 0.3})


def test_integral_l1_stops_the_run_when_l0_does_not_answer_the_penalty():
    """An L0 that no coefficient moves (an SAE whose codes are dense by construction) winds
    the integral up to its bound: the controller raises instead of training on."""
    from posae.losses.controllers import IntegralL1, SparsityNotControlled

    controller = IntegralL1(value=0.04, target_l0=6)
    with pytest.raises(SparsityNotControlled, match="L0 stayed at 256 against a setpoint "
                                                    "of 6 .*does not answer its penalty"):
        for _ in range(2000):
            controller.update({"l0": 256.0})
    assert controller.steps < 500


def test_momentum_alpha_starts_at_its_initial_value_and_follows_reconstruction():
    alpha = MomentumFromReconstruction(value=0.002, momentum=0.95)
    assert alpha(0) == 0.0
    for _ in range(200):
        alpha.update({"fvu": 0.25})
    assert alpha(200) == pytest.approx(0.002 * 0.75, rel=1e-3)
    assert MomentumFromReconstruction(initial=0.001)(0) == 0.001
