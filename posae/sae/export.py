"""The SAE a training run leaves behind. Trained on `scale * x` (docs/ARCHITECTURE.md,
"Training": normalisation), it is saved with the scale folded into its weights, so that it
reads the model's raw activations with identical codes, and with its provenance: where
those activations come from."""

from __future__ import annotations

import copy
from pathlib import Path

from posae.sae import save_sae
from posae.sae.base import SAE


def save_folded(sae: SAE, scale: float, folder: Path, provenance: dict) -> SAE:
    """Save to `folder` (the SAELens format, posae.sae.saelens) a copy of `sae` that acts on
    raw x (`SAE.fold_input_scale_`), its cfg.json recording `provenance` (model, layer,
    hook, cache, held-out split, ...) and the folded scale (`folded_input_scale`); return
    that copy, in eval mode. `sae` itself is left as it is."""
    final = copy.deepcopy(sae).eval()
    final.fold_input_scale_(scale)
    save_sae(final, folder, {**provenance, "folded_input_scale": scale})
    return final
