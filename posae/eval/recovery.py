"""Recovery of a planted dictionary (`dataset=synthetic`, posae/data/synthetic.py).

For each true feature D_i: its best latent l*(i) = argmax_l cos(D_i, W_dec[l]) and the
max cosine similarity; a feature counts as recovered when that cosine exceeds
`threshold` (0.9). Reported per family (invariant, position_specific, persistent) and
over all. For recovered position-specific features, the share of the best latent's firing
(per-position firing rates on held-out data, summed) that falls inside the planted range:
near 1 when the latent fires where the feature does. The position code's alignment is the
largest norm of a unit decoder row's projection onto the code's plane (1: a latent lies in
the plane).
"""

from __future__ import annotations

import numpy as np

from posae.data.synthetic import FAMILIES, SyntheticActivations
from posae.sae.base import SAE

IN_RANGE_SHARE = 0.9


def unit_decoder_rows(sae: SAE) -> np.ndarray:
    W = sae.W_dec.detach().double().cpu().numpy()
    return W / np.maximum(np.linalg.norm(W, axis=1, keepdims=True), 1e-12)


def recovery(sae: SAE, source: SyntheticActivations, firing_rate: np.ndarray,
             positions: np.ndarray, threshold: float = 0.9) -> dict:
    """Recovery metrics; `firing_rate` [len(positions), d_sae] from the held-out pass."""
    W = unit_decoder_rows(sae)
    cos = source.dictionary @ W.T                                        # [n_true, d_sae]
    best, max_cos = cos.argmax(1), cos.max(1)
    out: dict = {"threshold": threshold}
    for index, family in enumerate(FAMILIES):
        of_family = source.family == index
        out[family] = {
            "n_features": int(of_family.sum()),
            "mean_max_cosine": float(max_cos[of_family].mean()) if of_family.any() else None,
            "recovered_fraction": float((max_cos[of_family] > threshold).mean())
            if of_family.any() else None,
        }
    out["all"] = {"n_features": len(max_cos), "mean_max_cosine": float(max_cos.mean()),
                  "recovered_fraction": float((max_cos > threshold).mean())}
    specific = np.flatnonzero(source.family == FAMILIES.index("position_specific"))
    recovered = [j for j in range(len(specific)) if max_cos[specific[j]] > threshold]
    in_range = source.in_range()[positions]                              # [P, n_specific]
    shares = []
    for j in recovered:
        rate = firing_rate[:, best[specific[j]]]
        shares.append(float(rate[in_range[:, j]].sum() / rate.sum()) if rate.sum() > 0 else 0.0)
    out["position_specific"].update(
        in_range_share=float(np.mean(shares)) if shares else None,
        fires_in_range_fraction=float(np.mean(np.array(shares) >= IN_RANGE_SHARE))
        if shares else None)
    projection = W @ source.position_plane.T                             # [d_sae, 2]
    out["position_code_alignment"] = float(np.linalg.norm(projection, axis=1).max())
    out["_max_cosine"] = max_cos
    out["_family"] = source.family
    return out
