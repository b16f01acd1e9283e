"""Language models: loading through transformers' Auto classes, residual-stream hooks."""

from posae.models.hooks import residual_stream
from posae.models.lm import LanguageModel, load_language_model, resolve_device

__all__ = ["LanguageModel", "load_language_model", "resolve_device", "residual_stream"]
