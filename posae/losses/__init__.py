"""Loss terms, one module per family; `conf/loss/<term>.yaml` names each by `_target_`."""

from __future__ import annotations

from hydra.utils import get_class, instantiate
from omegaconf import DictConfig

from posae.config import ConfigError
from posae.losses.base import Coefficient, LossTerm, StepContext


def build_loss_terms(loss_cfg: DictConfig) -> dict[str, LossTerm]:
    """Instantiate each selected term of `loss=[...]` by its `_target_`, which must name a
    LossTerm class: the class is resolved and checked before anything is called."""
    terms = {}
    for name, node in loss_cfg.items():
        if "_target_" not in node:
            raise ConfigError(f"loss.{name}: needs a _target_ naming its LossTerm class")
        try:
            cls = get_class(node._target_)
        except Exception as err:
            raise ConfigError(f"loss.{name}: _target_ {node._target_!r}: {err}") from None
        if not (isinstance(cls, type) and issubclass(cls, LossTerm)):
            raise ConfigError(f"loss.{name}: {node._target_} is not a LossTerm")
        try:
            terms[name] = instantiate(node)
        except Exception as err:  # Hydra wraps the cause; name the term in the message
            raise ConfigError(f"loss.{name}: {err}") from None
    if not terms:
        raise ConfigError("loss: select at least one term, e.g. loss=[mse,l1]")
    return terms


def check_contracts(terms: dict[str, LossTerm], variant: str, architecture: type) -> None:
    """Every input a loss term reads from the SAE output is one the architecture provides
    (`LossTerm.requires` ⊆ `SAE.provides`); checked before any cache is opened."""
    from posae.sae import REGISTRY

    for name, term in terms.items():
        missing = [key for key in term.requires if key not in architecture.provides]
        if missing:
            able = sorted(arch for arch, cls in REGISTRY.items()
                          if set(term.requires) <= cls.provides)
            raise ConfigError(
                f"loss.{name} ({type(term).__name__}) reads {', '.join(missing)} from the SAE "
                f"output, which variant={variant} (architecture {architecture.__name__}) does "
                f"not provide; use a variant whose architecture does ({', '.join(able)}) or "
                f"drop {name} from loss=[...]")


__all__ = ["Coefficient", "LossTerm", "StepContext", "build_loss_terms", "check_contracts"]
