"""The `python -m posae.*` entry points, run as a user runs them."""

from __future__ import annotations

import json
import re

import pytest
from conftest import run_module

SMALL = ["context_size=32", "n_tokens=2048", "cache.shard_sequences=16", "cache.device=cpu"]
TRAIN = ["trainer.n_tokens=2048", "trainer.batch_tokens=512", "trainer.cpu=true",
         "eval.enabled=false"]


@pytest.mark.slow
def test_train_builds_the_cache_when_missing_then_reuses_it(tmp_path):
    args = [*SMALL, *TRAIN, "layer=2", f"cache.root={tmp_path / 'cache'}"]
    first = run_module("posae.train", *args, f"hydra.run.dir={tmp_path / 'run1'}")
    assert first.returncode == 0, first.output
    assert "loading minilm" in first.output and "held-out: explained variance" in first.output
    manifests = list((tmp_path / "cache").rglob("layer02/manifest.json"))
    assert len(manifests) == 1
    assert json.loads(manifests[0].read_text())["n_sequences"] == 64
    second = run_module("posae.train", *args, f"hydra.run.dir={tmp_path / 'run2'}")
    assert second.returncode == 0, second.output
    assert "activation cache complete" in second.output and "loading minilm" not in second.output
    assert (tmp_path / "run1" / ".hydra" / "config.yaml").exists()


@pytest.mark.slow
def test_cache_entry_point_writes_every_requested_layer_in_one_pass(tmp_path):
    result = run_module("posae.cache", *SMALL, "layers=[0,5]", f"cache.root={tmp_path}",
                        f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.output
    assert result.output.count("loading minilm") == 1
    assert {p.parent.name for p in tmp_path.rglob("manifest.json")} == {"layer00", "layer05"}


REUSED_PASS = "held-out pass: the one at the end of training"
EVAL_SMALL = ["eval.enabled=true", "eval.probing.n_train=160", "eval.probing.n_test=40",
              "eval.absorption.max_words=400", "eval.preservation_sequences=4"]


@pytest.mark.slow
def test_training_evaluates_at_its_end_and_evaluate_reruns_it(tmp_path):
    run_dir = tmp_path / "run"
    args = [*SMALL, *TRAIN, "layer=2", "variant=topk", f"cache.root={tmp_path / 'cache'}"]
    result = run_module("posae.train", *args, *EVAL_SMALL, f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.output
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {"core", "by_position", "temporal", "structure", "smoothness", "preservation",
            "sparse_probing", "absorption"} <= set(metrics)
    assert metrics["core"]["l0"] == pytest.approx(32)
    assert metrics["preservation"]["kind"] == "encoder"
    assert metrics["by_position"]["position"] == list(range(1, 31))  # not [CLS], [SEP]
    # the held-out pass ran once: the evaluation used the one behind train_summary.json
    assert result.output.count(REUSED_PASS) == 1
    pngs = sorted(p.name for p in (run_dir / "plots").glob("*.png"))
    assert len(pngs) >= 4 and pngs == sorted(p.split("/")[-1] for p in metrics["plots"])
    # standalone, one family, same numbers for what both compute
    (run_dir / "metrics.json").unlink()
    again = run_module("posae.evaluate", f"run_dir={run_dir}",
                       "eval.families=[structure,word_class]")
    assert again.returncode == 0, again.output
    rerun = json.loads((run_dir / "metrics.json").read_text())
    assert rerun["core"] == metrics["core"] and "preservation" not in rerun
    words = rerun["word_class_probing"]  # the opt-in syntactic probe, on held-out tokens
    assert words["classes"] and 0.5 <= words["mean"]["llm_top_5_test_accuracy"] <= 1
    assert REUSED_PASS not in again.output  # standalone, the pass ran again, to these numbers
    # a run whose saved SAE records another held-out split is not evaluated on sequences it
    # may have trained on
    record = json.loads((run_dir / "sae" / "cfg.json").read_text())
    record["metadata"]["posae"].pop("held_out_split")
    (run_dir / "sae" / "cfg.json").write_text(json.dumps(record))
    refused = run_module("posae.evaluate", f"run_dir={run_dir}", "eval.families=[structure]")
    assert refused.returncode == 2 and "trained holding out other sequences" in refused.output


@pytest.mark.slow
def test_evaluate_refuses_bad_input_before_any_compute(tmp_path):
    missing = run_module("posae.evaluate", f"run_dir={tmp_path}")
    assert missing.returncode == 2 and "run_config.yaml" in missing.output
    bad_task = run_module("posae.evaluate", f"run_dir={tmp_path}", "eval.probing_tasks=[nope]")
    assert bad_task.returncode == 2 and "eval.probing_tasks: no task 'nope'" in bad_task.output
    bad_train = run_module("posae.train", *SMALL, *TRAIN, "eval.families=[vibes]",
                           f"cache.root={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'r'}")
    assert bad_train.returncode == 2 and "eval.families" in bad_train.output
    assert not (tmp_path / "cache").exists()


def test_evaluate_without_run_dir_says_what_it_needs():
    result = run_module("posae.evaluate")
    assert result.returncode == 2, result.output
    assert "run_dir=<the folder of a finished `python -m posae.train` run> is required" in \
        result.output


def saelens_folder(folder, d_in: int, hook: str):
    """A SAELens StandardSAE saved by sae-lens, Gemma Scope's layout (no b_dec on input)."""
    import sae_lens
    import torch

    theirs = sae_lens.StandardSAE(sae_lens.StandardSAEConfig(d_in=d_in, d_sae=4 * d_in,
                                                             apply_b_dec_to_input=False))
    with torch.no_grad():
        theirs.W_enc.normal_(0, 0.05)
        theirs.b_enc.fill_(-0.2)
    theirs.cfg.metadata.hook_name = hook
    theirs.save_model(str(folder))
    return folder


@pytest.mark.parametrize("d_in,hook,layer,message", [
    (384, "blocks.2.hook_resid_post", 3, "layer=3: t reads 'blocks.2.hook_resid_post', which "
                                         "is layer 2 here"),
    (64, "blocks.2.hook_resid_post", 2, "d_in=64, but model.d_model is 384"),
    (384, "blocks.2.hook_mlp_out", 2, "posae caches the residual stream after a block"),
    (384, "centred", 2, "center_writing_weights=true"),
])
def test_an_import_is_checked_against_the_model_and_layer(d_in, hook, layer, message):
    from posae.config import ConfigError
    from posae.import_sae import check_matches
    from posae.sae import build_sae
    from posae.sae.base import SAEConfig

    sae = build_sae(SAEConfig("relu", d_in=d_in, width=2 * d_in))
    meta = {"hook_name": hook}
    if hook == "centred":
        meta = {"hook_name": "blocks.2.hook_resid_post",
                "model_from_pretrained_kwargs": {"center_writing_weights": True}}
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_matches(sae, {"metadata": meta}, "t", layer, 384)


@pytest.mark.slow
def test_an_imported_saelens_sae_is_evaluated_like_a_trained_run(tmp_path):
    """posae.import_sae makes a run folder of a SAELens folder and evaluates it; a wrong
    layer is refused before any compute."""
    source = saelens_folder(tmp_path / "theirs", 384, "blocks.2.hook_resid_post")
    args = [*SMALL, f"cache.root={tmp_path / 'cache'}", "eval.families=[structure]"]
    wrong_layer = run_module("posae.import_sae", f"source={source}", "layer=3", *args,
                             f"hydra.run.dir={tmp_path / 'no'}")
    assert wrong_layer.returncode == 2 and "which is layer 2 here" in wrong_layer.output
    assert not (tmp_path / "cache").exists() and not (tmp_path / "no" / "sae").exists()

    run_dir = tmp_path / "imported"
    result = run_module("posae.import_sae", f"source={source}", "layer=2", *args,
                        f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.output[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["sae"]["architecture"] == "relu" and metrics["layer"] == 2
    assert 0 < metrics["core"]["l0"] < 4 * 384 and "structure" in metrics
    saved = json.loads((run_dir / "sae" / "cfg.json").read_text())
    assert saved["metadata"]["posae"]["imported_from"] == str(source)
