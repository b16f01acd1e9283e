"""Batches, schedules, dead latents and resampling, on small known inputs."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
import torch
from conftest import compose_config

from posae.config import ConfigError, OptimConfig, trainer_config
from posae.provenance import code_at_first_run, git_commit, provenance
from posae.sae import REGISTRY, build_sae
from posae.training.batches import WindowOrder, document_links, split_by_documents
from posae.training.dead import DeadLatents
from posae.training.resampling import PositionActivity, lowest_fraction, resample_latents
from posae.training.schedule import lr_multiplier


def test_windows_are_contiguous_within_one_sequence_and_each_epoch_covers_all_once():
    order = WindowOrder(np.arange(10), context=32, window=8, seed=0)
    assert len(order.units) == 40 and set(order.units[:, 1]) == {0, 8, 16, 24}
    epoch = order.take(40)
    assert sorted(map(tuple, epoch)) == sorted(map(tuple, order.units))
    assert order.epoch == 1 and order.offset == 0
    assert not np.array_equal(order.take(40), epoch), "each epoch has its own order"


def test_window_order_resumes_exactly_and_ranks_stride_the_global_batch():
    a = WindowOrder(np.arange(50), 128, 128, seed=3)
    a.take(17)
    state = a.state_dict()
    expected = a.take(30)
    b = WindowOrder(np.arange(50), 128, 128, seed=3)
    b.load_state_dict(state)
    assert np.array_equal(b.take(30), expected)
    batch = WindowOrder(np.arange(50), 128, 128, seed=3).take(16)
    shares = [batch[r::2] for r in range(2)]
    assert sorted(map(tuple, np.concatenate(shares))) == sorted(map(tuple, batch))


def test_document_links_of_packed_sequences():
    sep = 9  # [CLS]=1 content... [SEP]-suffix=2
    tokens = np.array([[1, 5, 5, 5, 9, 2],    # ends a document exactly
                       [1, 5, 9, 5, 5, 2],    # its second document continues ...
                       [1, 5, 5, 5, 5, 2],    # ... through this one ...
                       [1, 5, 9, 5, 5, 2]])   # ... and ends here
    continues, has_sep = document_links(tokens, sep, 1, 1, packed=True)
    assert list(continues) == [False, True, True, True] and list(has_sep) == [1, 1, 0, 1]
    continues, _ = document_links(tokens, sep, 1, 1, packed=False)
    assert not continues.any()


def test_held_out_split_is_seeded_random_and_keeps_documents_whole():
    n = 400
    rng = np.random.default_rng(0)
    continues = rng.random(n) < 0.7          # most sequences end inside a document
    has_sep = continues.copy()
    has_sep[rng.random(n) < 0.2] = False     # some lie entirely inside one document
    has_sep[~continues] = True
    train, held = split_by_documents(continues, has_sep, 0.05)
    assert len(held) == 24 and not set(train) & set(held)
    assert not (held == np.arange(n - 24, n)).all()  # not one corner of the corpus
    assert (split_by_documents(continues, has_sep, 0.05)[1] == held).all()  # seeded
    # every document that crosses a sequence boundary: from i, through sequences without
    # a separator, to the first with one; none of them has sequences in both sets
    side = np.zeros(n, int)
    side[train], side[held] = 1, 2
    for i in np.flatnonzero(continues[:-1]):
        k = i + 1
        while k < n - 1 and not has_sep[k]:
            k += 1
        assert not {1, 2} <= set(side[i : k + 1]), (i, k)
    with pytest.raises(ValueError, match="too small"):
        split_by_documents(np.ones(10, bool), np.zeros(10, bool), 0.5)


@pytest.mark.parametrize("schedule, checks", [
    ("constant", {0: 1.0, 50: 1.0, 99: 1.0}),
    ("warmup", {0: 0.1, 9: 1.0, 99: 1.0}),
    ("cosine", {0: 0.1, 9: 1.0, 10: 1.0, 55: 0.55, 100: 0.1}),
])
def test_lr_schedules(schedule, checks):
    f = lr_multiplier(OptimConfig(schedule=schedule, warmup_steps=10, min_lr_ratio=0.1), 100)
    for step, value in checks.items():
        assert f(step) == pytest.approx(value, abs=1e-9), step


def test_trainer_config_checks_window_and_batch():
    node = compose_config(overrides=["trainer.window=48"]).trainer
    with pytest.raises(ConfigError, match=r"trainer\.batch_tokens=2048 must be a multiple"):
        trainer_config(node, 128)
    with pytest.raises(ConfigError, match=r"trainer\.window"):
        trainer_config(compose_config(overrides=["trainer.window=256"]).trainer, 128)
    assert trainer_config(compose_config().trainer, 128).window == 128


def test_dead_latents_count_tokens_since_firing():
    dead = DeadLatents(4, after_tokens=100, device=torch.device("cpu"))
    dead.update(torch.tensor([True, False, False, True]), 60)
    dead.update(torch.tensor([False, False, True, True]), 60)
    assert dead.dead.tolist() == [False, True, False, False]


def test_resampling_reinitialises_only_dead_latents_and_their_adam_moments():
    torch.manual_seed(0)
    sae = build_sae(REGISTRY["relu"].config_class(name="relu", d_in=8, width=16))
    optimizer = torch.optim.Adam(sae.parameters())
    sae(torch.randn(4, 8)).x_hat.pow(2).sum().backward()
    optimizer.step()
    before = sae.W_dec.detach().clone()
    latents = torch.tensor([2, 5])
    inputs = torch.randn(6, 8)
    scores = torch.tensor([0, 0, 0, 1.0, 0, 0])  # only input 3 can be drawn
    resample_latents(sae, optimizer, latents, inputs, scores, torch.Generator().manual_seed(0))
    direction = (inputs[3] - sae.b_dec) / (inputs[3] - sae.b_dec).norm()
    for i in latents:
        torch.testing.assert_close(sae.W_dec[i], direction.detach())
        assert sae.b_enc[i] == 0
    keep = [i for i in range(16) if i not in latents.tolist()]
    assert torch.equal(sae.W_dec[keep], before[keep])
    moments = optimizer.state[sae.W_dec]
    assert moments["exp_avg"][latents].abs().sum() == 0 and moments["exp_avg"][keep].abs().sum() > 0


def test_temporal_importance_scores_follow_001_eq6():
    activity = PositionActivity(context=3, d_sae=2, device=torch.device("cpu"))
    # latent 0: mean |f| 1, 2, 3 at positions 0, 1, 2; latent 1: 2 everywhere
    f = torch.tensor([[[1.0, 2.0], [2.0, 2.0], [3.0, 2.0]]])
    activity.update(f, torch.ones(1, 3, dtype=bool), torch.arange(3)[None])
    scores = activity.scores(gamma=5.0)
    assert scores.tolist() == pytest.approx([2.0 * (1 + 5 * 2 / 3), 2.0])
    assert lowest_fraction(scores, 0.5).tolist() == [1]


def test_position_activity_is_the_same_for_shared_and_mixed_positions():
    torch.manual_seed(0)
    f, mask = torch.rand(3, 4, 5), torch.rand(3, 4) > 0.3
    shared = PositionActivity(context=8, d_sae=5, device=torch.device("cpu"))
    shared.update(f, mask, torch.arange(4).expand(3, 4))
    one_by_one = PositionActivity(context=8, d_sae=5, device=torch.device("cpu"))
    for row in range(3):
        one_by_one.update(f[row : row + 1], mask[row : row + 1], torch.arange(4)[None])
    torch.testing.assert_close(shared.sums, one_by_one.sums)
    torch.testing.assert_close(shared.counts, one_by_one.counts)
    shifted = PositionActivity(context=8, d_sae=5, device=torch.device("cpu"))
    pos = torch.stack([torch.arange(4), torch.arange(4) + 4, torch.arange(4)])
    shifted.update(f, mask, pos)
    expected = torch.zeros(8, 5)
    for row in range(3):
        expected[pos[row]] += f[row] * mask[row, :, None]
    torch.testing.assert_close(shifted.sums, expected)


def test_provenance_names_the_commit_and_whether_the_code_differs_from_it(tmp_path):
    assert git_commit(tmp_path) == {"commit": None, "dirty": None}  # not a checkout

    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c",
                        "user.email=t@t", *args], check=True, capture_output=True)
    package, notes = tmp_path / "pkg", tmp_path / "notes.md"
    package.mkdir()
    (package / "code.py").write_text("x = 1\n")
    notes.write_text("results\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "first")
    clean = git_commit(package)
    assert len(clean["commit"]) == 40 and clean["dirty"] is False
    notes.write_text("edited results\n")  # not code: still clean
    assert git_commit(package)["dirty"] is False
    run_folder = tmp_path / "experiments" / "runs" / "sweep" / "job"  # a sweep's saved configs
    run_folder.mkdir(parents=True)
    (run_folder / "run_config.yaml").write_text("seed: 0\n")
    assert git_commit(package)["dirty"] is False
    (tmp_path / "experiments" / "new_experiment.yaml").write_text("seed: 1\n")  # an experiment
    assert git_commit(package)["dirty"] is True
    (tmp_path / "experiments" / "new_experiment.yaml").unlink()
    (package / "new.py").write_text("y = 2\n")  # untracked code counts
    assert git_commit(package)["dirty"] is True
    (package / "new.py").unlink()
    (package / "code.py").write_text("x = 2\n")
    assert git_commit(package) == {"commit": clean["commit"], "dirty": True}
    assert provenance(torch.device("cpu"))["device"] == "cpu"
    # one process, one code: a multirun's later jobs keep the commit its first job found,
    # though a commit was made since
    first = code_at_first_run(package)
    (package / "code.py").write_text("x = 3\n")
    git("commit", "-q", "-am", "second")
    assert git_commit(package)["commit"] != first["commit"]
    assert code_at_first_run(package) == first


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty", "garbage"])
def test_resume_state_passes_over_a_damaged_checkpoint_naming_it(tmp_path, damage, caplog):
    from posae.training.checkpoint import resume_state, save_checkpoint

    for step in (1, 2):
        save_checkpoint(tmp_path, step, {"step": step, "w": torch.arange(1000.0) * step}, 2)
    state = tmp_path / "checkpoints" / "step_0000002" / "state.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.write_bytes({"flip": bytes(data), "truncate": bytes(data[: len(data) // 2]),
                       "empty": b"", "garbage": b"not a checkpoint" * 100}[damage])
    with caplog.at_level("WARNING"):
        path, found = resume_state(tmp_path, torch.device("cpu"))
    assert path.name == "step_0000001" and found["step"] == 1
    assert f"skipped a corrupt checkpoint: {state}" in caplog.text
    assert not state.parent.exists() and (state.parent.parent / ".corrupt_step_0000002").is_dir()
