"""SAE architectures, a name → class registry, and saving/loading without pickle.

A saved SAE is a folder in the SAELens format (posae.sae.saelens): `cfg.json`, with
posae's architecture name, typed config and the run's provenance under `metadata.posae`,
and `sae_weights.safetensors`. Loading looks the name up in `REGISTRY` (or imports the SAE
class a dotted name names); nothing else from the folder is executed. A SAELens folder
posae did not write is imported (standard, topk, jumprelu and gated SAEs).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from hydra.core.config_store import ConfigStore
from hydra.utils import get_class
from safetensors.torch import load_file, save_file

from posae.config import ConfigError, typed
from posae.sae import saelens
from posae.sae.base import SAE, SAEConfig, SAEOutput
from posae.sae.curriculum import CurriculumSAE
from posae.sae.gated import GatedSAE
from posae.sae.hierarchical import HierarchicalSAE
from posae.sae.jumprelu import JumpReLUSAE
from posae.sae.matryoshka import MatryoshkaBatchTopKSAE
from posae.sae.multiscale import MultiScaleSAE
from posae.sae.pa_sae import PASAE
from posae.sae.position_masked import PositionMaskedSAE, PositionMaskedTopKSAE, RangeEncoderSAE
from posae.sae.relu import ReLUSAE
from posae.sae.temporal import TemporalSAE
from posae.sae.topk import BatchTopKSAE, TopKSAE

REGISTRY: dict[str, type[SAE]] = {
    "relu": ReLUSAE,
    "topk": TopKSAE,
    "batchtopk": BatchTopKSAE,
    "jumprelu": JumpReLUSAE,
    "gated": GatedSAE,
    "matryoshka_batchtopk": MatryoshkaBatchTopKSAE,
    "curriculum": CurriculumSAE,
    "pa_sae": PASAE,
    "hierarchical": HierarchicalSAE,
    "position_masked": PositionMaskedSAE,
    "position_masked_topk": PositionMaskedTopKSAE,
    "range_encoders": RangeEncoderSAE,
    "multiscale": MultiScaleSAE,
    "temporal_sae": TemporalSAE,
}

# Filled in from the run, never configured: d_in by `sae_config` (the model's width), the
# context size by interpolation of the top-level `context_size`.
INJECTED = {"d_in": None, "context_size": "${context_size}"}


def register_schemas() -> None:
    """Each architecture's config dataclass as `architecture/<name>` in Hydra's ConfigStore:
    the one place its defaults live. A variant file selects one (`/architecture@variant:
    relu` in its defaults) and sets only what differs (docs/ARCHITECTURE.md, "Configs")."""
    store = ConfigStore.instance()
    for name, cls in REGISTRY.items():
        node = {}
        for field in dataclasses.fields(cls.config_class):
            if field.name in INJECTED:
                if INJECTED[field.name] is not None:
                    node[field.name] = INJECTED[field.name]
            elif field.default is not dataclasses.MISSING:
                node[field.name] = field.default
            elif field.default_factory is not dataclasses.MISSING:
                node[field.name] = field.default_factory()
            else:
                node[field.name] = "???"  # the variant must set it (its name)
        node["architecture"] = name
        store.store(group="architecture", name=name, node=node)


register_schemas()

CONFIG_FILE, WEIGHTS_FILE = "cfg.json", "sae_weights.safetensors"
# 2 (2026-12): PA-SAE rates stopped scaling the forward pass; the hierarchical SAE's routing
# gained per-head values and an output projection. Older saves of these compute other codes.
# 3 (2026-12): the SAELens folder format (posae.sae.saelens); 1 and 2 still load.
FORMAT_VERSION = 3
CHANGED_IN = {"pa_sae": 2, "hierarchical": 2}


def architecture(name: str) -> type[SAE]:
    """The SAE class of a registry name, or of a dotted class path (`mypackage.my_sae.MySAE`):
    a new architecture needs no entry here. A path must name an SAE subclass."""
    if name in REGISTRY:
        return REGISTRY[name]
    if "." in name:
        try:
            cls = get_class(name)
        except Exception as err:
            raise ConfigError(f"variant.architecture: {name!r}: {err}") from None
        if isinstance(cls, type) and issubclass(cls, SAE):
            return cls
        raise ConfigError(f"variant.architecture: {name} is not an SAE class")
    raise ConfigError(f"variant.name: unknown SAE architecture {name!r}; known: "
                      f"{', '.join(sorted(REGISTRY))}, or the dotted path of an SAE class")


def sae_config(variant, d_in: int) -> SAEConfig:
    """The typed config of `variant` (a composed posae/conf/variant node) for inputs of
    width d_in."""
    cls = architecture(variant.get("architecture") or variant.name)
    cfg = typed(variant, cls.config_class, "variant")
    cfg.d_in = d_in
    if cfg.d_sae < 1:
        raise ConfigError(f"variant: width {cfg.d_sae} must be positive")
    for key, choices in (("encoder_init", ("tied", "kaiming_uniform")),
                         ("decoder_init", ("normal", "orthogonal", "standard_normal"))):
        if getattr(cfg, key) not in choices:
            raise ConfigError(f"variant.{key}: {getattr(cfg, key)!r} is not one of {choices}")
    cfg.validate()
    return cfg


def build_sae(cfg: SAEConfig) -> SAE:
    return architecture(cfg.arch)(cfg)


def save_sae(sae: SAE, folder: Path, provenance: dict | None = None) -> None:
    """Write `sae` to `folder` in the SAELens format (posae.sae.saelens), `provenance` (the
    run's model, layer, hook, cache, held-out split, ...) in cfg.json's metadata."""
    folder.mkdir(parents=True, exist_ok=True)
    block = {"architecture": sae.cfg.arch, "format_version": FORMAT_VERSION,
             "config": dataclasses.asdict(sae.cfg)}
    record, weights = saelens.to_saelens(sae, block, provenance or {})
    (folder / CONFIG_FILE).write_text(json.dumps(record, indent=1))
    save_file(weights, str(folder / WEIGHTS_FILE))


def read_saved(folder: Path) -> tuple[dict, dict]:
    """(cfg.json record, posae's block) of a saved SAE folder: the block holds posae's
    architecture, typed config and provenance, and is empty for an SAE posae did not
    write. ConfigError names the file that is missing or unreadable."""
    config_file, weights_file = Path(folder) / CONFIG_FILE, Path(folder) / WEIGHTS_FILE
    for path in (config_file, weights_file):
        if not path.is_file():
            raise ConfigError(f"{path}: missing; {folder} is not a saved SAE folder (posae's "
                              f"or SAELens's: cfg.json and sae_weights.safetensors)")
    try:
        record = json.loads(config_file.read_text())
    except ValueError as err:
        raise ConfigError(f"{config_file}: not JSON ({err})") from None
    if not isinstance(record, dict):
        raise ConfigError(f"{config_file}: not an SAE config (a JSON object)")
    if "config" in record and "metadata" not in record:  # format versions 1 and 2
        return record, record
    return record, (record.get("metadata") or {}).get("posae") or {}


def load_sae(folder: Path, device: str = "cpu") -> SAE:
    """The SAE saved in `folder`: one posae wrote (`save_sae`, any format version) or any
    SAELens folder of an architecture posae imports (`saelens.import_saelens`). ConfigError
    names the file that is missing, unreadable or inconsistent with the other."""
    config_file, weights_file = Path(folder) / CONFIG_FILE, Path(folder) / WEIGHTS_FILE
    record, block = read_saved(folder)
    try:
        weights = load_file(str(weights_file))
    except Exception as err:  # safetensors' parse errors
        raise ConfigError(f"{weights_file}: unreadable ({str(err).splitlines()[0][:300]})"
                          ) from None
    if not block:
        return saelens.import_saelens(record, weights, str(folder)).to(device)
    try:
        cls = architecture(block["architecture"])
        config = cls.config_class(**block["config"])
    except (KeyError, TypeError) as err:
        raise ConfigError(f"{config_file}: not a posae SAE config ({type(err).__name__}: "
                          f"{err})") from None
    if block.get("format_version", 1) < CHANGED_IN.get(block["architecture"], 0):
        raise ConfigError(f"{config_file}: a {block['architecture']} SAE saved before format "
                          f"version {CHANGED_IN[block['architecture']]}, whose codes this "
                          f"version of posae computes differently; retrain it")
    if block is not record:
        weights = saelens.restore_state(record, weights)
    sae = cls(config)
    try:
        sae.load_state_dict(weights)
    except Exception as err:  # shapes or names that differ from cfg.json
        raise ConfigError(f"{weights_file}: does not hold the weights {config_file} describes "
                          f"({saelens.first_lines(err)})") from None
    return sae.to(device).eval()


__all__ = ["SAE", "SAEConfig", "SAEOutput", "REGISTRY", "build_sae", "load_sae", "read_saved",
           "save_sae", "sae_config"]
