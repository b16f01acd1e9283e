"""`python -m posae.push`: the staged upload and its model card, offline up to the upload
call (the Hub cannot be reached here)."""

from __future__ import annotations

import json

import pytest
import sae_lens
import torch
from conftest import run_module

from posae.sae import build_sae, load_sae, save_sae
from posae.sae.topk import TopKConfig

PROVENANCE = {"model": {"name": "minilm", "hf_id": "sentence-transformers/all-MiniLM-L6-v2"},
              "layer": 3, "context_size": 128, "dataset": "stdlib_docs"}


def a_run_folder(path):
    """What a finished training run leaves that the upload reads."""
    sae = build_sae(TopKConfig("topk", d_in=16, width=64, k=4)).eval()
    save_sae(sae, path / "sae", PROVENANCE)
    (path / "metrics.json").write_text(json.dumps({"core": {"explained_variance": 0.81,
                                                            "l0": 4.0}}))
    (path / "plots").mkdir()
    (path / "plots" / "position_curves.png").write_bytes(b"\x89PNG")
    return sae


@pytest.mark.slow
def test_push_stages_the_sae_and_its_card_then_fails_offline_naming_why(tmp_path):
    sae = a_run_folder(tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    staged = run_module("posae.push", f"run_dir={tmp_path}", "repo_id=me/saes",
                        "dry_run=true")
    assert staged.returncode == 0, staged.output[-3000:]
    stage = tmp_path / "hub_upload"
    card = (stage / "README.md").read_text()
    assert "base_model: sentence-transformers/all-MiniLM-L6-v2" in card
    assert 'SAE.from_pretrained("me/saes", "minilm_L3_topk")' in card
    assert 'load_sae(Path(folder) / "minilm_L3_topk")' in card
    assert "| held-out explained variance | 0.81 |" in card
    assert "![position_curves](minilm_L3_topk/plots/position_curves.png)" in card
    folder = stage / "minilm_L3_topk"
    assert (folder / "metrics.json").exists() and (folder / "plots/position_curves.png").exists()
    x = torch.randn(8, 16)
    theirs = sae_lens.SAE.load_from_disk(str(folder))  # what SAE.from_pretrained will read
    torch.testing.assert_close(theirs.encode(x), sae.encode(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(load_sae(folder).encode(x), sae.encode(x))
    assert all(p.read_bytes() == data for p, data in before.items())  # the run, only read

    offline = run_module("posae.push", f"run_dir={tmp_path}", "repo_id=me/saes",
                         env={"HF_HUB_OFFLINE": "1"})
    assert offline.returncode == 1
    assert "upload to me/saes failed (OfflineModeIsEnabled" in offline.output
    bad = run_module("posae.push", f"run_dir={tmp_path}", "repo_id=not a repo")
    assert bad.returncode == 2 and "repo_id: 'not a repo' is not a Hub repository id" in bad.output
