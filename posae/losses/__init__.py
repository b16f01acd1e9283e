"""Loss terms, one module per family; `conf/loss/<term>.yaml` names each by `_target_`."""

from __future__ import annotations

from hydra.utils import instantiate
from omegaconf import DictConfig

from posae.config import ConfigError
from posae.losses.base import Coefficient, LossTerm, StepContext


def build_loss_terms(loss_cfg: DictConfig) -> dict[str, LossTerm]:
    """Instantiate each selected term of `loss=[...]` by its `_target_`."""
    terms = {}
    for name, node in loss_cfg.items():
        if "_target_" not in node:
            raise ConfigError(f"loss.{name}: needs a _target_ naming its LossTerm class")
        try:
            terms[name] = instantiate(node)
        except Exception as err:  # Hydra wraps the cause; name the term in the message
            raise ConfigError(f"loss.{name}: {err}") from None
        if not isinstance(terms[name], LossTerm):
            raise ConfigError(f"loss.{name}: {node._target_} is not a LossTerm")
    if not terms:
        raise ConfigError("loss: select at least one term, e.g. loss=[mse,l1]")
    return terms


__all__ = ["Coefficient", "LossTerm", "StepContext", "build_loss_terms"]
