"""Read the residual stream after chosen blocks, stopping the forward after the deepest.

The hook point (docs/ARCHITECTURE.md, "Hook point") is the output of block L
(`blocks.L.hook_resid_post` in TransformerLens terms). HF's `output_hidden_states` would
give the same tensors for non-final blocks, but its last entry is taken after the final
norm in some models (Gemma-2), and it runs the whole model; a forward hook on block L does
neither.
"""

from __future__ import annotations

import torch
from torch import nn


class _StopForward(Exception):
    """Raised by the hook on the deepest requested block to skip the rest of the model."""


def hook_name(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"


def block_output(output: object) -> torch.Tensor:
    """HF blocks return a tensor or a tuple whose first entry is the hidden state."""
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def residual_stream(
    model: nn.Module,
    blocks: nn.ModuleList,
    layers: list[int],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> dict[int, torch.Tensor]:
    """Run `model` on a batch until the deepest of `layers`; return {layer: [B, T, d]}."""
    captured: dict[int, torch.Tensor] = {}
    deepest = max(layers)

    def hook_for(layer: int):
        def hook(module, args, output):
            captured[layer] = block_output(output)
            if layer == deepest:
                raise _StopForward

        return hook

    handles = [blocks[layer].register_forward_hook(hook_for(layer)) for layer in layers]
    try:
        model(input_ids=input_ids, attention_mask=attention_mask)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return captured
