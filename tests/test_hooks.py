"""posae's block hook gives the residual stream the models themselves report."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    BertConfig,
    BertModel,
    Gemma2Config,
    Gemma2ForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
)

from posae.config import ModelConfig
from posae.models.hooks import residual_stream
from posae.models.lm import find_blocks, wrap_model

N_LAYERS, D = 4, 32


def tiny_gemma2():
    config = Gemma2Config(vocab_size=128, hidden_size=D, intermediate_size=64,
                          num_hidden_layers=N_LAYERS, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=8, max_position_embeddings=64, sliding_window=8)
    return Gemma2ForCausalLM(config)


def tiny_gpt2():
    return GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=D, n_layer=N_LAYERS, n_head=4,
                                      n_positions=64))


def tiny_bert():
    return BertModel(BertConfig(vocab_size=128, hidden_size=D, num_hidden_layers=N_LAYERS,
                                num_attention_heads=4, intermediate_size=64,
                                max_position_embeddings=64))


MODELS = {"gemma2": (tiny_gemma2, "model.layers"), "gpt2": (tiny_gpt2, "transformer.h"),
          "bert": (tiny_bert, "encoder.layer")}


def build(name):
    torch.manual_seed(0)
    make, _ = MODELS[name]
    model = make().eval()
    cfg = ModelConfig(name=name, hf_id=name, kind="encoder" if name == "bert" else "causal",
                      n_layers=N_LAYERS, d_model=D)
    return wrap_model(cfg, model, tokenizer=None)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_hook_matches_output_hidden_states_for_non_final_layers(name):
    lm = build(name)
    assert lm.blocks_path == MODELS[name][1]
    ids = torch.randint(0, 128, (3, 20))
    with torch.no_grad():
        reference = lm.model(input_ids=ids, output_hidden_states=True).hidden_states
    captured = residual_stream(lm.model, lm.blocks, [0, 1, 2], ids)
    for layer in (0, 1, 2):
        # hidden_states[0] is the embedding output, so block L's output is entry L + 1
        torch.testing.assert_close(captured[layer], reference[layer + 1], rtol=0, atol=0)


def test_gemma2_last_hidden_state_is_after_the_final_norm():
    """Why the hook exists: for the final block, hidden_states[-1] is not the residual stream."""
    lm = build("gemma2")
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        last = lm.model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    captured = residual_stream(lm.model, lm.blocks, [N_LAYERS - 1], ids)[N_LAYERS - 1]
    torch.testing.assert_close(lm.model.model.norm(captured), last)
    assert not torch.allclose(captured, last)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_stops_after_the_deepest_requested_block(name):
    lm = build(name)
    calls = []
    handle = lm.blocks[2].register_forward_hook(lambda *args: calls.append(1))
    residual_stream(lm.model, lm.blocks, [0, 1], torch.randint(0, 128, (1, 8)))
    handle.remove()
    assert calls == []
    assert all(not h for h in (lm.blocks[0]._forward_hooks, lm.blocks[1]._forward_hooks))


def test_find_blocks_refuses_a_model_without_them():
    with pytest.raises(ValueError, match="no list of 7 blocks"):
        find_blocks(tiny_gpt2(), 7)
