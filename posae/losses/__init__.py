"""Loss terms, one module per family; `posae/conf/loss/<term>.yaml` names each by `_target_`."""

from __future__ import annotations

from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, ListConfig

from posae.config import ConfigError
from posae.losses.base import Coefficient, LossTerm, StepContext


def check_targets(node, key: str, base: type) -> None:
    """Every `_target_` in `node` (a config read from the command line or from a run folder
    that may have been edited) must name a class that subclasses `base` at the top and
    `Coefficient` below it: each is resolved and checked before anything is instantiated,
    so no other callable can run."""
    if "_target_" in node:
        target = node["_target_"]
        try:
            cls = get_class(target)
        except Exception as err:
            raise ConfigError(f"{key}: _target_ {target!r}: {err}") from None
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise ConfigError(f"{key}: {target} is not a {base.__name__}")
    for child, value in node.items():
        for i, item in enumerate(value if isinstance(value, ListConfig) else [value]):
            if isinstance(item, DictConfig):  # Hydra instantiates inside lists too
                where = f"{key}.{child}[{i}]" if isinstance(value, ListConfig) else f"{key}.{child}"
                check_targets(item, where, Coefficient)


def build_loss_terms(loss_cfg: DictConfig) -> dict[str, LossTerm]:
    """Instantiate each selected term of `loss=[...]` by its `_target_`, which must name a
    LossTerm class (and any nested `_target_` a Coefficient class): every class is resolved
    and checked before anything is called."""
    terms = {}
    for name, node in loss_cfg.items():
        if "_target_" not in node:
            raise ConfigError(f"loss.{name}: needs a _target_ naming its LossTerm class")
        check_targets(node, f"loss.{name}", LossTerm)
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


def match_l0(sae_cfg, terms: dict[str, LossTerm], target: int) -> str:
    """Set the SAE's sparsity to `target` active latents (`match_l0=true`, the
    matched-sparsity protocol, docs/protocol.md) and say how: TopK-family architectures
    take k = target; otherwise the coefficient of the one sparsity penalty becomes a
    proportional-integral controller toward it (`IntegralL1`, starting from the configured
    value; an `IntegralL1` already configured keeps its gains and only takes the target)."""
    from posae.losses.controllers import IntegralL1

    if hasattr(sae_cfg, "k"):
        sae_cfg.k = target
        sae_cfg.validate()
        return f"variant.k = {target}"
    penalties = [name for name, term in terms.items() if term.sets_sparsity]
    if len(penalties) != 1:
        raise ConfigError(
            f"match_l0: variant={sae_cfg.name} needs a k or exactly one sparsity penalty "
            f"(l1, importance_l1, l0) in loss=[...] to set its L0, found "
            f"{penalties or 'none'} among {list(terms)}")
    term = terms[penalties[0]]
    if isinstance(term.coefficient, IntegralL1):
        term.coefficient.target = float(target)
    else:
        term.coefficient = IntegralL1(value=term.coefficient.value, target_l0=target)
    return f"loss.{penalties[0]}.coef under proportional-integral control toward L0 = {target}"


__all__ = ["Coefficient", "LossTerm", "StepContext", "build_loss_terms", "check_contracts",
           "match_l0"]
