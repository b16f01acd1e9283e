"""One folder both libraries read (posae.sae.saelens), checked against the installed,
pinned sae-lens (the `dev` extra): posae's baselines load in sae-lens with the same codes
and reconstruction, and SAELens SAEs (Gemma Scope's apply_b_dec_to_input=false, TopK's
decoder-norm rescaling) import into posae with the same."""

from __future__ import annotations

import json

import pytest
import sae_lens
import torch

from posae.config import ConfigError
from posae.sae import build_sae, load_sae, save_sae
from posae.sae.base import SAEConfig
from posae.sae.jumprelu import JumpReLUConfig
from posae.sae.saelens import SAELENS_VERSION, from_saelens_object, hook_layer
from posae.sae.topk import TopKConfig

D_IN, D_SAE = 12, 48
PROVENANCE = {"model": {"name": "gemma-2-2b", "hf_id": "google/gemma-2-2b"}, "layer": 12,
              "hook": "model.layers.12", "context_size": 128, "prepend_bos": True,
              "train_on_special_tokens": False, "dataset": "stdlib_docs"}
BASELINES = {"relu": ("standard", SAEConfig), "topk": ("topk", TopKConfig),
             "jumprelu": ("jumprelu", JumpReLUConfig), "batchtopk": ("jumprelu", TopKConfig),
             "gated": ("gated", SAEConfig)}


def perturbed(sae):
    """Random non-zero biases and weights, so that no term of the forward pass is idle."""
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return sae.eval()


def x_batch():
    return 3 * torch.randn(64, D_IN)


def test_installed_saelens_is_the_pinned_one():
    assert sae_lens.__version__ == SAELENS_VERSION


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_a_saved_baseline_loads_in_saelens_with_the_same_codes(name, tmp_path):
    """cfg.json's top-level fields and metadata as the SAELens format has them, and
    sae-lens's encode and forward equal posae's codes and reconstruction to 1e-5."""
    torch.manual_seed(0)
    saelens_name, config_cls = BASELINES[name]
    extra = {"k": 6} if config_cls is TopKConfig else {}
    sae = perturbed(build_sae(config_cls(name, d_in=D_IN, width=D_SAE, **extra)))
    if name == "batchtopk":
        sae.threshold.fill_(0.4)
    save_sae(sae, tmp_path, PROVENANCE)
    record = json.loads((tmp_path / "cfg.json").read_text())
    assert (record["architecture"], record["d_in"], record["d_sae"], record["dtype"]) == (
        saelens_name, D_IN, D_SAE, "float32")
    assert record["normalize_activations"] == "none" and record["apply_b_dec_to_input"]
    meta = record["metadata"]
    assert meta["hook_name"] == "blocks.12.hook_resid_post" and meta["model_name"] == "gemma-2-2b"
    assert meta["context_size"] == 128 and meta["prepend_bos"] and meta["exclude_special_tokens"]
    assert meta["posae"]["architecture"] == name and meta["posae"]["layer"] == 12

    theirs = sae_lens.SAE.load_from_disk(str(tmp_path))
    x = x_batch()
    ours = sae(x)
    codes = theirs.encode(x)
    assert 0 < (codes > 0).sum(-1).float().mean() < D_SAE  # sparse, not idle
    torch.testing.assert_close(codes, ours.f, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(theirs(x), ours.x_hat, atol=1e-5, rtol=1e-5)
    assert theirs.cfg.metadata.hook_name == "blocks.12.hook_resid_post"
    again = load_sae(tmp_path)  # posae reads the same folder back, exactly
    assert type(again) is type(sae) and again.cfg == sae.cfg
    assert all(torch.allclose(again.state_dict()[k], v, rtol=1e-6, atol=1e-6)
               for k, v in sae.state_dict().items())


SAELENS_CLASSES = {
    "standard": (sae_lens.StandardSAE, sae_lens.StandardSAEConfig),
    "topk": (sae_lens.TopKSAE, sae_lens.TopKSAEConfig),
    "jumprelu": (sae_lens.JumpReLUSAE, sae_lens.JumpReLUSAEConfig),
    "gated": (sae_lens.GatedSAE, sae_lens.GatedSAEConfig)}


def saelens_sae(arch: str, apply_b_dec_to_input: bool, **fields):
    """A sae-lens SAE of `arch` with random weights and biases."""
    sae_cls, cfg_cls = SAELENS_CLASSES[arch]
    theirs = sae_cls(cfg_cls(d_in=D_IN, d_sae=D_SAE, apply_b_dec_to_input=apply_b_dec_to_input,
                             **fields))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            p.copy_(0.3 * torch.randn_like(p) if name != "threshold" else 0.2 * torch.rand_like(p))
    return theirs


@pytest.mark.parametrize("arch,apply_b_dec,fields", [
    ("standard", True, {}), ("standard", False, {}),
    ("topk", True, {"k": 5}), ("topk", False, {"k": 5, "rescale_acts_by_decoder_norm": True}),
    ("jumprelu", False, {}),  # Gemma Scope's layout
    ("gated", True, {}), ("gated", False, {}),
])
def test_a_saelens_saved_sae_imports_with_the_same_codes(arch, apply_b_dec, fields, tmp_path):
    """Saved by sae-lens, loaded by posae: the same codes and reconstruction, after folding
    apply_b_dec_to_input=false and TopK's decoder-norm rescaling into the weights."""
    torch.manual_seed(1)
    theirs = saelens_sae(arch, apply_b_dec, **fields)
    theirs.cfg.metadata.hook_name = "blocks.5.hook_resid_post"
    theirs.save_model(str(tmp_path))
    ours = load_sae(tmp_path)
    x = x_batch()
    codes = theirs.encode(x)
    assert 0 < (codes > 0).sum(-1).float().mean() < D_SAE
    torch.testing.assert_close(ours.encode(x), codes, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours(x).x_hat, theirs(x), atol=1e-5, rtol=1e-5)
    in_memory, _ = from_saelens_object(theirs, "an SAE object")  # the from_pretrained path
    torch.testing.assert_close(in_memory.encode(x), codes, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("change,message", [
    ({"normalize_activations": "layer_norm"}, "normalize_activations 'layer_norm' cannot be"),
    ({"reshape_activations": "hook_z"}, "hook_z"),
    ({"architecture": "matching_pursuit"}, "'matching_pursuit' cannot be imported"),
])
def test_an_import_posae_cannot_fold_is_refused_naming_the_setting(change, message, tmp_path):
    theirs = saelens_sae("standard", True)
    theirs.save_model(str(tmp_path))
    record = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text(json.dumps({**record, **change}))
    with pytest.raises(ConfigError, match=message):
        load_sae(tmp_path)


def test_negative_jumprelu_thresholds_import_as_zero(tmp_path):
    """sae-lens gates ReLU(pre), so a threshold below 0 acts as 0: the same codes."""
    theirs = saelens_sae("jumprelu", True)
    with torch.no_grad():
        theirs.threshold[:10] = -0.1
    theirs.save_model(str(tmp_path))
    x = x_batch()
    torch.testing.assert_close(load_sae(tmp_path).encode(x), theirs.encode(x), atol=1e-5,
                               rtol=1e-5)


def test_a_pre_6_topk_folder_imports_as_saelens_reads_it(tmp_path):
    """A pre-6.0 cfg.json (architecture unset, activation_fn_str topk with its k,
    hook_point, boolean normalize_activations) is a TopK SAE, as for sae-lens."""
    theirs = saelens_sae("topk", True, k=4)
    theirs.save_model(str(tmp_path))
    record = {"d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "activation_fn_str": "topk",
              "activation_fn_kwargs": {"k": 4}, "hook_point": "blocks.1.hook_resid_post",
              "normalize_activations": False, "apply_b_dec_to_input": True}
    (tmp_path / "cfg.json").write_text(json.dumps(record))
    ours = load_sae(tmp_path)
    assert type(ours).__name__ == "TopKSAE"
    x = x_batch()
    torch.testing.assert_close(ours.encode(x), theirs.encode(x), atol=1e-5, rtol=1e-5)
    assert (ours.encode(x) > 0).sum(-1).max() <= 4


@pytest.mark.parametrize("drop,message", [("k", "needs k"), ("W_enc", "needs W_enc")])
def test_a_folder_missing_a_field_or_weight_is_refused_naming_it(drop, message, tmp_path):
    from safetensors.torch import load_file, save_file

    saelens_sae("topk", True, k=4).save_model(str(tmp_path))
    record = json.loads((tmp_path / "cfg.json").read_text())
    record.pop(drop, None)
    (tmp_path / "cfg.json").write_text(json.dumps(record))
    weights = load_file(str(tmp_path / "sae_weights.safetensors"))
    weights.pop(drop, None)
    save_file(weights, str(tmp_path / "sae_weights.safetensors"))
    with pytest.raises(ConfigError, match=message):
        load_sae(tmp_path)


def test_folders_of_posae_format_versions_1_and_2_still_load(tmp_path):
    """posae's layout before the SAELens format: cfg.json with `config` at the top and
    posae's parameter names; a pa_sae saved before version 2 is refused."""
    import dataclasses

    from safetensors.torch import save_file

    from posae.sae.pa_sae import PASAE

    sae = perturbed(build_sae(JumpReLUConfig("jumprelu", d_in=D_IN, width=D_SAE)))
    old = {"architecture": "jumprelu", "format_version": 2,
           "config": dataclasses.asdict(sae.cfg), "layer": 3}
    (tmp_path / "cfg.json").write_text(json.dumps(old))
    save_file({k: v.contiguous() for k, v in sae.state_dict().items()},
              str(tmp_path / "sae_weights.safetensors"))
    x = x_batch()
    assert torch.equal(load_sae(tmp_path).encode(x), sae.encode(x))
    pa = build_sae(PASAE.config_class("pa_sae", d_in=D_IN, width=D_SAE, context_size=8))
    (tmp_path / "cfg.json").write_text(json.dumps(
        {"architecture": "pa_sae", "format_version": 1, "config": dataclasses.asdict(pa.cfg)}))
    save_file({k: v.contiguous() for k, v in pa.state_dict().items()},
              str(tmp_path / "sae_weights.safetensors"))
    with pytest.raises(ConfigError, match="saved before format version 2"):
        load_sae(tmp_path)


@pytest.mark.parametrize("hook,layer", [("blocks.12.hook_resid_post", 12),
                                        ("blocks.12.hook_resid_pre", 11),
                                        ("blocks.0.hook_resid_pre", None),
                                        ("blocks.3.hook_mlp_out", None), (None, None)])
def test_hook_names_map_to_posae_layers(hook, layer):
    assert hook_layer(hook) == layer


def test_a_position_aware_sae_keeps_the_layout_under_a_posae_name(tmp_path):
    """The same cfg.json fields, posae's parameter names, architecture posae_<name>: posae
    loads it, sae-lens does not know the architecture (README, "SAELens ...")."""
    from posae.sae.pa_sae import PASAE

    sae = perturbed(build_sae(PASAE.config_class("pa_sae", d_in=D_IN, width=D_SAE,
                                                 context_size=8)))
    save_sae(sae, tmp_path, {"layer": 2})
    record = json.loads((tmp_path / "cfg.json").read_text())
    assert record["architecture"] == "posae_pa_sae" and record["d_sae"] == D_SAE
    assert record["metadata"]["hook_name"] == "blocks.2.hook_resid_post"
    with pytest.raises(KeyError, match="posae_pa_sae"):
        sae_lens.SAE.load_from_disk(str(tmp_path))
    x, pos = 3 * torch.randn(2, 8, D_IN), torch.arange(8).expand(2, 8)
    torch.testing.assert_close(load_sae(tmp_path).encode(x, pos), sae.encode(x, pos))
