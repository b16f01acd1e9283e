"""`python -m posae.report <multirun dir>`: a sweep's runs side by side, from each run's
metrics.json: the paper's own metrics with its claimed figures beside ours (from the
experiment file's `paper:` block), the standard metrics of every run, a CSV, comparison
plots, and a W&B summary table when the sweep logged to W&B. Works on a partly finished
sweep and says which runs are missing.

    python -m posae.train -m +experiment=tc_sae_runs
    python -m posae.report outputs/sweeps/tc_sae_runs/<scale>_<date>
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from posae import matched
from posae.config import ConfigError  # also registers ${paper_steps:N} for sweep configs
from posae.eval import plots
from posae.matched import matched_point

# (label, metrics.json path): the scalars every report shows
STANDARD = [
    ("EV", "core.explained_variance"), ("MSE", "core.mse"), ("L0", "core.l0"),
    ("dead", "core.dead_fraction"), ("cosine", "core.cosine_similarity"),
    ("adjacent Jaccard", "temporal.adjacent_jaccard"),
    ("adjacent Jaccard, chance", "temporal.adjacent_jaccard_chance"),
    ("adjacent Jaccard, corrected", "temporal.adjacent_jaccard_corrected"),
    ("adjacent code cosine, corrected", "temporal.adjacent_code_cosine_corrected"),
    ("specificity, corrected", "structure.mean_corrected_specificity"),
    ("position-specialised", "structure.position_specialised_fraction"),
    ("position probe", "structure.position_decodability.codes_accuracy"),
    ("train s", "training.seconds"),
]
PRESERVATION = {"causal": ["preservation.kl_score", "preservation.ce_score"],
                "encoder": ["preservation.embedding_score"]}


def metric(metrics: dict, path: str):
    """A value of metrics.json by dotted path; a `*` step averages over that level's
    entries (e.g. `sparse_probing.*.mean.sae_top_1_test_accuracy`: the mean over tasks)."""
    head, _, rest = path.partition(".")
    if head == "*":
        values = [metric(v, rest) for v in metrics.values() if isinstance(v, dict)]
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None
    value = metrics.get(head) if isinstance(metrics, dict) else None
    return value if not rest or value is None else metric(value, rest)


def first_metric(metrics: dict, paths: list[str]):
    """The first of `paths` that the run has (e.g. KL score on an LM, embedding score on
    the embedded encoder)."""
    for path in paths:
        if (value := metric(metrics, path)) is not None:
            return value
    return None


def job_overrides(job: Path) -> list[str]:
    return yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()) or []


def run_label(job: Path, swept_keys: set[str]) -> str:
    """The job's run, e.g. `+tc_sae_run=window_3` → `window_3`; in a sweep without a
    `_run` group, its values of the keys the sweep varies (`swept_keys`), e.g.
    `variant=topk,seed=1`, so that overrides a relaunch adds (resume=auto) do not matter."""
    overrides = job_overrides(job)
    runs = [o.split("=", 1)[1] for o in overrides if o.lstrip("+").split("=")[0].endswith("_run")]
    varied = [o for o in overrides if o.split("=", 1)[0] in swept_keys]
    return ",".join(runs) or ",".join(varied) or job.name


def swept_keys(config: dict) -> set[str]:
    """Keys the sweep's command gave several values (`variant=relu,topk`)."""
    parsed = OverridesParser.create().parse_overrides(config["hydra"]["overrides"]["task"])
    return {o.get_key_element() for o in parsed if o.is_sweep_override()}


def point_name(job: Path) -> str | None:
    """The job's `+matched_point=<name>` (matched-sparsity sweeps), or None."""
    overrides = job_overrides(job)
    names = [o.split("=", 1)[1] for o in overrides if o.lstrip("+").startswith("matched_point=")]
    return names[0] if names else None


def job_key(run: str, point: str | None) -> str:
    return run if point is None else f"{run} @ {point}"


def sweep_config(sweep: Path) -> dict:
    if not (sweep / "multirun.yaml").exists():
        raise SystemExit(f"{sweep} is not a Hydra multirun folder (no multirun.yaml)")
    return yaml.safe_load((sweep / "multirun.yaml").read_text())


def expected_runs(config: dict, declared: bool = False) -> list[str]:
    """The run names the sweep asked for, in order: a `+<paper>_run=a,b` override on the
    command line, else the experiment's sweeper parameter (`declared`: that one only)."""
    given = dict(o.split("=", 1) for o in config["hydra"]["overrides"]["task"] if "=" in o)
    params = {**(config["hydra"]["sweeper"]["params"] or {}), **({} if declared else given)}

    def values(suffix):
        return [v.strip() for k, vs in params.items() if k.lstrip("+").endswith(suffix)
                for v in str(vs).split(",")]

    points = values("matched_point") or [None]
    runs = values("_run")
    if runs or declared:
        return [job_key(run, point) for run in runs for point in points]
    return plain_sweep_labels(config["hydra"]["overrides"]["task"])


def plain_sweep_labels(task: list[str]) -> list[str]:
    """The labels (`run_label`) of every job of a sweep without a `_run` group, e.g.
    `-m variant=relu,topk seed=0,1`: the product of the swept values, in Hydra's order."""
    parsed = OverridesParser.create().parse_overrides(task)
    choices = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()]
               for o in parsed if o.is_sweep_override()]
    return [",".join(combo) for combo in itertools.product(*choices)] if choices else []


def run_metrics(job: Path) -> tuple[dict, dict | None]:
    """metrics.json, plus the training wall time from train_summary.json as
    `training.seconds`; and the run's provenance from the same file (None before it was
    recorded). A file that does not parse raises ValueError naming it."""
    def read(path: Path) -> dict:
        try:
            found = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"{path}: {err}") from None
        if not isinstance(found, dict):
            raise ValueError(f"{path}: not a JSON object")
        return found

    metrics = read(job / "metrics.json")
    path = job / "train_summary.json"
    summary = read(path) if path.exists() else {}
    if summary:
        metrics["training"] = {"seconds": summary.get("train_seconds")}
    return metrics, summary.get("provenance")


def provenance_line(rows: list[dict]) -> str:
    """Which commits and hardware the runs trained on (train_summary.json's `provenance`),
    with how many runs each; runs from before it was recorded are counted apart."""
    seen: dict[str, int] = {}
    for row in rows:
        found = row["provenance"]
        if found is None:
            key = "not recorded"
        else:
            commit = (found["commit"] or "no git checkout")[:7]
            key = (f"`{commit}`{' with local changes' if found['dirty'] else ''} on "
                   f"{found['device']} ({found['cpu']}, {found['cpu_count']} cores), "
                   f"torch {found['torch']}")
        seen[key] = seen.get(key, 0) + 1
    return "; ".join(f"{key}: {n} run{'s' * (n != 1)}" for key, n in seen.items())


@dataclass
class Collected:
    rows: list[dict]         # finished runs: label, key, metrics, provenance, point
    missing: list[str]       # runs the sweep's command asked for, without metrics
    unrequested: list[str]   # the experiment's declared runs, neither asked for nor here
    broken: list[str]        # "<folder>: <why>" for jobs whose files do not parse


def collect(sweep: Path, config: dict) -> Collected:
    """Read every job of the sweep. The experiment's declared runs that the command did not
    ask for are listed too (a relaunch with a narrowed run list rewrites multirun.yaml, and
    would otherwise hide them); a job whose files do not parse is skipped and listed.
    Refuses runs evaluated under different metric definitions (`metric_version`)."""
    jobs = sorted((p for p in sweep.iterdir() if (p / ".hydra").is_dir()),
                  key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0,
                                 p.name))
    rows, broken = [], []
    varied = swept_keys(config)
    for job in jobs:
        if (job / "metrics.json").exists():
            try:
                metrics, provenance = run_metrics(job)
                label = run_label(job, varied)
                rows.append({"run": label, "job": job, "metrics": metrics,
                             "provenance": provenance, "point": matched_point(job),
                             "key": job_key(label, point_name(job))})
            except (OSError, ValueError, yaml.YAMLError) as err:
                broken.append(f"{job}: {str(err).splitlines()[0]}")
    folders: dict[str, list[str]] = {}
    for row in rows:
        folders.setdefault(row["key"], []).append(row["job"].name)
    twice = {key: names for key, names in folders.items() if len(names) > 1}
    if twice:  # counted twice, a run would pass for two seeds and narrow every interval
        listing = "; ".join(f"{key}: {', '.join(names)}" for key, names in twice.items())
        raise ConfigError(f"{sweep}: the same run in more than one folder ({listing}); "
                          f"keep one of each")
    expected = expected_runs(config)
    order = {name: i for i, name in enumerate(expected)}  # the declared order, then the rest
    rows.sort(key=lambda row: order.get(row["key"], len(order)))
    versions: dict[int, list[str]] = {}
    for row in rows:  # metrics.json before metric_version existed: version 1
        versions.setdefault(row["metrics"].get("metric_version", 1), []).append(row["job"].name)
    if len(versions) > 1:
        listing = "; ".join(f"version {v}: {', '.join(jobs)}" for v, jobs in
                            sorted(versions.items()))
        raise ConfigError(f"{sweep}: runs evaluated with different metric definitions "
                          f"({listing}); re-evaluate the older ones with "
                          f"`python -m posae.evaluate run_dir=<job>` (docs/metrics.md)")
    done = {row["key"] for row in rows}
    unrequested = [name for name in expected_runs(config, declared=True)
                   if name not in done and name not in order]
    return Collected(rows, [name for name in expected if name not in done], unrequested,
                     broken)


def compared_methods(requested: list[str], declared: list[str], keys: list[str]) -> list[str]:
    """The methods the matched tables compare: the experiment's declared ones that were asked
    for or are in the folder, in the declared order (the first is the baseline), whether or
    not they have finished; then what the command asked for beyond them; then what earlier
    launches left in the folder (a narrowed relaunch rewrites multirun.yaml)."""
    present = [key.split(" @ ")[0] for key in keys]
    return list(dict.fromkeys([*(m for m in declared if m in requested or m in present),
                               *requested, *present]))


def paper_table(rows: list[dict], paper: dict) -> tuple[list[str], list[list]]:
    """The paper's metrics in its order, each our value followed by the paper's claim (for
    the metrics it claims anything about)."""
    metrics, claims = paper.get("metrics", {}), paper.get("claims") or {}
    claimed = {name for run in claims.values() for name in run}
    header = ["run", "variant"]
    for name in metrics:
        header += [name, f"{name} (paper)"] if name in claimed else [name]
    body = []
    for r in rows:
        row = [r["key"], r["metrics"]["sae"]["name"]]
        for name, paths in metrics.items():
            row.append(first_metric(r["metrics"], paths))
            if name in claimed:
                row.append(claims.get(r["run"], {}).get(name))
        body.append(row)
    return header, body


def standard_table(rows: list[dict]) -> tuple[list[str], list[str], list[list]]:
    """Labels, metrics.json paths and values of the standard metrics of every run."""
    kinds = sorted({k for r in rows if (k := metric(r["metrics"], "preservation.kind"))})
    extra = [(p.split(".")[-1], p) for kind in kinds for p in PRESERVATION.get(kind, [])]
    columns = STANDARD + extra
    body = [[r["key"], r["metrics"]["sae"]["name"], *(metric(r["metrics"], p) for _, p in columns)]
            for r in rows]
    return (["run", "variant", *(c for c, _ in columns)],
            ["run", "variant", *(p for _, p in columns)], body)


def cell(value) -> str:
    return "—" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def markdown_table(header: list[str], body: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(cell(v) for v in row) + " |" for row in body)]


def markdown(sweep: Path, paper: dict, paper_rows, standard_rows, found: Collected,
             provenance: str) -> str:
    lines = [f"# {paper.get('title', 'Sweep')}", "", f"Sweep: `{sweep}`. Missing runs "
             f"(no metrics.json yet): {', '.join(found.missing) or 'none'}.", ""]
    if found.unrequested:
        lines += [f"Declared by the experiment, not requested by this sweep's command and "
                  f"not in its folder: {', '.join(found.unrequested)}.", ""]
    if found.broken:
        lines += [f"Skipped, files that do not parse: {'; '.join(found.broken)}.", ""]
    lines += [f"Trained at: {provenance}.", ""]
    if paper.get("metrics"):
        lines += ["## The paper's metrics: ours, and the paper's figure beside each"
                  if paper.get("claims") else "## The experiment's metrics", "",
                  *markdown_table(*paper_rows), ""]
    lines += ["## Standard metrics (docs/metrics.md)", "", *markdown_table(*standard_rows)]
    return "\n".join(lines) + "\n"


def numeric_columns(header: list[str], body: list[list]) -> tuple[list[str], list[list]]:
    """run + variant + our numeric columns, each metric once (the papers' claims may be text
    and are left out; a paper metric that is also a standard one appears once)."""
    keep, seen = [0, 1], []
    for i in range(2, len(header)):
        values = [row[i] for row in body]
        numeric = all(v is None or isinstance(v, (int, float)) for v in values)
        if numeric and not header[i].endswith("(paper)") and values not in seen:
            keep.append(i)
            seen.append(values)
    return [header[i] for i in keep], [[row[i] for i in keep] for row in body]


def log_to_wandb(config: dict, sweep: Path, header: list[str], body: list[list],
                 images: dict) -> None:
    """The report as a W&B table (+ plots) in the sweep's group, when it logged to W&B."""
    from posae.training.loggers import WandbLogger

    cfg = OmegaConf.create({k: v for k, v in config.items() if k != "hydra"})
    group = f"{sweep.parent.name}/{sweep.name}"  # as posae.training.run names the runs' group
    logger = WandbLogger(cfg, sweep, name=f"report {group}", group=group, run_id=None)
    # a W&B column holds one type: the papers' figures (numbers or text) go as text
    claims = [name.endswith("(paper)") for name in header]
    logger.table("report", header, [[cell(v) if claim else v for v, claim in zip(row, claims)]
                                    for row in body])
    logger.images(images)
    logger.finish()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path, help="a `python -m posae.train -m` output folder")
    sweep = parser.parse_args(argv).sweep
    config = sweep_config(sweep)
    paper = config.get("paper") or {}
    try:
        collected = collect(sweep, config)
    except ConfigError as err:
        sys.exit(f"posae.report: {err}")
    rows = collected.rows
    paper_header, paper_body = paper_table(rows, paper)
    labels, paths, standard_body = standard_table(rows)
    text = markdown(sweep, paper, (paper_header, paper_body), (labels, standard_body), collected,
                    provenance_line(rows))
    groups, non_finite = matched.aggregate(rows, first_metric)
    requested, declared = (list(dict.fromkeys(key.split(" @ ")[0] for key in
                                              expected_runs(config, only)))
                           for only in (False, True))
    methods = compared_methods(requested, declared, [row["key"] for row in rows])
    if groups:
        common = int(paper.get("common_l0", matched.COMMON_L0))
        try:
            found = matched.effects(groups, methods, paper.get("compare"), common, declared)
        except ValueError as err:
            sys.exit(f"posae.report: {err}")
        missed = matched.l0_misses(rows)
        text += "\n" + "\n".join(matched.markdown(groups, methods, found, common, missed,
                                                     non_finite))
        (sweep / "matched.json").write_text(json.dumps(
            matched.summary_json(groups, found, common, missed, non_finite), indent=1))
    (sweep / "report.md").write_text(text)
    csv_header = paper_header + paths[2:]
    csv_body = [p + s[2:] for p, s in zip(paper_body, standard_body)]
    with open(sweep / "report.csv", "w", newline="") as f:
        csv.writer(f).writerows([csv_header, *csv_body])
    images = {}
    if rows:
        (sweep / "plots").mkdir(exist_ok=True)
        ours = numeric_columns(paper_header + labels[2:], csv_body)
        images["metrics_by_run"] = plots.runs_comparison(
            *ours, sweep / "plots" / "metrics_by_run.png")
        images["position_curves_by_run"] = plots.position_curves_of_runs(
            {r["key"]: r["metrics"]["by_position"] for r in rows},
            sweep / "plots" / "position_curves_by_run.png")
    if groups:
        images["frontier"] = plots.matched_frontier(
            groups, methods, [label for label, _ in matched.METRICS[1:]],
            sweep / "plots" / "frontier.png", paper.get("title", "matched sparsity"),
            matched.claimed_levels(paper))
    if (config.get("logger") or {}).get("name") == "wandb":
        log_to_wandb(config, sweep, csv_header, csv_body, images)
    missing, unrequested, broken = (collected.missing, collected.unrequested,
                                    collected.broken)
    print(f"{len(rows)} runs reported, {len(missing)} missing"
          f"{': ' + ', '.join(missing) if missing else ''}"
          f"{f'; {len(unrequested)} declared, not requested' if unrequested else ''}"
          f"{f'; {len(broken)} skipped, unreadable: ' + '; '.join(broken) if broken else ''}"
          f"; {sweep / 'report.md'}")


if __name__ == "__main__":
    main(sys.argv[1:])
