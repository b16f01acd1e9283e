"""Every config composes; bad keys fail before any compute with a message naming them."""

from __future__ import annotations

import pytest
from conftest import CONF, compose_config, run_module
from hydra.errors import MissingConfigException

from posae.config import (
    ConfigError,
    cache_config,
    cache_request,
    dataset_config,
    model_config,
)

# language models and text; `synthetic` (planted activations) pairs only with itself
MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml") if p.stem != "synthetic")
DATASETS = sorted(p.stem for p in (CONF / "dataset").glob("*.yaml") if p.stem != "synthetic")


def test_the_papers_models_are_configured():
    assert {"gemma-2-2b", "gpt2", "pythia-70m", "minilm"} <= set(MODELS)
    gemma = model_config(compose_config(overrides=["model=gemma-2-2b"]).model)
    assert (gemma.n_layers, gemma.d_model, gemma.kind) == (26, 2304, "causal")


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("dataset", DATASETS)
def test_every_model_and_dataset_compose_for_train_and_cache(model, dataset):
    extra = ["dataset.paths=[corpus/*.txt]"] if dataset == "text_files" else []
    for name, key in (("config", "layer"), ("cache", "layers")):
        cfg = compose_config(name, [f"model={model}", f"dataset={dataset}", "layer=1" if
                                    key == "layer" else "layers=[0,1]", *extra])
        req = cache_request(cfg, key)
        assert req.model.name == model and req.dataset.name == dataset


def test_synthetic_pairs_only_with_itself():
    for name, key in (("config", "layer"), ("cache", "layers")):
        req = cache_request(compose_config(name, ["dataset=synthetic"]), key)
        assert (req.model.name, req.layers, req.model.d_model) == ("synthetic", [0], 64)
        with pytest.raises(ConfigError, match="model: 'synthetic' cannot read dataset"):
            cache_request(compose_config(name, ["model=synthetic", "dataset=stdlib_docs"]), key)


def test_train_config_composes_all_groups():
    cfg = compose_config()
    for group in ("model", "dataset", "cache", "variant", "loss", "optim", "trainer", "logger"):
        assert group in cfg, group
    assert set(cfg.loss) == {"mse", "l1"} and cfg.loss.l1.coef == 0.04
    assert isinstance(cfg.layer, int) and cfg.context_size == 128


def test_layer_override_as_plain_integer_reaches_deep_models():
    cfg = compose_config(overrides=["model=gemma-2-2b", "layer=12"])
    assert cache_request(cfg, "layer").layers == [12]


@pytest.mark.parametrize("value, words", [
    ("abc", "must be an integer"), ("3.5", "must be an integer"), ("6", "beyond model 'minilm'"),
    ("-1", "beyond model"),
])
def test_bad_layer_names_the_key(value, words):
    with pytest.raises(ConfigError, match=rf"^layer.*{words}"):
        cache_request(compose_config(overrides=[f"layer={value}"]), "layer")


def test_bad_layers_list_names_the_key():
    with pytest.raises(ConfigError, match=r"^layers.*beyond"):
        cache_request(compose_config("cache", ["layers=[1,9]"]), "layers")


def test_unknown_variant_is_refused_by_name():
    with pytest.raises(MissingConfigException, match="variant"):
        compose_config(overrides=["variant=no_such_variant"])


def test_typed_errors_name_the_field():
    cfg = compose_config(overrides=["model.n_layers=six"])
    with pytest.raises(ConfigError, match=r"^model\.n_layers"):
        model_config(cfg.model)
    with pytest.raises(ConfigError, match=r"^cache\.dtype"):
        cache_config(compose_config(overrides=["cache.dtype=int8"]).cache)
    with pytest.raises(ConfigError, match=r"^dataset\.paths"):
        dataset_config(compose_config(overrides=["dataset=text_files"]).dataset)
    with pytest.raises(ConfigError, match=r"^n_tokens"):
        cache_request(compose_config(overrides=["n_tokens=0"]), "layer")


def test_cli_rejects_bad_layer_before_any_compute(tmp_path):
    """The real entry point exits 2 naming the key, and writes no cache."""
    result = run_module("posae.train", "layer=12", f"cache.root={tmp_path / 'cache'}",
                        f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2, result.output
    assert "layer=12 is beyond model 'minilm'" in result.output
    assert not (tmp_path / "cache").exists()


def test_cli_rejects_unknown_variant(tmp_path):
    result = run_module("posae.train", "variant=nope", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode != 0
    assert "variant/nope" in result.output


def test_a_loss_term_the_architecture_cannot_feed_exits_2_before_any_compute(tmp_path):
    result = run_module("posae.train", "variant=relu", "loss=[mse,importance_l1]",
                        f"cache.root={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2, result.output
    assert "loss.importance_l1" in result.output and "variant=relu" in result.output
    assert "pa_sae" in result.output  # the architectures that can feed it
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("overrides,key", [
    (["variant=hierarchical", "variant.width=7"], "variant"),
    (["variant=topk", "variant.k=5000"], "variant.k"),
    (["variant=pa_sae", "variant.mask=open"], "variant.mask"),
    (["variant=masked_hard", "variant.mask=soft"], "variant.mask"),
    (["variant=masked_hard", "variant.cutoff=3"], "variant.cutoff"),
    (["variant=masked_hard_topk", "variant.mask=gaussian"], "variant.mask"),
    (["variant=masked_hard_topk", "variant.k=1000"], "variant.k"),
    (["variant=multiscale", "variant.width=100"], "variant"),
    (["variant=pa_sae", "variant.rate_init=0.5"], "variant.rate_init"),
])
def test_architecture_checks_run_when_the_config_is_read(overrides, key):
    from posae.sae import sae_config

    with pytest.raises(ConfigError, match=rf"^{key}"):
        sae_config(compose_config(overrides=overrides).variant, 384)


def test_schedules_that_end_after_the_run_are_named():
    from posae.training.schedule import unfinished_schedules

    cfg = compose_config(overrides=["variant=curriculum"])
    (warning,) = unfinished_schedules(cfg, 489)
    assert warning.startswith("variant.curriculum_delay + variant.curriculum_length = 500")
    assert unfinished_schedules(cfg, 500) == []
    cfg = compose_config(overrides=["variant=atr"])  # resampling every 500 steps
    assert any(w.startswith("trainer.resample_every = 500") for w in unfinished_schedules(cfg, 999))
    assert unfinished_schedules(cfg, 1000) == []
    cfg = compose_config(overrides=["variant=masked_progressive", "loss.l1.warmup_steps=900"])
    keys = {w.split(" = ")[0] for w in unfinished_schedules(cfg, 489)}
    assert keys == {"variant.schedule_steps", "loss.l1.warmup_steps"}


@pytest.mark.parametrize("override,key", [
    ("trainer.grad_clip=-1", "trainer.grad_clip"),  # would ascend the gradient
    ("trainer.grad_clip=0", "trainer.grad_clip"),
    ("trainer.window=0", "trainer.window"),         # once read as "whole sequences"
    ("trainer.resample._target_=subprocess.Popen", "trainer.resample"),
    ("optim.betas=[0.9,1.0]", "optim.betas"),
    ("optim.weight_decay=-0.1", "optim.weight_decay"),
    ("optim.warmup_steps=-5", "optim.warmup_steps"),
    ("loss.l1.coef=-0.1", "loss.l1"),                # a negative penalty rewards density
    ("loss.l1.warmup_steps=-5", "loss.l1"),
    ("trainer.eval_fraction=0.999", "trainer.eval_fraction"),  # no training sequences left
    ("+unknown=1", "unknown: no such top-level key"),
])
def test_settings_that_would_train_backwards_or_not_at_all_are_refused_when_read(override, key):
    from posae.train import plan_training

    with pytest.raises(ConfigError, match=rf"^{key}"):
        plan_training(compose_config(overrides=["variant=relu", override]))


def test_a_resampling_policy_that_cannot_be_built_is_refused_when_read():
    from posae.train import plan_training

    with pytest.raises(ConfigError, match=r"^trainer\.resample: .*fraction.* \[0, 1\]"):
        plan_training(compose_config(overrides=["variant=atr", "resample=random",
                                                "trainer.resample.fraction=1.5"]))


@pytest.mark.parametrize("target", ["pathlib.Path.unlink", "subprocess.Popen"])
@pytest.mark.parametrize("path", [["l1"], ["l1", "coef"], ["l1", "extra[0]"]])
def test_a_tampered_target_in_a_loss_is_refused_before_anything_is_called(tmp_path, path,
                                                                          target):
    """A `_target_` naming another callable (a function that would delete a file, a class
    that would run a command), at the term or inside its coefficient, is refused naming
    the key; nothing runs."""
    from omegaconf import OmegaConf

    from posae.losses import build_loss_terms

    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    loss = compose_config(overrides=["variant=atr", "loss=[mse,l1_integral]"]).loss
    OmegaConf.set_struct(loss, False)
    loss.l1.extra = [{}]  # Hydra instantiates inside lists as well
    node = OmegaConf.select(loss, ".".join(path))
    node._target_ = target
    node.self = str(victim)  # Path.unlink(self=...)
    node.args = ["rm", str(victim)]  # Popen(args=...)
    key = "\\.".join(path).replace("[", "\\[").replace("]", "\\]")
    with pytest.raises(ConfigError, match=rf"^loss\.{key}: .*{target}"):
        build_loss_terms(loss)
    assert victim.read_text() == "keep me"
