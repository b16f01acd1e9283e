"""Every mechanism in posae/conf/variant and posae/conf/loss does something: a short training
run on the planted-feature data in which the mechanism's logged state moves from where it
started, and whose trained SAE differs from the same run with the mechanism switched off.

The runs go through the real entry-point code (`plan_training`, `open_training_cache`,
`Trainer.fit`) on `dataset=synthetic`, in-process: 60 steps of 512 tokens each, at
learning rate 2e-3 (adam_short's) so that 60 steps move the weights measurably. "Differs"
means the decoders of the two runs are further apart than how far the run without the
mechanism moved its decoder from its initialisation divided by 1000 (the runs are
deterministic: an inert mechanism gives the same decoder to float precision).
"""

from __future__ import annotations

import functools
import math
import tempfile
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from conftest import CONF, compose_config

from posae.sae import build_sae
from posae.train import open_training_cache, plan_training
from posae.training.loggers import NoLogger
from posae.training.trainer import Trainer

CACHE = Path(tempfile.mkdtemp(prefix="posae_liveness_cache_"))
STEPS = 60
BASE = ["dataset=synthetic", f"cache.root={CACHE}", "trainer.cpu=true", "eval.enabled=false",
        "n_tokens=65536", "trainer.batch_tokens=512", f"trainer.n_tokens={512 * STEPS}",
        "trainer.checkpoint_every=100000", "trainer.log_every=10", "optim.warmup_steps=5",
        "optim.lr=2e-3"]


@functools.lru_cache(maxsize=None)
def train(*overrides: str) -> tuple[dict, dict, dict, torch.Tensor]:
    """(state before training, state after, final SAE weights, initial decoder) of a short
    run."""
    plan = plan_training(compose_config(overrides=[*BASE, *overrides]))
    accelerator = Accelerator(cpu=True)
    cache, train_ids, _ = open_training_cache(plan, accelerator)
    torch.manual_seed(0)
    trainer = Trainer(build_sae(plan.sae), plan.terms, plan.optim, plan.trainer, cache,
                      train_ids, 0, accelerator, Path(tempfile.mkdtemp()), NoLogger())
    initial_decoder = trainer.sae.W_dec.detach().clone()
    before = {**trainer.mechanism_stats(),
              **{f"coef/{n}": t.coefficient(0) for n, t in trainer.terms.items()}}
    trainer.fit()
    weights = {k: v.detach().clone() for k, v in trainer.sae.state_dict().items()}
    return before, dict(trainer.last_stats), weights, initial_decoder


# (name, overrides with the mechanism on, the same with it off, logged state that must move
#  or None where the mechanism has no state of its own, how far it must move (absolute))
CASES = [
    ("pa_sae soft masks", ["variant=pa_sae"], ["variant=pa_sae", "variant.mask=none"],
     "mech/mask_mean", 1e-3),
    ("pa_sae hard masks", ["variant=pa_sae", "variant.mask=hard"],
     ["variant=pa_sae", "variant.mask=none"], "mech/mask_open_fraction", 0.02),
    ("pa_sae adaptive rates (eq. 4)", ["variant=pa_sae"],
     ["variant=pa_sae", "variant.adaptive_rates=false"], "mech/rate_max", 0.005),
    ("importance_l1 (000 eq. 5-6)", ["variant=pa_sae"], ["variant=pa_sae", "loss=[mse,l1]"],
     "mech/importance_weight_std", 0.05),
    ("pa_sae importance bound (ours)", ["variant=pa_sae", "variant.importance_bound=1.1"],
     ["variant=pa_sae"], "mech/importance_weight_clipped_fraction", 0.01),
    # α follows 1 - FVU, which is 0 while the tied initialisation's overshoot keeps FVU > 1
    ("atr temporal R_t with momentum alpha (001 eq. 2-3)",
     ["variant=atr", "variant.encoder_init=kaiming_uniform", "loss.temporal.coef.value=0.05"],
     ["variant=atr", "variant.encoder_init=kaiming_uniform", "loss=[mse,l1_adaptive]"],
     "coef/temporal", 1e-4),
    ("temporal_fixed", ["variant=atr", "loss=[mse,l1,temporal_fixed]", "loss.temporal.coef=0.05"],
     ["variant=atr", "loss=[mse,l1]"], None, 0),
    ("l1_adaptive (001 eq. 4)", ["variant=atr"], ["variant=atr", "loss=[mse,l1,temporal]"],
     "coef/l1", 0.002),
    ("l1_integral (ours)", ["variant=atr", "loss=[mse,l1_integral,temporal]"],
     ["variant=atr", "loss=[mse,l1,temporal]"], "coef/l1", 0.002),
    ("atr temporal-importance resampling (001 eq. 6)", ["variant=atr", "trainer.resample_every=20"],
     ["variant=atr", "trainer.resample_every=0"], "resample/rounds", 1.0),
    ("random resampling (control for eq. 6's score)",
     ["variant=atr", "trainer.resample_every=20", "resample=random"],
     ["variant=atr", "trainer.resample_every=0"], "resample/rounds", 1.0),
    ("dead-latent resampling", ["variant=topk", "variant.k=4", "trainer.resample_every=20",
                                "trainer.dead_after_tokens=512"],
     ["variant=topk", "variant.k=4", "trainer.dead_after_tokens=512"], "resample/rounds", 1.0),
    ("hierarchical routing, run 8 (no position embedding)",
     ["variant=hierarchical", "variant.position_embedding=false"],
     ["variant=hierarchical", "variant.position_embedding=false", "variant.routing=false"],
     "mech/routing_norm", 0.01),
    ("hierarchical gate", ["variant=hierarchical"], ["variant=hierarchical", "variant.gate=false"],
     "mech/gate_mean", 1e-3),
    ("hierarchical position embedding", ["variant=hierarchical", "variant.routing=false"],
     ["variant=hierarchical", "variant.routing=false", "variant.position_embedding=false"],
     "mech/position_embedding_norm", 1e-3),
    ("weighted_mse (002 eq. 7)", ["variant=hierarchical"],
     ["variant=hierarchical", "loss=[mse,l1]", "loss.l1.coef=0.1"], None, 0),
    ("masked_hard", ["variant=masked_hard"], ["variant=relu", "optim=adam"], None, 0),
    ("masked_gaussian", ["variant=masked_gaussian"], ["variant=relu", "optim=adam"], None, 0),
    ("masked_hard_topk (control)", ["variant=masked_hard_topk", "variant.k=4"],
     ["variant=topk", "variant.k=4"], None, 0),
    ("masked_gaussian cutoff (control)", ["variant=masked_gaussian", "variant.cutoff=3"],
     ["variant=masked_gaussian"], None, 0),
    ("hierarchical L1 on the input codes (control)",
     ["variant=hierarchical", "variant.penalise_offset=false"], ["variant=hierarchical"],
     "mech/routing_norm", 0.01),
    ("masked_progressive schedule", ["variant=masked_progressive", "variant.schedule_steps=40"],
     ["variant=masked_gaussian"], "mech/mask_strength", 0.5),
    ("masked_stabilised clipping", ["variant=masked_stabilised", "optim.lr=3e-5"],
     ["variant=masked_stabilised", "optim.lr=3e-5", "trainer.grad_clip=null"], None, 0),
    ("range_encoders", ["variant=range_encoders"], ["variant=relu", "optim=adam"],
     "mech/encoder_spread", 1e-3),
    ("contrastive", ["variant=contrastive", "loss.contrastive.coef=1.0"],
     ["variant=contrastive", "loss=[mse,l1]"], None, 0),
    ("multiscale", ["variant=multiscale"], ["variant=multiscale", "variant.scales=[1,1,1]"],
     None, 0),
    ("temporal_window (003 eq. 6)", ["variant=tc_sae"], ["variant=tc_sae", "loss=[mse,l1]"],
     None, 0),
    ("temporal_window size T = 5 vs 3", ["variant=tc_sae"],
     ["variant=tc_sae", "loss.temporal_window.window=3"], None, 0),
    ("tc_sae initialisation", ["variant=tc_sae"],
     ["variant=tc_sae", "variant.encoder_init=tied", "variant.decoder_init=normal"], None, 0),
    ("curriculum adapters (004 eq. 3)", ["variant=curriculum", "variant.curriculum_delay=10",
                                         "variant.curriculum_length=20"],
     ["variant=curriculum", "variant.curriculum_delay=1000"], "mech/curriculum_alpha", 0.5),
    ("adapter_l1 (004 eq. 5)", ["variant=curriculum", "variant.curriculum_delay=10",
                                "variant.curriculum_length=20", "loss.adapter_l1.coef=1.0"],
     ["variant=curriculum", "variant.curriculum_delay=10", "variant.curriculum_length=20",
      "loss=[mse,l1]"], None, 0),
    ("topk auxk", ["variant=topk", "variant.k=4", "trainer.dead_after_tokens=512"],
     ["variant=topk", "variant.k=4", "trainer.dead_after_tokens=512", "loss=[mse]"], None, 0),
    ("batchtopk threshold", ["variant=batchtopk"], ["variant=topk", "loss=[mse]"],
     "mech/threshold", 1e-3),
    ("matryoshka prefix_mse", ["variant=matryoshka_batchtopk"],
     ["variant=matryoshka_batchtopk", "loss=[mse,auxk]"], None, 0),
    ("t_sae temporal_infonce (2511.05541 §3.2)", ["variant=t_sae"],
     ["variant=t_sae", "loss=[mse,prefix_mse,auxk]"], None, 0),
    ("temporal_sae attention (2511.01836 eq. 3)", ["variant=temporal_sae"],
     ["variant=temporal_sae", "variant.n_attn_layers=0"], "mech/attention_norm", 1e-3),
    ("jumprelu l0", ["variant=jumprelu"], ["variant=jumprelu", "loss=[mse]"],
     "mech/threshold_mean", 1e-3),
    ("gated_aux", ["variant=gated"], ["variant=gated", "loss=[mse,l1]"], None, 0),
    ("l1", ["variant=relu"], ["variant=relu", "loss=[mse]"], None, 0),
]


def loss_signature(package: str, node) -> tuple:
    coef = node.get("coef")
    return package, node["_target_"], coef.get("_target_") if hasattr(coef, "get") else None


def loss_files() -> dict[tuple, str]:
    """Each posae/conf/loss file by what it puts in the config: its package, `_target_` and
    coefficient `_target_` (l1, l1_adaptive and l1_integral share the package loss.l1)."""
    import yaml

    files = {}
    for path in (CONF / "loss").glob("*.yaml"):
        package = path.read_text().splitlines()[0].split("@package loss.")[1].strip()
        files[loss_signature(package, yaml.safe_load(path.read_text()))] = path.stem
    return files


def selected(overrides: list[str]) -> set[str]:
    """The variant and loss files a run composes, its variant file's own loss choice
    included (`variant/x`, `loss/y`)."""
    cfg = compose_config(overrides=[*BASE, *overrides])
    files = loss_files()
    return {f"variant/{cfg.variant.name}",
            *(f"loss/{files[loss_signature(name, node)]}" for name, node in cfg.loss.items())}


def test_every_variant_and_loss_file_has_a_liveness_case():
    """Each variant file and each loss file is selected by the "on" run of some case."""
    covered = set()
    for _, on, *_ in CASES:
        covered |= selected(on)
    for group in ("variant", "loss"):
        for path in sorted((CONF / group).glob("*.yaml")):
            if path.stem != "mse":  # reconstruction itself: weighted_mse is compared with it
                assert f"{group}/{path.stem}" in covered, path.name


@pytest.mark.parametrize("name,on,off,state,threshold", CASES, ids=[c[0] for c in CASES])
def test_mechanism_is_alive(name, on, off, state, threshold):
    before, after, weights, _ = train(*on)
    _, _, weights_off, initial_off = train(*off)
    if state is not None:
        assert math.isfinite(after[state])
        assert abs(after[state] - before[state]) >= threshold, (
            f"{name}: {state} went {before[state]:.4g} -> {after[state]:.4g}, "
            f"less than {threshold}")
    diff = (weights["W_dec"] - weights_off["W_dec"]).norm()
    movement = (weights_off["W_dec"] - initial_off).norm()
    assert diff > 1e-3 * movement, (f"{name}: the trained decoder is {diff:.3g} from the one "
                                    f"without the mechanism, which moved {movement:.3g}")


def test_resampling_leaves_a_full_interval_before_the_end_and_logs_its_effect():
    _, after, _, _ = train("variant=atr", "trainer.resample_every=20")
    # rounds after steps 20 and 40; none at 60, which would leave no time to recover
    assert after["resample/rounds"] == 2 and after["resample/step"] == 40
    assert after["resample/latents"] == round(0.1 * 512)
    assert math.isfinite(after["resample/ev_before"]) and math.isfinite(after["resample/ev_after"])


def test_matched_sparsity_controls_the_hierarchical_codes_before_their_routing_offset():
    """002's routing adds g ⊙ α_t after the ReLU, so once W_O moves every positional latent
    is non-zero on every token. The L0 that training logs and the controller steers is the
    codes' before that offset (as the evaluation counts them): it falls below the
    positional half's 256 latents, which the offset alone would hold it at."""
    _, after, _, _ = train("variant=hierarchical", "+matched_point=l0_6_seed0")
    assert after["mech/routing_norm"] > 0  # the offset is live
    assert after["l0"] < 200 and after["coef/l1"] > 1
