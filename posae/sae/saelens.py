"""The SAELens folder format (sae-lens 6): how posae writes its SAEs, and how it reads
SAELens SAEs it did not train (docs/ARCHITECTURE.md, "Saved SAEs").

cfg.json carries sae-lens's top-level fields (architecture, d_in, d_sae, dtype,
apply_b_dec_to_input, normalize_activations, and the architecture's own) and a `metadata`
block (hook_name in TransformerLens naming, model_name, context_size, prepend_bos,
exclude_special_tokens), with posae's typed config and provenance under `metadata.posae`.
sae_weights.safetensors uses sae-lens's parameter names:

    posae                  sae-lens      weights and fields
    relu                   standard      W_enc b_enc W_dec b_dec
    topk                   topk          the same, k
    jumprelu               jumprelu      threshold = exp(log_threshold)
    batchtopk, matryoshka  jumprelu      threshold = θ for every latent: BatchTopK's
                                         inference rule pre·1[pre > θ], θ ≥ 0
    gated                  gated         b_gate = b_enc, r_mag, b_mag
    temporal_sae           temporal      input_scale as constant_scalar_rescale, b_dec·scale
    any other              posae_<name>  posae's own names: only posae builds these

Every folder is written with the input scale folded in (normalize_activations "none"),
except the Temporal SAE's, whose attention is not scale-equivariant.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from posae.config import ConfigError
from posae.sae.base import SAE, SAEConfig
from posae.sae.gated import GatedSAE
from posae.sae.jumprelu import JumpReLUConfig, JumpReLUSAE
from posae.sae.relu import ReLUSAE
from posae.sae.topk import TopKConfig, TopKSAE

# The sae-lens version these folders are checked against (the `dev` extra's pin); sae-lens
# reads a folder stamped below 6.0 as a legacy config and drops its metadata.
SAELENS_VERSION = "6.54.12"
OWN_PREFIX = "posae_"

State = dict[str, Tensor]


@dataclass(frozen=True)
class Layout:
    """How one posae architecture's state maps onto a sae-lens architecture's."""

    saelens: str
    # posae SAE -> (extra cfg.json fields, weights by sae-lens name, posae-only scalars)
    export: Callable[[SAE, State], tuple[dict, State, dict]]
    # (cfg.json record, weights by sae-lens name, posae-only scalars) -> posae state dict
    restore: Callable[[dict, State, dict], State]


def _same(sae, state):
    return {}, state, {}


def _same_back(record, weights, extra):
    return weights


def _topk(sae, state):
    return {"k": sae.cfg.k, "rescale_acts_by_decoder_norm": False}, state, {}


def _jumprelu(sae, state):
    state["threshold"] = state.pop("log_threshold").exp()
    return {}, state, {}


def _jumprelu_back(record, weights, extra):
    weights["log_threshold"] = weights.pop("threshold").log()
    return weights


def _batchtopk(sae, state):
    state["threshold"] = state["threshold"].expand(sae.cfg.d_sae).clone()
    return {}, state, {"threshold_batches": int(state.pop("threshold_batches"))}


def _batchtopk_back(record, weights, extra):
    weights["threshold"] = weights["threshold"][0].clone()
    weights["threshold_batches"] = torch.tensor(extra["threshold_batches"])
    return weights


def _gated(sae, state):
    state["b_gate"] = state.pop("b_enc")
    return {}, state, {}


def _gated_back(record, weights, extra):
    weights["b_enc"] = weights.pop("b_gate")
    return weights


def _temporal(sae, state):
    """sae-lens rescales x by the factor before subtracting b_dec; posae after."""
    scale = float(state.pop("input_scale"))
    cfg = sae.cfg
    state["b_dec"] = state["b_dec"] * scale
    return {"normalize_activations": "constant_scalar_rescale",
            "activation_normalization_factor": scale, "n_heads": cfg.n_heads,
            "n_attn_layers": cfg.n_attn_layers, "bottleneck_factor": cfg.bottleneck_factor,
            "sae_diff_type": "topk", "kval_topk": cfg.k, "tied_weights": True}, state, {}


def _temporal_back(record, weights, extra):
    scale = record["activation_normalization_factor"]
    weights["input_scale"] = torch.tensor(float(scale))
    weights["b_dec"] = weights["b_dec"] / scale
    return weights


LAYOUTS: dict[str, Layout] = {
    "relu": Layout("standard", _same, _same_back),
    "topk": Layout("topk", _topk, _same_back),
    "jumprelu": Layout("jumprelu", _jumprelu, _jumprelu_back),
    "batchtopk": Layout("jumprelu", _batchtopk, _batchtopk_back),
    "matryoshka_batchtopk": Layout("jumprelu", _batchtopk, _batchtopk_back),
    "gated": Layout("gated", _gated, _gated_back),
    "temporal_sae": Layout("temporal", _temporal, _temporal_back),
}


def layout(arch: str) -> Layout:
    """The mapping of posae architecture `arch`; position-aware ones keep posae's names."""
    return LAYOUTS.get(arch, Layout(OWN_PREFIX + arch, _same, _same_back))


def saelens_metadata(provenance: dict) -> dict:
    """sae-lens's `metadata` fields from a run's provenance (posae.train.sae_provenance):
    posae caches the residual stream after block `layer`, TransformerLens's
    blocks.<layer>.hook_resid_post."""
    if "layer" not in provenance:
        return {}
    return {"model_name": provenance.get("model", {}).get("name"),
            "hook_name": f"blocks.{provenance['layer']}.hook_resid_post",
            "context_size": provenance.get("context_size"),
            "prepend_bos": provenance.get("prepend_bos"),
            "exclude_special_tokens": not provenance.get("train_on_special_tokens", False),
            "dataset_path": provenance.get("dataset")}


def to_saelens(sae: SAE, posae_block: dict, provenance: dict) -> tuple[dict, State]:
    """(cfg.json record, weights) of `sae` in the SAELens format, `posae_block` (posae's
    architecture, format version and typed config) and `provenance` under metadata.posae."""
    state = {k: v.detach().contiguous().cpu() for k, v in sae.state_dict().items()}
    mapping = layout(sae.cfg.arch)
    fields, weights, extra = mapping.export(sae, state)
    record = {"architecture": mapping.saelens, "d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae,
              "dtype": str(sae.W_dec.dtype).removeprefix("torch."),
              "apply_b_dec_to_input": True, "normalize_activations": "none",
              "reshape_activations": "none", **fields,
              "metadata": {"sae_lens_version": SAELENS_VERSION, **saelens_metadata(provenance),
                           "posae": {**posae_block, **provenance,
                                     **({"scalars": extra} if extra else {})}}}
    return record, {k: v.contiguous() for k, v in weights.items()}


def restore_state(record: dict, weights: State) -> State:
    """posae's state dict from a folder posae wrote (`to_saelens`'s inverse)."""
    posae = record["metadata"]["posae"]
    return layout(posae["architecture"]).restore(record, dict(weights), posae.get("scalars", {}))


# What `import_saelens` reads: sae-lens architecture -> (posae class, its config class)
IMPORTABLE = {"standard": (ReLUSAE, SAEConfig), "topk": (TopKSAE, TopKConfig),
              "jumprelu": (JumpReLUSAE, JumpReLUConfig), "gated": (GatedSAE, SAEConfig)}
POSAE_NAME = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu", "gated": "gated"}


def hook_layer(hook_name: str | None) -> int | None:
    """The posae layer of a TransformerLens residual hook: blocks.L.hook_resid_post is
    layer L, blocks.L.hook_resid_pre layer L - 1 (the same tensor); None for any other."""
    match = re.fullmatch(r"blocks\.(\d+)\.hook_resid_(pre|post)", hook_name or "")
    if not match:
        return None
    layer = int(match.group(1)) - (match.group(2) == "pre")
    return layer if layer >= 0 else None


def is_pre_6(record: dict) -> bool:
    """A folder written before sae-lens 6 (no sae_lens_version >= 6 anywhere)."""
    version = record.get("sae_lens_version") or (record.get("metadata") or {}).get(
        "sae_lens_version")
    try:
        return not version or int(str(version).split(".")[0]) < 6
    except ValueError:
        return True


def upgrade_pre_6(record: dict) -> dict:
    """A pre-6.0 cfg.json in sae-lens 6's terms, as sae-lens reads one: hook_point is
    hook_name, the architecture defaults to standard (topk when activation_fn_str is topk
    with a k), a boolean normalize_activations is "none" (False) or
    "expected_average_only_in" (True), hook_z hooks reshape."""
    old = {{"hook_point": "hook_name", "activation_fn_str": "activation_fn"}.get(k, k): v
           for k, v in record.items()}
    new = {"apply_b_dec_to_input": True, "architecture": "standard", **old}
    k = (old.get("activation_fn_kwargs") or {}).get("k")
    if old.get("activation_fn") == "topk" and k is not None:
        new.update(architecture="topk", k=k)
    norm = old.get("normalize_activations")
    new["normalize_activations"] = ("none" if not norm else "expected_average_only_in"
                                    if norm is True else norm)
    hook = old.get("hook_name") or ""
    new.setdefault("reshape_activations", "hook_z" if "hook_z" in hook else "none")
    new["metadata"] = {**(old.get("metadata") or {}), "hook_name": hook or None}
    return new


# What each importable architecture's folder must hold
REQUIRED = {"standard": {"W_enc", "b_enc", "W_dec", "b_dec"},
            "topk": {"W_enc", "b_enc", "W_dec", "b_dec", "k"},
            "jumprelu": {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"},
            "gated": {"W_enc", "b_gate", "r_mag", "b_mag", "W_dec", "b_dec"}}


def first_lines(err: Exception, n: int = 3) -> str:
    """The first lines of an error (load_state_dict puts what differs on the second)."""
    return " ".join(line.strip() for line in str(err).splitlines()[:n])[:600]


def import_saelens(record: dict, weights: State, source: str) -> SAE:
    """A posae SAE computing the same codes and reconstruction as the SAELens SAE of
    cfg.json `record` and `weights` (sae-lens names) from `source` (named in errors).

    Folded: apply_b_dec_to_input=false (Gemma Scope) as b_enc += b_dec·W_enc (and the gated
    magnitude bias by exp(r_mag)); TopK's rescale_acts_by_decoder_norm into W_enc, b_enc and
    W_dec; a pre-6.0 cfg.json read as sae-lens reads it (`upgrade_pre_6`); negative JumpReLU
    thresholds as 0 (sae-lens ReLUs before its gate, so θ < 0 acts as θ = 0). Refused: a
    normalize_activations other than none, hook_z SAEs, a finetuning scaling factor that is
    not all ones, missing weights or fields."""
    if is_pre_6(record):
        record = upgrade_pre_6(record)
    arch = record.get("architecture")
    if arch not in IMPORTABLE:
        raise ConfigError(f"{source}: sae-lens architecture {arch!r} cannot be imported; "
                          f"posae reads {', '.join(IMPORTABLE)}")
    hook = (record.get("metadata") or {}).get("hook_name") or record.get("hook_name") or ""
    if record.get("reshape_activations", "none") != "none" or hook.endswith("hook_z"):
        raise ConfigError(f"{source}: an SAE on attention heads' hook_z (reshape_activations "
                          f"{record.get('reshape_activations')!r}, hook {hook!r}): posae "
                          f"caches the residual stream only")
    norm = record.get("normalize_activations", "none")
    if norm != "none":
        raise ConfigError(f"{source}: normalize_activations {norm!r} cannot be folded into "
                          f"the weights (only 'none' is read); fold it with sae-lens first "
                          f"(e.g. fold_activation_norm_scaling_factor) and save again")
    w = {k: v.detach().float().cpu().clone() for k, v in weights.items()}
    scaling = w.pop("scaling_factor", None)
    if scaling is not None and not bool((scaling == 1).all()):
        raise ConfigError(f"{source}: a finetuning scaling_factor other than ones; posae "
                          f"does not read it")
    if missing := sorted(REQUIRED[arch] - set(w) - set(record)):  # weights, or k in cfg.json
        raise ConfigError(f"{source}: a sae-lens {arch} SAE needs {', '.join(missing)}, "
                          f"which it lacks")
    b_gate_name = "b_gate" if arch == "gated" else "b_enc"
    if not record.get("apply_b_dec_to_input", True):
        shift = w["b_dec"] @ w["W_enc"]
        w[b_gate_name] += shift
        if arch == "gated":
            w["b_mag"] += w["r_mag"].exp() * shift
    if record.get("rescale_acts_by_decoder_norm", False):
        norms = w["W_dec"].norm(dim=1)
        w["W_enc"] *= norms
        w["b_enc"] *= norms
        w["W_dec"] /= norms[:, None]
    if arch == "jumprelu":
        w["log_threshold"] = w.pop("threshold").clamp_min(0).log()
    if arch == "gated":
        w["b_enc"] = w.pop("b_gate")
    cls, config_cls = IMPORTABLE[arch]
    extra = {"k": int(record["k"])} if arch == "topk" else {}
    cfg = config_cls(name=POSAE_NAME[arch], d_in=int(record["d_in"]),
                     width=int(record["d_sae"]), normalize_decoder=False, **extra)
    sae = cls(cfg)
    try:
        sae.load_state_dict(w)
    except RuntimeError as err:
        raise ConfigError(f"{source}: its weights are not a sae-lens {arch} SAE's of the "
                          f"shapes cfg.json gives ({first_lines(err)})") from None
    return sae.eval()


def import_pretrained(release: str, sae_id: str) -> tuple[SAE, dict]:
    """A published SAE by SAELens release and id (network access; sae-lens installed), as
    a posae SAE and its sae-lens cfg.json record."""
    try:
        from sae_lens import SAE as SAELensSAE
    except ImportError:
        raise ConfigError("release/sae_id: loading a published SAE needs sae-lens "
                          "(pip install 'posae[dev]' or pip install sae-lens)") from None
    theirs = SAELensSAE.from_pretrained(release, sae_id, device="cpu")
    return from_saelens_object(theirs, f"{release}/{sae_id}")


def from_saelens_object(theirs, source: str) -> tuple[SAE, dict]:
    """(posae SAE, cfg.json record) of an SAE object sae-lens built."""
    record = theirs.cfg.to_dict()
    record["metadata"] = dict(record.get("metadata") or {})
    return import_saelens(record, theirs.state_dict(), source), record

