"""Gated SAE (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated SAEs").

    π_gate = (x - b_dec) W_gate + b_gate,         f_gate = 1[π_gate > 0]
    π_mag  = (x - b_dec) (exp(r_mag) ⊙ W_gate) + b_mag = exp(r_mag) ⊙ (π_gate - b_gate) + b_mag
    f      = f_gate ⊙ ReLU(π_mag),                x̂ = f W_dec + b_dec

W_gate is the shared `W_enc` and b_gate the shared `b_enc`. Their loss adds
λ‖ReLU(π_gate)‖₁ (the `l1` term reads `extras["l1_codes"]`) and the auxiliary
reconstruction ‖x - x̂_frozen(ReLU(π_gate))‖² through a frozen decoder (`gated_aux`).
π_mag is computed from π_gate (the right-hand identity): one encoder matmul, not two, and
only where the gate is open when few are (the codes are then `SparseCodes`, as TopK's).
The frozen-decoder reconstruction only trains, so only a module in training mode
computes it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from posae.sae.base import SAE
from posae.sae.sparse import SparseCodes, is_sparse, linear_decode, selected_pre_activations


class GatedSAE(SAE):
    provides = frozenset({"l1_codes", "aux_x_hat"})
    decodes_sparsely = True  # f = 0 where the gate is shut or the magnitude ReLU is

    def __init__(self, cfg):
        super().__init__(cfg)
        self.r_mag = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_mag = nn.Parameter(torch.zeros(cfg.d_sae))

    def magnitudes(self, gate: Tensor, latents: Tensor | slice = slice(None)) -> Tensor:
        """ReLU(π_mag) = ReLU(exp(r_mag) ⊙ (π_gate - b_gate) + b_mag) for gate values π_gate
        of the given latents (all by default)."""
        return torch.relu(self.r_mag.exp()[latents] * (gate - self.b_enc[latents])
                          + self.b_mag[latents])

    def gated_codes(self, x: Tensor, pre: Tensor) -> Tensor | SparseCodes:
        """f = 1[π_gate > 0] ⊙ ReLU(π_mag) from the gate pre-activations π_gate; when few
        gates are open, as `SparseCodes` over the open ones (π_mag computed there alone,
        its gradient through the sparse backward of `selected_pre_activations`)."""
        open_gates = pre.detach() > 0
        if not is_sparse(open_gates):
            return open_gates * self.magnitudes(pre)
        tokens, latents = open_gates.reshape(-1, pre.shape[-1]).nonzero().unbind(1)
        gate = selected_pre_activations(x, self.b_dec, self.W_enc, self.b_enc, pre, tokens,
                                        latents)
        return SparseCodes(tokens, latents, self.magnitudes(gate, latents), pre.shape)

    def encode_with_pre(self, x, pos, mask):
        pre = self.pre_activations(x)
        gate_codes = torch.relu(pre)
        extras = {"l1_codes": gate_codes}
        if self.training:
            aux = linear_decode(gate_codes, self.W_dec.detach())
            extras["aux_x_hat"] = aux + self.b_dec.detach()
        return self.gated_codes(x, pre), pre, extras
