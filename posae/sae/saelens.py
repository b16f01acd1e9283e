"""SAE folders that sae-lens (6.x) loads with `sae_lens.SAE.load_from_disk`.

So far the Temporal SAE (sae-lens architecture `temporal`, "Priors in Time"): its input
scale cannot be folded into the weights (attention is not scale-equivariant), so it is
written as sae-lens's `constant_scalar_rescale` with `activation_normalization_factor`,
and b_dec moves into the rescaled space. Checked against the installed sae-lens in
tests/test_temporal_saes.py.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from posae.sae.temporal import TemporalSAE

SAELENS_CONFIG, SAELENS_WEIGHTS = "cfg.json", "sae_weights.safetensors"
# The sae-lens version these folders are checked against (the `dev` extra's pin); sae-lens
# reads a folder stamped below 6.0 as a legacy config and drops its metadata.
SAELENS_VERSION = "6.54.12"


def save_temporal_for_saelens(sae: TemporalSAE, folder: Path, metadata: dict | None = None
                              ) -> None:
    """Write `sae` to `folder` as sae-lens's `temporal` SAE. `metadata` (hook_name in
    TransformerLens naming, model_name, context_size, ...) goes under cfg.json's
    `metadata`, where sae-lens 6 reads it."""
    if not isinstance(sae, TemporalSAE):
        raise TypeError(f"expected a Temporal SAE, got {type(sae).__name__}")
    cfg, scale = sae.cfg, float(sae.input_scale)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    record = {
        "architecture": "temporal", "d_in": cfg.d_in, "d_sae": cfg.d_sae, "dtype": "float32",
        "apply_b_dec_to_input": True, "normalize_activations": "constant_scalar_rescale",
        "activation_normalization_factor": scale, "reshape_activations": "none",
        "n_heads": cfg.n_heads, "n_attn_layers": cfg.n_attn_layers,
        "bottleneck_factor": cfg.bottleneck_factor,
        "sae_diff_type": "topk", "kval_topk": cfg.k,
        "tied_weights": True, "metadata": {"sae_lens_version": SAELENS_VERSION, **(metadata or {})},
    }
    (folder / SAELENS_CONFIG).write_text(json.dumps(record, indent=1))
    weights = {name: value.detach().float().contiguous().cpu()
               for name, value in sae.state_dict().items() if name != "input_scale"}
    weights["b_dec"] = weights["b_dec"] * scale  # sae-lens subtracts it after rescaling
    save_file(weights, str(folder / SAELENS_WEIGHTS))
