"""`python -m posae.train` end to end on the embedded model: every variant, resume, DDP, W&B."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import CONF, REPO, run_module
from safetensors.torch import load_file

from posae.data.cache_reader import ActivationCache
from posae.eval.held_out import held_out_pass
from posae.provenance import git_commit
from posae.sae import load_sae, read_saved
from posae.training.batches import BatchLoader, held_out_split, whole_sequences
from posae.training.checkpoint import load_checkpoint

VARIANTS = sorted(p.stem for p in (CONF / "variant").glob("*.yaml"))
# 200 sequences of 32 tokens; 20 steps of 512 tokens (16 windows).
TINY = ["context_size=32", "n_tokens=6400", "cache.shard_sequences=64", "cache.device=cpu",
        "trainer.batch_tokens=512", "trainer.n_tokens=10240", "trainer.cpu=true",
        "variant.expansion_factor=2", "optim.warmup_steps=5", "layer=2",
        "eval.enabled=false"]


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    """One small cache shared by this module's runs (built by the first run)."""
    return tmp_path_factory.mktemp("cache")


def held_out_metrics(run_dir: Path) -> dict:
    """Recompute held-out metrics from the saved SAE and the cache, as a user would."""
    sae = load_sae(run_dir / "sae")
    meta = read_saved(run_dir / "sae")[1]
    cache = ActivationCache(Path(meta["cache"]))
    _, ids = held_out_split(cache, packed=True, eval_fraction=0.05)
    loader = BatchLoader(cache, cache.context_size, 1.0, False, torch.device("cpu"))
    return held_out_pass(sae, (loader.load(u) for u in whole_sequences(ids, 32)),
                         cache.context_size)["core"]


@pytest.mark.slow
def test_every_variant_trains_twenty_steps_as_one_multirun(tmp_path, cache_root):
    result = run_module("posae.train", "-m", f"variant={','.join(VARIANTS)}", *TINY,
                        f"cache.root={cache_root}", f"hydra.sweep.dir={tmp_path}")
    assert result.returncode == 0, result.output[-3000:]
    for job, name in enumerate(VARIANTS):
        run_dir = tmp_path / str(job)
        summary = json.loads((run_dir / "train_summary.json").read_text())
        assert summary["steps"] == 20, name
        assert summary["provenance"]["commit"] == git_commit()["commit"], name
        assert all(math.isfinite(v) for v in summary["final_train_stats"].values()), name
        held_out = summary["held_out"]
        assert math.isfinite(held_out["explained_variance"]) and held_out["l0"] > 0, name
        assert read_saved(run_dir / "sae")[1]["config"]["name"] == name
        records = [json.loads(line) for line in
                   (run_dir / "train_log.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == [10, 20], name
        assert records[-1]["l0"] == summary["final_train_stats"]["l0"], name
        assert set(summary["mechanisms"]) <= set(summary["final_train_stats"]), name
        again = held_out_metrics(run_dir)  # from the saved folder, as a user reloads it
        # float32 rounding of the SAELens layout (JumpReLU's exp(log θ), the Temporal
        # SAE's b_dec moved into the rescaled space): equal to 1e-7, not bit for bit
        assert again["explained_variance"] == pytest.approx(held_out["explained_variance"],
                                                            rel=1e-7), name
    pa_sae = json.loads((tmp_path / str(VARIANTS.index("pa_sae")) / "train_summary.json")
                        .read_text())["mechanisms"]
    assert {"mech/rate_min", "mech/rate_max", "mech/mask_mean", "mech/importance_weight_std",
            "coef/importance_l1"} <= set(pa_sae)
    text_log = (tmp_path / str(VARIANTS.index("pa_sae")) / "train.log").read_text()
    assert "step 20: coef/mse=1" in text_log and "mech/rate_max=" in text_log


def train_command(run_dir: Path, cache_root: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "posae.train", *TINY, "trainer.n_tokens=204800",
            "trainer.checkpoint_every=25", "trainer.resample_every=30",
            "trainer.dead_after_tokens=2048", f"cache.root={cache_root}",
            f"hydra.run.dir={run_dir}", *extra]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache_root) -> Path:
    """The run both kill tests compare against, trained once."""
    whole = tmp_path_factory.mktemp("whole")
    subprocess.run(train_command(whole, cache_root), cwd=REPO, check=True, capture_output=True)
    return whole


@pytest.mark.slow
@pytest.mark.parametrize("kill", [signal.SIGTERM, signal.SIGKILL])
def test_killed_run_resumes_to_bit_identical_weights(tmp_path, cache_root, uninterrupted, kill):
    """A real signal mid-run; `resume=true` then finishes with exactly the uninterrupted SAE."""
    whole = uninterrupted
    killed = tmp_path / "killed"
    proc = subprocess.Popen(train_command(killed, cache_root), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list((killed / "checkpoints").glob("step_*")) and proc.poll() is None:
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(kill)
    assert proc.wait() == (128 + signal.SIGTERM if kill == signal.SIGTERM else -signal.SIGKILL)
    assert not (killed / "sae").exists(), "the run finished before the signal"
    resumed = run_module("posae.train", "resume=true", f"hydra.run.dir={killed}")
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert "resuming" in resumed.output
    a = load_file(whole / "sae" / "sae_weights.safetensors")
    b = load_file(killed / "sae" / "sae_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_corrupt_checkpoint_is_named_and_resuming_falls_back_to_the_previous_one(
        tmp_path, cache_root):
    """Steps 15 and 20 are checkpointed; the newest gets a flipped byte (it would still
    load, to other weights); resume=true says which file it skipped, sets it aside,
    continues from step 15 and ends with the same weights. Then, with every checkpoint
    damaged, resuming exits 2 naming them."""
    run_dir = tmp_path / "run"
    first = run_module("posae.train", *TINY, "trainer.checkpoint_every=5",
                       f"cache.root={cache_root}", f"hydra.run.dir={run_dir}")
    assert first.returncode == 0, first.output[-3000:]
    before = load_file(run_dir / "sae" / "sae_weights.safetensors")
    state = run_dir / "checkpoints" / "step_0000020" / "state.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))
    (run_dir / "train_summary.json").unlink()
    again = run_module("posae.train", "resume=true", f"hydra.run.dir={run_dir}")
    assert again.returncode == 0, again.output[-3000:]
    assert f"skipped a corrupt checkpoint: {state}" in again.output
    assert "resuming" in again.output and "from step 15 (step_0000015)" in again.output
    # set aside, out of the rotation that keeps the newest checkpoints
    assert (run_dir / "checkpoints" / ".corrupt_step_0000020").is_dir()
    after = load_file(run_dir / "sae" / "sae_weights.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    for damaged in (run_dir / "checkpoints").glob("step_*/state.pt"):
        damaged.write_bytes(b"")
    (run_dir / "train_summary.json").unlink()
    none_left = run_module("posae.train", "resume=true", f"hydra.run.dir={run_dir}")
    assert none_left.returncode == 2, none_left.output[-3000:]
    assert "no intact checkpoint to resume from" in none_left.output
    assert "step_0000020/state.pt" in none_left.output


def test_a_diverging_job_fails_its_sweep_after_the_other_jobs_ran(tmp_path, cache_root):
    sweep = tmp_path / "sweep"
    result = run_module("posae.train", "-m", *TINY, "optim.lr=1e30,0.002",
                        f"cache.root={cache_root}", f"hydra.sweep.dir={sweep}")
    assert result.returncode != 0, result.output[-3000:]
    assert "TrainingDiverged" in result.output
    assert not (sweep / "0" / "sae").exists() and (sweep / "1" / "sae").exists()


@pytest.mark.parametrize("overrides, kept_one", [
    (["optim.lr=1e30"], False),  # non-finite at once
    # TopK (no dead collapse) with a 19-step warmup to lr 100: one sane step, then FVU 1e6
    (["variant=topk", "variant.k=8", "optim.lr=100", "optim.warmup_steps=19"], True),
])
def test_a_diverging_run_stops_before_saving_it_and_exits_non_zero(tmp_path, cache_root,
                                                                   overrides, kept_one):
    """Checkpointing every step: the run stops at the first step whose loss or weights
    diverged, before a checkpoint of them; it saves no model, keeps (and names) the last
    sane checkpoint if there is one, and exits 3."""
    run_dir = tmp_path / "run"
    result = run_module("posae.train", *TINY, *overrides, "trainer.checkpoint_every=1",
                        "trainer.keep_checkpoints=2", f"cache.root={cache_root}",
                        f"hydra.run.dir={run_dir}")
    assert result.returncode == 3, result.output[-3000:]
    assert re.search(r"TrainingDiverged: training diverged at step \d+: (loss|the weights)",
                     result.output)
    assert not (run_dir / "sae").exists() and not (run_dir / "train_summary.json").exists()
    kept = sorted((run_dir / "checkpoints").glob("step_*"))
    assert bool(kept) == kept_one
    assert ("the last checkpoint, from before, is kept" in result.output) == kept_one
    for checkpoint in kept:  # sane weights, not merely finite ones
        state = load_checkpoint(checkpoint, torch.device("cpu"))
        assert all(v.abs().max() < 1e3 for v in state["sae"].values()), checkpoint


@pytest.mark.slow
def test_resume_refuses_a_changed_override(tmp_path, cache_root):
    run_dir = tmp_path / "run"
    subprocess.run(train_command(run_dir, cache_root, "trainer.n_tokens=1024"), cwd=REPO,
                   check=True, capture_output=True)
    result = run_module("posae.train", "resume=true", "layer=3", f"hydra.run.dir={run_dir}")
    assert result.returncode == 2 and "layer=3 differs from the run's saved config" in result.output
    # a group packaged elsewhere (posae/conf/resample/ at trainer.resample) is compared there
    result = run_module("posae.train", "resume=true", "resample=random",
                        f"hydra.run.dir={run_dir}")
    assert result.returncode == 2 and "resample=random differs" in result.output


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["relu", "pa_sae"])
def test_two_process_data_parallel_matches_one_process(tmp_path, cache_root, variant):
    """Two processes on the same global batch give the single-process weights (PA-SAE: also
    its gradient-driven rates and importance weights).

    Launched with torchrun, the launcher `accelerate launch --multi_gpu` uses: accelerate's
    own multi-CPU launch needs MPI, and without it `--cpu --num_processes 2` runs one
    process. posae's Accelerator reads the same environment either way.
    """
    args = [*TINY, f"variant={variant}", f"cache.root={cache_root}"]
    single = run_module("posae.train", *args, f"hydra.run.dir={tmp_path / 'single'}")
    assert single.returncode == 0, single.output[-3000:]
    outputs = tmp_path / "ddp"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "posae.train", *args,
         f"hydra.run.dir={outputs}/" + "${now:%H-%M-%S-%f}"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        timeout=300)
    assert ddp.returncode == 0, ddp.stdout[-3000:]
    assert "2 processes" in ddp.stdout
    runs = [p for p in outputs.iterdir() if p.is_dir()]
    assert len(runs) == 1, "one run folder for both processes"
    a = load_file(tmp_path / "single" / "sae" / "sae_weights.safetensors")
    b = load_file(runs[0] / "sae" / "sae_weights.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)
    if variant == "pa_sae":  # gradient statistics: a per-process scale error would show here
        assert a["importance_ema"].abs().max() > 0
        torch.testing.assert_close(b["importance_ema"], a["importance_ema"], rtol=1e-3,
                                   atol=1e-12)


@pytest.mark.slow
def test_wandb_logs_offline_when_not_logged_in(tmp_path, cache_root):
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_MODE", "WANDB_API_KEY")}
    result = subprocess.run(
        [sys.executable, "-m", "posae.train", *[a for a in TINY if not a.startswith("eval.")],
         "eval.families=[structure]", "logger=wandb", f"cache.root={cache_root}",
         f"hydra.run.dir={tmp_path}"], cwd=REPO, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, env={**env, "HOME": str(tmp_path / "home")})
    assert result.returncode == 0, result.stdout[-3000:]
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    records = runs[0].read_bytes()  # protobuf records: keys are stored as plain strings
    for key in (b"loss/mse", b"loss/l1", b"coef/l1", b"l0", b"dead_fraction", b"lr",
                b"eval/core/explained_variance", b"eval/structure/mean_position_specificity",
                b"plots/feature_density", b"batch_tokens"):
        assert key in records, key


def test_wandb_logger_records_config_metrics_group_and_summary(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    from posae.training.loggers import WandbLogger, wandb_mode

    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_mode("auto") == "offline"
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = OmegaConf.create({"logger": {"project": "posae-test", "entity": None, "mode": "auto"},
                            "layer": 3, "variant": {"name": "topk", "k": 32}})
    logger = WandbLogger(cfg, tmp_path, name="sweep/0", group="sweep", run_id=None)
    try:
        logger.log({"loss/mse": 1.5, "l0": 32.0}, step=1)
        logger.summary({"eval/explained_variance": 0.8})
        run = logger.run
        assert run.group == "sweep" and run.name == "sweep/0" and run.offline
        assert run.config["variant"]["k"] == 32 and run.config["layer"] == 3
        assert run.summary["eval/explained_variance"] == 0.8
    finally:
        logger.finish()


@pytest.mark.slow
def test_gradient_accumulation_matches_one_batch(tmp_path, cache_root):
    args = [*TINY, "variant=relu", f"cache.root={cache_root}"]
    for name, pieces in (("one", 1), ("four", 4)):
        result = run_module("posae.train", *args, f"trainer.micro_batches={pieces}",
                            f"hydra.run.dir={tmp_path / name}")
        assert result.returncode == 0, result.output[-3000:]
    a = load_file(tmp_path / "one" / "sae" / "sae_weights.safetensors")
    b = load_file(tmp_path / "four" / "sae" / "sae_weights.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)
    # Adam hides a uniformly mis-scaled gradient; the logged step means would not
    stats = [json.loads((tmp_path / n / "train_summary.json").read_text())["final_train_stats"]
             for n in ("one", "four")]
    for key in ("loss/mse", "loss/l1", "l0", "fvu"):
        assert stats[1][key] == pytest.approx(stats[0][key], rel=1e-4), key


def test_a_run_folder_is_held_while_training_and_never_relabelled(tmp_path, cache_root):
    """A finished run (shorter than checkpoint_every: no checkpoint): a fresh launch into
    its folder is refused and rewrites nothing; while another process holds the folder, a
    launch exits 2 naming it; a resumed launch keeps the first launch's labels."""
    from posae.training.run import hold_run_folder

    run_dir = tmp_path / "run"
    first = run_module("posae.train", *TINY, "variant=topk", "variant.k=8",
                       f"cache.root={cache_root}", f"hydra.run.dir={run_dir}")
    assert first.returncode == 0 and not list((run_dir / "checkpoints").glob("step_*"))
    kept = {name: (run_dir / name).read_bytes()
            for name in ("run_config.yaml", ".hydra/overrides.yaml", ".hydra/config.yaml")}
    assert "variant=topk" in yaml.safe_load(kept[".hydra/overrides.yaml"])
    again = run_module("posae.train", *TINY, "variant=relu", f"cache.root={cache_root}",
                       f"hydra.run.dir={run_dir}")
    assert again.returncode == 2 and "already holds a run" in again.output
    with hold_run_folder(run_dir, is_main=True):  # this process is training there
        held = run_module("posae.train", "resume=true", f"hydra.run.dir={run_dir}")
    assert held.returncode == 2, held.output[-3000:]
    assert f"{run_dir} is in use by another training (pid {os.getpid()} on " in held.output
    resumed = run_module("posae.train", "resume=true", f"hydra.run.dir={run_dir}")
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert {name: (run_dir / name).read_bytes() for name in kept} == kept
    assert read_saved(run_dir / "sae")[1]["config"]["name"] == "topk"
