"""Every paper's sweep end to end at a tiny scale, then `python -m posae.report` on it."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil

import pytest
import yaml
from conftest import REPO, run_module

from posae.provenance import git_commit
from posae.report import metric

TINY = ["context_size=32", "n_tokens=6400", "cache.shard_sequences=64", "cache.device=cpu",
        "trainer.batch_tokens=512", "trainer.n_tokens=5120", "trainer.cpu=true",
        "variant.expansion_factor=2", "layer=2", "eval.families=[]", "eval.plots=false"]
MATCHED = {"pa_sae_matched": ("000_pa_sae", "pa_sae_run"),  # the matched-sparsity sweeps
           "atr_matched": ("001_atr", "atr_run"),
           "hierarchical_matched": ("002_hierarchical", "hierarchical_run"),
           "tc_sae_matched": ("003_tc_sae", "tc_sae_run"),
           "curriculum_matched": ("004_curriculum", "curriculum_run")}
EXPERIMENTS = {  # experiment -> its paper folder and run group
    "pa_sae_runs": ("000_pa_sae", "pa_sae_run"), "atr_runs": ("001_atr", "atr_run"),
    "hierarchical_runs": ("002_hierarchical", "hierarchical_run"),
    "tc_sae_runs": ("003_tc_sae", "tc_sae_run"),
    "curriculum_runs": ("004_curriculum", "curriculum_run"),
}
SYNTHETIC = {"synthetic_runs": ("synthetic", "synthetic_run"),
             "synthetic_matched": ("synthetic", "synthetic_run")}


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def declared_runs(experiment: str) -> list[str]:
    folder, group = {**EXPERIMENTS, **MATCHED, **SYNTHETIC}[experiment]
    return sweep_params(experiment)[f"+{group}"].split(",")


def sweep_params(experiment: str) -> dict[str, str]:
    folder, _ = {**EXPERIMENTS, **MATCHED, **SYNTHETIC}[experiment]
    config = yaml.safe_load((REPO / "experiments" / folder / "experiment" / f"{experiment}.yaml")
                            .read_text())
    return config["hydra"]["sweeper"]["params"]


def test_every_declared_run_has_a_file_and_at_most_ten_runs():
    """A paper's sweep holds at most its runs 1-10; a matched sweep may add the protocol's
    TopK base and control runs beside the paper's methods."""
    used: dict[str, set] = {}
    for experiment, (folder, group) in {**EXPERIMENTS, **MATCHED}.items():
        runs = declared_runs(experiment)
        assert 2 <= len(runs) <= (10 if experiment in EXPERIMENTS else 16), experiment
        assert len(set(runs)) == len(runs), experiment
        files = {p.stem for p in (REPO / "experiments" / folder / group).glob("*.yaml")}
        assert set(runs) <= files, experiment
        used.setdefault(group, set()).update(runs)
        used[group + "_files"] = files
    for group in {g for _, g in EXPERIMENTS.values()}:
        assert used[group] == used[group + "_files"], group  # no file that no sweep runs


@pytest.mark.parametrize("experiment", [*MATCHED, "synthetic_matched"])
def test_each_matched_run_has_a_folder_named_after_its_run_and_point(experiment):
    folder, group = {**MATCHED, **SYNTHETIC}[experiment]
    config = yaml.safe_load((REPO / "experiments" / folder / "experiment" / f"{experiment}.yaml")
                            .read_text())
    assert config["hydra"]["sweep"]["subdir"] == (
        f"${{hydra.runtime.choices.{group}}}@${{hydra.runtime.choices.matched_point}}")


@pytest.mark.parametrize("experiment", [*MATCHED, "synthetic_matched"])
def test_every_matched_run_is_planned_at_every_point_under_the_same_conditions(experiment):
    """Each method at the first point, and the first method at every point, composes as
    the sweep composes it and passes `plan_training` (match_l0 included) without compute;
    every one trains with the protocol's optimiser and schedule, the same tokens and (to
    the divisibility a multi-scale SAE needs) the same width; the ATR controls resample or
    leave out R_t as their files say."""
    from conftest import compose_config

    from posae.train import plan_training

    _, group = {**MATCHED, **SYNTHETIC}[experiment]
    points = sweep_params(experiment)["+matched_point"].split(",")
    runs = declared_runs(experiment)
    widths, tokens = set(), set()
    for point, run in {(points[0], run) for run in runs} | {(p, runs[0]) for p in points}:
        cfg = compose_config(overrides=[f"+matched_point={point}", f"+{group}={run}",
                                        f"+experiment={experiment}"])
        plan = plan_training(cfg)
        assert (plan.optim.name, plan.optim.lr, plan.optim.schedule, plan.trainer.grad_clip,
                plan.trainer.batch_tokens) == ("adam", 2e-3, "warmup", None, 2048), (point, run)
        widths.add(plan.sae.d_sae)
        tokens.add(cfg.trainer.n_tokens)
        if run.endswith("resample_100"):
            assert plan.trainer.resample_every == 100
        if run == "resampling_only_100":
            assert "temporal" not in plan.terms
    assert max(widths) - min(widths) <= 0.01 * max(widths), widths
    assert len(tokens) == 1, tokens


def test_the_synthetic_sweep_runs_every_variant_once():
    """synthetic_runs runs every variant; the matched sweep adds the mechanisms on TopK,
    and no run file is left that neither runs."""
    runs = declared_runs("synthetic_runs")
    variants = {p.stem for p in (REPO / "posae" / "conf" / "variant").glob("*.yaml")}
    assert sorted(runs) == sorted(variants)
    files = {p.stem for p in (REPO / "experiments" / "synthetic" / "synthetic_run").glob("*.yaml")}
    assert files == variants | set(declared_runs("synthetic_matched"))


@pytest.mark.parametrize("experiment", list(EXPERIMENTS))
def test_every_run_of_a_paper_sweep_is_planned(experiment):
    """Each run composes as the sweep composes it and passes `plan_training`, without
    compute (the two sweeps below, and tc_sae_runs in the partly-finished report test,
    also train and report every run)."""
    from conftest import compose_config

    from posae.train import plan_training

    _, group = EXPERIMENTS[experiment]
    for run in declared_runs(experiment):
        plan = plan_training(compose_config(overrides=[f"+{group}={run}",
                                                       f"+experiment={experiment}"]))
        assert plan.trainer.total_steps > 0, run


@pytest.mark.slow
@pytest.mark.parametrize("experiment", ["pa_sae_runs", "hierarchical_runs"])
def test_paper_sweep_runs_and_reports_one_row_per_run(experiment, tmp_path, cache_root):
    sweep = tmp_path / "sweep"
    result = run_module("posae.train", "-m", f"+experiment={experiment}", *TINY,
                        f"cache.root={cache_root}", f"hydra.sweep.dir={sweep}", timeout=900)
    assert result.returncode == 0, result.output[-3000:]
    runs = declared_runs(experiment)
    report = run_module("posae.report", str(sweep))
    assert report.returncode == 0, report.output
    assert f"{len(runs)} runs reported, 0 missing" in report.output
    rows = list(csv.reader(open(sweep / "report.csv")))
    assert [r[0] for r in rows[1:]] == runs
    claims = yaml.safe_load((sweep / "multirun.yaml").read_text())["paper"]["claims"]
    header = rows[0]
    for row in rows[1:]:  # the paper's figures sit beside ours, in its layout
        for name, value in claims.get(row[0], {}).items():
            assert row[header.index(f"{name} (paper)")] == str(value)
        assert float(row[header.index("core.explained_variance")]) < 1
    assert (sweep / "plots" / "metrics_by_run.png").exists()
    assert (sweep / "plots" / "position_curves_by_run.png").exists()


@pytest.mark.slow
def test_report_of_a_partly_finished_sweep_names_the_missing_runs_and_logs_to_wandb(
        tmp_path, cache_root):
    sweep = tmp_path / "sweep"
    result = run_module("posae.train", "-m", "+experiment=tc_sae_runs", *TINY, "logger=wandb",
                        f"cache.root={cache_root}", f"hydra.sweep.dir={sweep}", timeout=900,
                        env={"WANDB_MODE": "offline"})
    assert result.returncode == 0, result.output[-3000:]
    (sweep / "3" / "metrics.json").unlink()  # a run that has not finished yet
    report = run_module("posae.report", str(sweep), env={"WANDB_MODE": "offline"})
    assert report.returncode == 0, report.output
    assert "4 runs reported, 1 missing: window_3" in report.output
    rows = list(csv.reader(open(sweep / "report.csv")))
    assert [r[0] for r in rows[1:]] == ["baseline_relu", "tc_sae", "no_temporal", "lambda2_high"]
    assert "Missing runs (no metrics.json yet): window_3." in (sweep / "report.md").read_text()
    tables = list(sweep.glob("wandb/offline-run-*/files/media/table/report_*.table.json"))
    assert len(tables) == 1, sorted(os.listdir(sweep / "wandb"))
    assert "baseline_relu" in tables[0].read_text()
    header = rows[0]
    assert "temporal.adjacent_jaccard_corrected" in header
    assert "structure.mean_corrected_specificity" in header
    # a run evaluated under the earlier metric definitions cannot share the table
    old = json.loads((sweep / "1" / "metrics.json").read_text())
    old.pop("metric_version")
    (sweep / "1" / "metrics.json").write_text(json.dumps(old))
    refused = run_module("posae.report", str(sweep), env={"WANDB_MODE": "offline"})
    assert refused.returncode != 0
    assert "different metric definitions (version 1: 1; version 2: 0, 2, 4)" in refused.output
    (sweep / "1" / "metrics.json").write_text(json.dumps({**old, "metric_version": 2}))
    shutil.copytree(sweep / "1", sweep / "copy_of_1")  # e.g. a relaunch into new folder names
    twice = run_module("posae.report", str(sweep), env={"WANDB_MODE": "offline"})
    assert twice.returncode != 0
    assert "the same run in more than one folder (tc_sae: 1, copy_of_1)" in twice.output


def test_a_plain_sweep_counts_its_missing_jobs_and_skips_an_unreadable_one(tmp_path,
                                                                           cache_root):
    """`-m variant=relu,topk` without an experiment: two jobs expected; one never finished,
    one whose metrics.json is garbage is skipped and named, not fatal. Relaunched with
    resume=auto, both run again and count under their first labels."""
    sweep = tmp_path / "sweep"
    command = ["posae.train", "-m", "variant=relu,topk", *TINY, f"cache.root={cache_root}",
               f"hydra.sweep.dir={sweep}"]
    result = run_module(*command, timeout=900)
    assert result.returncode == 0, result.output[-3000:]
    (sweep / "1" / "metrics.json").unlink()  # topk: not finished
    (sweep / "0" / "metrics.json").write_text("{not json")  # relu: broken
    report = run_module("posae.report", str(sweep))
    assert report.returncode == 0, report.output
    assert "0 runs reported, 2 missing: variant=relu, variant=topk" in report.output
    assert f"1 skipped, unreadable: {sweep / '0'}: " in report.output
    assert "Skipped, files that do not parse:" in (sweep / "report.md").read_text()
    again = run_module(*command, "resume=auto", timeout=900)
    assert again.returncode == 0, again.output[-3000:]
    report = run_module("posae.report", str(sweep))
    assert "2 runs reported, 0 missing" in report.output, report.output


def test_a_narrowed_relaunch_still_compares_every_run_in_the_folder():
    """A relaunch asking for one run rewrites multirun.yaml; the matched tables still take
    the runs earlier launches left, in the experiment's order (the baseline first)."""
    from posae.report import compared_methods

    declared = ["baseline", "topk", "atr", "jumprelu"]
    keys = ["baseline @ l0_32_seed0", "topk @ l0_32_seed0", "jumprelu @ l0_32_seed0",
            "extra @ l0_32_seed0"]
    assert compared_methods(["jumprelu"], declared, keys) == [
        "baseline", "topk", "jumprelu", "extra"]
    assert compared_methods(["atr", "topk"], declared, []) == ["topk", "atr"]  # none done


def test_report_refuses_a_folder_that_is_not_a_sweep(tmp_path):
    result = run_module("posae.report", str(tmp_path))
    assert result.returncode != 0 and "not a Hydra multirun folder" in result.output


def test_effects_are_welch_intervals_against_the_named_comparator():
    from posae import matched

    assert matched.effect([1.0], [2.0, 3.0]) is None  # one seed: no verdict
    same = matched.effect([1.0, 1.1, 0.9], [1.05, 0.95, 1.0])
    assert same["verdict"] == "no difference" and same["ci95"][0] < 0 < same["ci95"][1]
    higher = matched.effect([2.0, 2.1, 1.9], [1.0, 1.1, 0.9])
    assert higher["verdict"] == "higher" and higher["difference"] == pytest.approx(1.0)
    assert 0 < higher["ci95"][0] < 1.0 < higher["ci95"][1]
    assert matched.effect([1.0, 1.0], [2.0, 2.0])["verdict"] == "lower"  # no spread
    methods = ["relu", "topk", "topk_window", "window"]
    assert matched.comparators(methods, {"topk_window": "topk"}) == {
        "topk": "relu", "topk_window": "topk", "window": "relu"}
    with pytest.raises(ValueError, match="topk_window: gated names gated, which is not"):
        matched.comparators(methods, {"topk_window": "gated"})
    with pytest.raises(ValueError, match="typo: topk names typo"):
        matched.comparators(methods, {"typo": "topk"})
    # a sweep of a subset of the experiment's runs leaves the other entries out
    assert matched.comparators(["relu", "window"], {"topk_window": "topk"}, methods) == {
        "window": "relu"}
    subset = matched.effects({}, ["relu", "topk_window"], {"topk_window": "topk"}, 32, methods)
    assert subset["topk_window"] == {"against": "topk", "missing": "topk is not in this sweep"}
    groups = {("relu", 32): {"EV": [0.5, 0.51]}, ("topk", 32): {"EV": [0.8, 0.81]}}
    found = matched.effects(groups, methods, {"topk_window": "topk"}, 32)
    assert found["topk"]["EV"]["verdict"] == "higher"
    assert found["topk_window"] == {"against": "topk",
                                    "missing": "no finished run of topk_window at L0 32 yet"}
    paper = {"metrics": {"EV": ["core.explained_variance"], "KL": ["preservation.kl_score"],
                         "L0": ["core.l0"]},
             "claims": {"topk": {"EV": 0.79, "L0": 320, "KL": "about 0.99"}}}
    assert matched.claimed_levels(paper) == {"EV": [("topk", 0.79)]}


def test_a_non_finite_value_is_left_out_of_the_means_and_listed():
    from posae import matched
    from posae.report import first_metric

    rows = [{"run": "relu", "point": (32, seed),
             "metrics": {"core": {"l0": 32.0, "explained_variance": ev}}}
            for seed, ev in enumerate([0.5, float("nan"), 0.7])]
    groups, non_finite = matched.aggregate(rows, first_metric)
    assert groups[("relu", 32)]["EV"] == [0.5, 0.7]
    assert groups[("relu", 32)]["L0"] == [32.0] * 3
    assert non_finite == [{"method": "relu", "target_l0": 32, "seed": 1, "metric": "EV"}]
    text = "\n".join(matched.markdown(groups, ["relu"], {}, 32, [], non_finite))
    assert "Non-finite values left out: relu (target 32, seed 1): EV." in text


def test_metric_paths_and_the_mean_over_tasks():
    metrics = {"core": {"l0": 3.0},
               "sparse_probing": {"a": {"mean": {"acc": 0.5}}, "b": {"mean": {"acc": 1.0}}}}
    assert metric(metrics, "core.l0") == 3.0
    assert metric(metrics, "sparse_probing.*.mean.acc") == 0.75
    assert metric(metrics, "core.missing") is None
    assert metric(metrics, "preservation.kl_score") is None
    assert metric({"sparse_probing": {}}, "sparse_probing.*.mean.acc") is None


@pytest.mark.slow
def test_a_sweep_through_a_hydra_launcher_as_on_a_cluster(tmp_path, cache_root):
    """submitit_local is the submitit launcher's local twin of submitit_slurm: each run is
    its own process, as each is its own job on a cluster."""
    sweep = tmp_path / "sweep"
    result = run_module("posae.train", "-m", "+experiment=tc_sae_runs",
                        "+tc_sae_run=baseline_relu,window_3", *TINY,
                        "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
                        f"cache.root={cache_root}", f"hydra.sweep.dir={sweep}", timeout=900)
    assert result.returncode == 0, result.output[-3000:]
    assert "Submitit 'local' sweep" in result.output
    report = run_module("posae.report", str(sweep))
    assert "2 runs reported, 0 missing" in report.output, report.output


@pytest.mark.slow
def test_a_tiny_matched_protocol_reports_the_frontier_with_intervals(tmp_path, cache_root):
    """2 methods x 2 sparsity levels, 2 seeds at the common L0 (32), end to end."""
    sweep = tmp_path / "sweep"
    result = run_module("posae.train", "-m", "+experiment=pa_sae_matched", *TINY,
                        "+pa_sae_run=t1_0_baseline,topk",
                        "+matched_point=l0_32_seed0,l0_32_seed1,l0_16_seed0",
                        "trainer.log_every=1",
                        f"cache.root={cache_root}", f"hydra.sweep.dir={sweep}", timeout=900)
    assert result.returncode == 0, result.output[-3000:]
    report = run_module("posae.report", str(sweep))
    assert report.returncode == 0, report.output
    assert "6 runs reported, 0 missing" in report.output
    text = (sweep / "report.md").read_text()
    # the narrowed command rewrote multirun.yaml; the experiment's other runs stay named
    unrequested = re.search(r"Declared by the experiment, not requested by this sweep's "
                            r"command and not in its folder: (.*)\.", text)
    assert "t1_3_full @ l0_32_seed0" in unrequested.group(1).split(", ")
    assert "topk @ l0_16_seed0" not in unrequested.group(1)
    commit = git_commit()["commit"][:7]  # where every run trained, named once with its count
    assert re.search(rf"Trained at: `{commit}`[^;]* on cpu \(.*\), torch [^:]*: 6 runs\.",
                     text), text[:600]
    matched = text[text.index("## At matched L0 = 32"):text.index("## Effects")]
    baseline = next(line for line in matched.splitlines() if line.startswith("| t1_0_baseline"))
    topk = next(line for line in matched.splitlines() if line.startswith("| topk"))
    assert baseline.split(" | ")[1] == "2" and " ± " in baseline  # two seeds: mean ± sd
    assert "32 ± 0" in topk  # TopK's L0 is its k = the target
    effects = text[text.index("## Effects"):text.index("## Frontier")]
    topk = next(line for line in effects.splitlines() if line.startswith("| topk"))
    # ten steps cannot bring the ReLU baseline to its target: its effects carry the mark
    assert topk.startswith("| topk † | t1_0_baseline | ")
    assert "t1_0_baseline (target 32, seed 0): held-out L0" in text
    assert re.search(r"[+-][0-9.e-]+ \[[+-][0-9.e-]+, [+-][0-9.e-]+\] (higher|lower|no difference)",
                     topk), topk
    summary = json.loads((sweep / "matched.json").read_text())
    assert summary["effects"]["topk"]["against"] == "t1_0_baseline"
    assert {p["target_l0"] for p in summary["points"]} == {16, 32}
    frontier = text[text.index("## Frontier"):]
    assert "| topk | 16 |" in frontier and "| topk | 32 |" in frontier
    assert (sweep / "plots" / "frontier.png").exists()
    rows = list(csv.reader(open(sweep / "report.csv")))
    assert "topk @ l0_16_seed0" in [r[0] for r in rows[1:]]
    # the controller's setpoint is logged: it glides from the first L0 down to the target
    log = [json.loads(line) for line in
           open(sweep / "t1_0_baseline@l0_16_seed0" / "train_log.jsonl")]
    setpoints = [r["coef/l1_l0_setpoint"] for r in log if "coef/l1_l0_setpoint" in r]
    assert setpoints[0] > 16 and setpoints[-1] == 16


@pytest.mark.slow
def test_the_components_off_control_equals_its_baseline(tmp_path, cache_root):
    """000's PA-SAE with every mechanism off trains to the baseline's weights exactly."""
    from safetensors.torch import load_file

    sweep = tmp_path / "sweep"
    result = run_module("posae.train", "-m", "+experiment=pa_sae_runs", *TINY,
                        "+pa_sae_run=t1_0_baseline,components_off", "eval.enabled=false",
                        f"cache.root={cache_root}", f"hydra.sweep.dir={sweep}", timeout=900)
    assert result.returncode == 0, result.output[-3000:]
    baseline, off = (load_file(str(sweep / job / "sae" / "sae_weights.safetensors"))
                     for job in ("0", "1"))
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        assert (baseline[name] == off[name]).all(), name


@pytest.mark.slow
def test_a_relaunched_sweep_skips_finished_jobs_redoes_the_rest_and_takes_new_runs(
        tmp_path, cache_root):
    """Matched sweeps name each run's folder <run>@<point>: a run added to the list on
    relaunch (here in the middle) neither shifts nor reuses a finished run's folder."""
    sweep = tmp_path / "sweep"
    command = ["posae.train", "-m", "+experiment=pa_sae_matched", *TINY, "eval.enabled=false",
               "+matched_point=l0_32_seed0", f"cache.root={cache_root}",
               f"hydra.sweep.dir={sweep}"]
    first = run_module(*command, "+pa_sae_run=t1_0_baseline,components_off", timeout=900)
    assert first.returncode == 0, first.output[-3000:]
    baseline, off = sweep / "t1_0_baseline@l0_32_seed0", sweep / "components_off@l0_32_seed0"
    kept = (baseline / "train_summary.json").stat().st_mtime_ns
    (off / "train_summary.json").unlink()  # interrupted before it finished
    again = run_module(*command, "+pa_sae_run=t1_0_baseline,topk,components_off",
                       "resume=auto", timeout=900)
    assert again.returncode == 0, again.output[-3000:]
    assert f"{baseline} already holds a finished run (resume=auto): skipped" in again.output
    assert (baseline / "train_summary.json").stat().st_mtime_ns == kept
    assert (off / "train_summary.json").exists()
    added = yaml.safe_load((sweep / "topk@l0_32_seed0" / "run_config.yaml").read_text())
    assert added["variant"]["name"] == "topk"
    # an override that changes the run would land in the same folder: refused, not skipped
    changed = run_module(*command, "+pa_sae_run=t1_0_baseline", "optim.lr=0.001",
                         "resume=auto", timeout=900)
    assert changed.returncode != 0
    assert "holds a finished run of another config (optim.lr: 0.002 then, 0.001 now)" in \
        changed.output


def test_the_summary_table_reads_each_mechanism_from_its_sweep(tmp_path, monkeypatch):
    from posae import summary

    monkeypatch.chdir(tmp_path)
    (tmp_path / "experiments" / "000_pa_sae").mkdir(parents=True)
    effect = {"difference": 0.02, "ci95": [0.01, 0.03], "verdict": "higher", "no_spread": False}
    (tmp_path / "experiments" / "000_pa_sae" / "matched.json").write_text(json.dumps({
        "effects": {"t1_2_soft_masking": {"against": "t1_0_baseline", "EV": effect},
                    "t1_1_hard_masking": {"against": "t1_0_baseline",
                                          "missing": "no finished run yet"}},
        "common_l0": 32, "not_matched": [  # marks its effects; another L0's miss does not
            {"method": "t1_2_soft_masking", "target_l0": 32, "seed": 1, "reason": "L0 36"},
            {"method": "t1_1_hard_masking", "target_l0": 16, "seed": 0, "reason": "L0 18"}]}))
    (tmp_path / "experiments" / "synthetic").mkdir()
    recovered = {**effect, "difference": -0.5, "ci95": [-0.6, -0.4], "verdict": "lower"}
    (tmp_path / "experiments" / "synthetic" / "matched.json").write_text(json.dumps({
        "effects": {"topk_tc_window": {"against": "topk",
                                       "planted features recovered": recovered}}}))
    path = tmp_path / "experiments" / "SUMMARY.md"
    path.write_text(f"# Summary\n\n{summary.BEGIN}\nold\n{summary.END}\n\nFindings stay.\n")
    summary.main()
    text = path.read_text()
    assert "old" not in text and text.endswith("Findings stay.\n")
    soft = next(line for line in text.splitlines() if line.startswith("| PA soft masks"))
    assert "000: t1_2_soft_masking (t1_0_baseline) † | better +0.02 [+0.01, +0.03] | —" in soft
    assert "t1_1_hard_masking (t1_0_baseline) |" in text  # unmatched at 16 only: no mark
    assert "no finished run yet" in text
    window = next(line for line in text.splitlines() if line.startswith("| TC window"))
    assert window.startswith("| TC window (003 eq. 6) | 003: tc_sae (—) | not run yet")
    # the synthetic cell names its own method and comparator
    assert window.endswith("| topk_tc_window (topk): worse -0.5 [-0.6, -0.4] |")
    full_pa_sae = next(line for line in text.splitlines() if line.startswith("| PA-SAE, all"))
    assert full_pa_sae.endswith("| pa_sae (—): not in the sweep |")
    path.write_text("no markers")
    with pytest.raises(SystemExit, match="marker lines"):
        summary.main()
