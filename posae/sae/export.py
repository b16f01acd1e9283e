"""The SAE a training run leaves behind. Trained on `scale * x` (docs/ARCHITECTURE.md,
"Training": normalisation), it is saved with the scale folded into its weights, so that it
reads the model's raw activations with identical codes, and with its provenance: where
those activations come from."""

from __future__ import annotations

import copy
from pathlib import Path

from posae.sae import save_sae
from posae.sae.base import SAE
from posae.sae.saelens import save_temporal_for_saelens
from posae.sae.temporal import TemporalSAE

SAELENS_FOLDER = "saelens"


def save_folded(sae: SAE, scale: float, folder: Path, provenance: dict) -> SAE:
    """Save to `folder` a copy of `sae` that acts on raw x (`SAE.fold_input_scale_`), its
    cfg.json recording `provenance` (model, layer, hook, cache, held-out split, ...) and
    the folded scale (`folded_input_scale`); return that copy, in eval mode. `sae` itself
    is left as it is. A Temporal SAE is also written for sae-lens, in `folder/saelens/`
    (posae.sae.saelens)."""
    final = copy.deepcopy(sae).eval()
    final.fold_input_scale_(scale)
    save_sae(final, folder, {**provenance, "folded_input_scale": scale})
    if isinstance(final, TemporalSAE):
        metadata = {"model_name": provenance.get("model", {}).get("name"),
                    "hook_name": provenance.get("hook"),
                    "context_size": provenance.get("context_size"),
                    "exclude_special_tokens": not provenance.get("train_on_special_tokens")}
        save_temporal_for_saelens(final, folder / SAELENS_FOLDER, metadata)
    return final
