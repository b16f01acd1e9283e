"""Typed schemas for the composed Hydra config, and validation that names the bad key.

Hydra composes plain YAML (posae/conf/); each entry point turns the parts it uses into these
dataclasses before any compute, so a wrong type, a missing value or an unknown key fails
with a message naming the key instead of deep inside a run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

MODEL_KINDS = ("encoder", "causal", "synthetic")
DATASET_SOURCES = ("stdlib_docs", "text_files", "hf", "synthetic")
STORAGE_DTYPES = ("float16", "bfloat16", "float32")


class ConfigError(ValueError):
    """A config value is wrong; the message names the key."""


def paper_steps(steps: int, *, _root_: DictConfig) -> int:
    """`${paper_steps:1000}`: a step count the papers give (warmups, curriculum, resampling),
    divided by `scale.step_divisor` so that it plays out within a shorter run
    (posae/conf/scale/)."""
    return round(int(steps) / positive_int(_root_.scale.step_divisor, "scale.step_divisor"))


def steps_to_tokens(steps: int, *, _root_: DictConfig) -> int:
    """`${steps_to_tokens:N}`: training tokens for N optimiser steps of trainer.batch_tokens,
    for a sweep whose schedule (004's 10,000-step curriculum) must finish within the run."""
    return int(steps) * positive_int(_root_.trainer.batch_tokens, "trainer.batch_tokens")


OmegaConf.register_new_resolver("paper_steps", paper_steps, replace=True)
OmegaConf.register_new_resolver("steps_to_tokens", steps_to_tokens, replace=True)


@dataclass
class ModelConfig:
    """A language model whose residual stream is cached (posae/conf/model/)."""

    name: str
    hf_id: str
    kind: str
    n_layers: int
    d_model: int
    # A Python package that ships the weights (loaded from site-packages, no network).
    package: Optional[str] = None
    revision: Optional[str] = None
    dtype: str = "auto"
    # Prepend the tokenizer's BOS when the tokenizer itself adds none (GPT-2, Pythia).
    prepend_bos: bool = False
    attn_implementation: Optional[str] = None


@dataclass
class SyntheticConfig:
    """Planted-feature activations (posae/data/synthetic.py; posae/conf/dataset/synthetic.yaml)."""

    d: int = 64
    seed: int = 0
    n_invariant: int = 64
    invariant_rate: float = 0.02
    n_position_specific: int = 32
    specific_rate: float = 0.2
    range_length: int = 16
    n_persistent: int = 32
    on_rate: float = 0.01
    mean_run: float = 8.0
    magnitude_sigma: float = 0.5
    correlated_pairs: int = 0
    correlation: float = 0.5
    position_code_scale: float = 1.0
    noise_std: float = 0.05


@dataclass
class DatasetConfig:
    """A text source, or planted-feature activations (posae/conf/dataset/)."""

    name: str
    source: str
    pack: bool = True
    # source=hf
    path: Optional[str] = None
    split: str = "train"
    text_field: str = "text"
    # source=text_files
    paths: Optional[list[str]] = None
    # source=synthetic
    synthetic: Optional[SyntheticConfig] = None


@dataclass
class CacheConfig:
    """Storage of cached activations (posae/conf/cache/)."""

    root: str
    dtype: str = "float16"
    shard_sequences: int = 256
    batch_sequences: int = 32
    device: str = "auto"
    verify: bool = True


T = TypeVar("T")

CONF_DIR = Path(__file__).resolve().parent / "conf"


def typed(node: Any, schema: type[T], key: str) -> T:
    """Merge `node` into `schema`; errors name `key.<field>`."""
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{key}: expected a mapping, got {node!r}")
    try:
        # resolve interpolations against the whole config before leaving it
        node = OmegaConf.create(OmegaConf.to_container(node, resolve=True))
        merged = OmegaConf.merge(OmegaConf.structured(schema), node)
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        bad = getattr(err, "full_key", None) or ""
        name = bad if bad == key or bad.startswith(f"{key}.") else f"{key}.{bad}"
        raise ConfigError(f"{name}: {err.msg if hasattr(err, 'msg') else err}") from None
    return obj  # type: ignore[return-value]


def _choice(value: str, choices: tuple[str, ...], key: str) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(choices)}")


def model_config(node: Any) -> ModelConfig:
    cfg = typed(node, ModelConfig, "model")
    _choice(cfg.kind, MODEL_KINDS, "model.kind")
    if cfg.n_layers < 1 or cfg.d_model < 1:
        raise ConfigError("model.n_layers and model.d_model must be positive")
    return cfg


def dataset_config(node: Any) -> DatasetConfig:
    cfg = typed(node, DatasetConfig, "dataset")
    _choice(cfg.source, DATASET_SOURCES, "dataset.source")
    if cfg.source == "hf" and not cfg.path:
        raise ConfigError("dataset.path: a Hugging Face dataset id is required for source=hf")
    if cfg.source == "text_files" and not cfg.paths:
        raise ConfigError("dataset.paths: give at least one file or glob for source=text_files")
    if (cfg.source == "synthetic") != (cfg.synthetic is not None):
        raise ConfigError("dataset.synthetic: set exactly when dataset.source=synthetic")
    return cfg


def cache_config(node: Any) -> CacheConfig:
    cfg = typed(node, CacheConfig, "cache")
    _choice(cfg.dtype, STORAGE_DTYPES, "cache.dtype")
    for key in ("shard_sequences", "batch_sequences"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"cache.{key}: must be a positive integer, got {getattr(cfg, key)}")
    return cfg


def positive_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key}: must be a positive integer, got {value!r}")
    return value


def layer_index(value: Any, model: ModelConfig, key: str = "layer") -> int:
    """A block index of `model`, 0-based: the residual stream after that block."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(
            f"{key}: must be an integer block index in [0, {model.n_layers - 1}] "
            f"for model {model.name!r}, got {value!r}"
        )
    if not 0 <= value < model.n_layers:
        raise ConfigError(
            f"{key}={value} is beyond model {model.name!r}, which has {model.n_layers} "
            f"blocks: use 0..{model.n_layers - 1}"
        )
    return value


def layer_indices(values: Any, model: ModelConfig, key: str) -> list[int]:
    """One block index or a list of them, sorted and deduplicated."""
    if not OmegaConf.is_list(values) and not isinstance(values, (list, tuple)):
        values = [values]
    layers = [layer_index(v, model, key) for v in values]
    if not layers:
        raise ConfigError(f"{key}: give at least one layer")
    return sorted(set(layers))


@dataclass
class CacheRequest:
    """What an entry point asks of the activation cache."""

    model: ModelConfig
    dataset: DatasetConfig
    cache: CacheConfig
    context_size: int
    n_tokens: int
    layers: list[int] = field(default_factory=list)


def synthetic_checks(cfg: SyntheticConfig, model: ModelConfig, context_size: int) -> None:
    key = "dataset.synthetic"
    if cfg.d != model.d_model:
        raise ConfigError(f"model.d_model: {model.d_model} differs from {key}.d={cfg.d}")
    if cfg.n_invariant + cfg.n_position_specific + cfg.n_persistent < 1:
        raise ConfigError(f"{key}: plant at least one feature")
    if not 1 <= cfg.range_length <= context_size:
        raise ConfigError(f"{key}.range_length: {cfg.range_length} must lie in "
                          f"1..context_size={context_size}")
    if 2 * cfg.correlated_pairs > cfg.n_invariant:
        raise ConfigError(f"{key}.correlated_pairs: needs 2 x {cfg.correlated_pairs} <= "
                          f"n_invariant={cfg.n_invariant}")
    if cfg.mean_run < 1:
        raise ConfigError(f"{key}.mean_run: must be at least 1, got {cfg.mean_run}")
    for name in ("invariant_rate", "specific_rate", "on_rate", "correlation"):
        if not 0 <= getattr(cfg, name) <= 1:
            raise ConfigError(f"{key}.{name}: a probability, got {getattr(cfg, name)}")


def cache_request(cfg: DictConfig, layers_key: str) -> CacheRequest:
    """Validate the parts of a composed config that the cache needs.

    `layers_key` is `layers` (posae.cache: a list) or `layer` (posae.train: one index).
    """
    if (cfg.dataset.get("source") == "synthetic") != (cfg.model.get("kind") == "synthetic"):
        raise ConfigError(f"model: {cfg.model.get('name')!r} cannot read dataset "
                          f"{cfg.dataset.get('name')!r}: planted activations go with "
                          f"model=synthetic (dataset=synthetic selects it)")
    model = model_config(cfg.model)
    layers = layer_indices(cfg[layers_key], model, layers_key)
    context_size = positive_int(cfg.context_size, "context_size")
    if context_size < 4:
        raise ConfigError(f"context_size: must be at least 4, got {context_size}")
    dataset = dataset_config(cfg.dataset)
    if dataset.synthetic is not None:
        synthetic_checks(dataset.synthetic, model, context_size)
    return CacheRequest(
        model=model,
        dataset=dataset,
        cache=cache_config(cfg.cache),
        context_size=context_size,
        n_tokens=positive_int(cfg.n_tokens, "n_tokens"),
        layers=layers,
    )


LR_SCHEDULES = ("constant", "warmup", "cosine")
OPTIMIZERS = ("adam", "adamw")
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
# posae/conf/resample/<name>.yaml → trainer.resample; the `trainer.resample_select` string it
# replaced (2026-12-02) is still read from saved run configs (`legacy_resample_keys`).
RESAMPLE_POLICIES = {"dead": "ResampleDead", "random": "ResampleRandom",
                     "temporal_importance": "ResampleByTemporalImportance"}


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule (posae/conf/optim/)."""

    name: str = "adam"
    lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    schedule: str = "warmup"
    warmup_steps: int = 1000
    min_lr_ratio: float = 0.0


@dataclass
class TrainerConfig:
    """The training loop (posae/conf/trainer/)."""

    n_tokens: int = 1_000_000
    batch_tokens: int = 2048
    micro_batches: int = 1
    window: Optional[int] = None
    eval_fraction: float = 0.05
    train_on_special_tokens: bool = False
    normalize_activations: bool = True
    grad_clip: Optional[float] = None
    dead_after_tokens: int = 100_000
    resample_every: int = 0
    # The policy of posae/training/resampling.py choosing which latents a round resamples,
    # by _target_ with its arguments (posae/conf/resample/).
    resample: Dict[str, Any] = field(
        default_factory=lambda: {"_target_": "posae.training.resampling.ResampleDead"})
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    mixed_precision: str = "auto"
    cpu: bool = False

    @property
    def total_steps(self) -> int:
        """Optimiser steps of the run: n_tokens in batches of batch_tokens, the last partial."""
        return math.ceil(self.n_tokens / self.batch_tokens)


# Evaluations beyond the held-out pass (core, per-position, temporal), which always runs.
EVAL_FAMILIES = ("structure", "smoothness", "preservation", "probing", "word_class",
                 "absorption")


@dataclass
class EvalConfig:
    """Evaluation of a trained SAE (posae/conf/eval/): after training and in
    `python -m posae.evaluate`."""

    enabled: bool = True
    families: list[str] = field(default_factory=lambda: list(EVAL_FAMILIES))
    # Held-out sequences for the cache-based metrics (null: all of them).
    max_sequences: Optional[int] = None
    batch_sequences: int = 32
    device: str = "auto"
    preservation_sequences: int = 64
    position_buckets: int = 8
    position_probe_tokens: int = 8000
    cluster_latents: int = 512
    max_clusters: int = 12
    # Files in posae/conf/probing/, each a sparse-probing task.
    probing_tasks: list[str] = field(default_factory=lambda: ["stdlib_packages"])
    probing: dict = field(default_factory=dict)
    absorption: dict = field(default_factory=dict)
    plots: bool = True


def probing_task_file(name: str) -> Path:
    """posae/conf/probing/<name>.yaml, or an error naming the key and the tasks there are."""
    path = CONF_DIR / "probing" / f"{name}.yaml"
    if not path.exists():
        have = ", ".join(sorted(p.stem for p in path.parent.glob("*.yaml")))
        raise ConfigError(f"eval.probing_tasks: no task {name!r} in posae/conf/probing/ "
                          f"(have: {have})")
    return path


def eval_config(node: Any) -> EvalConfig:
    """Typed evaluation settings, every part checked (task files, probing and absorption
    settings) so that a bad key fails before training or evaluation starts."""
    from posae.eval.absorption import AbsorptionConfig
    from posae.eval.sparse_probing import probing_config

    cfg = typed(node, EvalConfig, "eval")
    for family in cfg.families:
        _choice(family, EVAL_FAMILIES, "eval.families")
    for name in cfg.probing_tasks:
        probing_task_file(name)
    probing_config(cfg.probing)
    typed(OmegaConf.create(cfg.absorption), AbsorptionConfig, "eval.absorption")
    for key in ("batch_sequences", "preservation_sequences", "position_buckets",
                "position_probe_tokens", "cluster_latents", "max_clusters"):
        positive_int(getattr(cfg, key), f"eval.{key}")
    return cfg


def optim_config(node: Any) -> OptimConfig:
    cfg = typed(node, OptimConfig, "optim")
    _choice(cfg.name, OPTIMIZERS, "optim.name")
    _choice(cfg.schedule, LR_SCHEDULES, "optim.schedule")
    if not cfg.lr > 0:
        raise ConfigError(f"optim.lr: must be positive, got {cfg.lr}")
    if len(cfg.betas) != 2 or not all(0 <= b < 1 for b in cfg.betas):
        raise ConfigError(f"optim.betas: must be two numbers in [0, 1), got {cfg.betas}")
    if not cfg.weight_decay >= 0:
        raise ConfigError(f"optim.weight_decay: must be non-negative, got {cfg.weight_decay}")
    if cfg.warmup_steps < 0:
        raise ConfigError(f"optim.warmup_steps: must be non-negative, got {cfg.warmup_steps}")
    if not 0 <= cfg.min_lr_ratio <= 1:
        raise ConfigError(f"optim.min_lr_ratio: must be in [0, 1], got {cfg.min_lr_ratio}")
    return cfg


def legacy_resample_keys(node: DictConfig) -> DictConfig:
    """A saved trainer config from before `trainer.resample` (resample_select, _fraction,
    _gamma) as today's, so that older run folders still evaluate and report."""
    if "resample_select" not in node:
        return node
    old = OmegaConf.to_container(node, resolve=True)
    select = old.pop("resample_select")
    fraction, gamma = old.pop("resample_fraction", 0.1), old.pop("resample_gamma", 5.0)
    _choice(select, tuple(RESAMPLE_POLICIES), "trainer.resample_select")
    policy = {"_target_": f"posae.training.resampling.{RESAMPLE_POLICIES[select]}"}
    policy.update({"random": {"fraction": fraction},
                   "temporal_importance": {"fraction": fraction, "gamma": gamma}}.get(select, {}))
    return OmegaConf.create({**old, "resample": policy})


def trainer_config(node: Any, context_size: int) -> TrainerConfig:
    from posae.training.resampling import resample_policy

    cfg = typed(legacy_resample_keys(node) if isinstance(node, DictConfig) else node,
                TrainerConfig, "trainer")
    _choice(cfg.mixed_precision, MIXED_PRECISION, "trainer.mixed_precision")
    resample_policy(cfg.resample)  # refused here, before any compute, if it cannot be built
    window = context_size if cfg.window is None else cfg.window
    if not 1 <= window <= context_size:
        raise ConfigError(f"trainer.window: must be in 1..context_size={context_size}, "
                          f"got {cfg.window}")
    cfg.window = window
    if cfg.batch_tokens < window or cfg.batch_tokens % window:
        raise ConfigError(f"trainer.batch_tokens={cfg.batch_tokens} must be a multiple of the "
                          f"window ({window} tokens)")
    if not 0 < cfg.eval_fraction < 1:
        raise ConfigError(f"trainer.eval_fraction: must be in (0, 1), got {cfg.eval_fraction}")
    for key in ("n_tokens", "micro_batches", "checkpoint_every", "keep_checkpoints", "log_every",
                "dead_after_tokens"):
        positive_int(getattr(cfg, key), f"trainer.{key}")
    if cfg.grad_clip is not None and not cfg.grad_clip > 0:  # ≤ 0 would ascend the gradient
        raise ConfigError(f"trainer.grad_clip: must be positive or null (no clipping), "
                          f"got {cfg.grad_clip}")
    if cfg.resample_every < 0:
        raise ConfigError(f"trainer.resample_every: must be non-negative, got "
                          f"{cfg.resample_every}")
    return cfg
