"""`python -m posae.report <multirun dir>`: one table (markdown + CSV) and comparison plots
of a sweep's runs, from each run's metrics.json; works on a partly finished sweep and says
which runs are missing.

    python -m posae.train -m +experiment=tc_sae_runs
    python -m posae.report outputs/sweeps/tc_sae_runs/<date>
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import yaml

from posae.eval import plots

# (column, section, key): the scalars every report shows, in metrics.json's names
COLUMNS = [
    ("EV", "core", "explained_variance"), ("MSE", "core", "mse"), ("L0", "core", "l0"),
    ("dead", "core", "dead_fraction"), ("cosine", "core", "cosine_similarity"),
    ("adjacent Jaccard", "temporal", "adjacent_jaccard"),
    ("adjacent code cosine", "temporal", "adjacent_code_cosine"),
    ("mean specificity", "structure", "mean_position_specificity"),
]
PRESERVATION = {"causal_lm": ["kl_score", "ce_score"], "encoder": ["embedding_score"]}


def run_label(job: Path) -> str:
    """The job's sweep overrides, e.g. `+tc_sae_run=window_3` → `window_3`."""
    overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()) or []
    swept = [o.split("=", 1)[1] for o in overrides if o.lstrip("+").split("=")[0].endswith("_run")]
    return ",".join(swept) or ",".join(overrides) or job.name


def expected_runs(sweep: Path) -> list[str]:
    """The run names the sweep asked for (from Hydra's multirun.yaml), in order."""
    config = yaml.safe_load((sweep / "multirun.yaml").read_text())
    params = config["hydra"]["sweeper"]["params"] or {}
    return [v.strip() for k, vs in params.items() if k.lstrip("+").endswith("_run")
            for v in str(vs).split(",")]


def collect(sweep: Path) -> tuple[list[dict], list[str]]:
    """Rows of finished runs (label + metrics) and the names of runs without metrics."""
    if not (sweep / "multirun.yaml").exists():
        raise SystemExit(f"{sweep} is not a Hydra multirun folder (no multirun.yaml)")
    jobs = sorted((p for p in sweep.iterdir() if (p / ".hydra").is_dir()),
                  key=lambda p: int(p.name) if p.name.isdigit() else p.name)
    rows = []
    for job in jobs:
        if (job / "metrics.json").exists():
            rows.append({"run": run_label(job), "dir": job.name,
                         "metrics": json.loads((job / "metrics.json").read_text())})
    done = {row["run"] for row in rows}
    return rows, [name for name in expected_runs(sweep) if name not in done]


def table(rows: list[dict]) -> tuple[list[str], list[list]]:
    kinds = {r["metrics"].get("preservation", {}).get("kind") for r in rows}
    extra = [k for kind in sorted(k for k in kinds if k) for k in PRESERVATION[kind]]
    header = ["run", "variant", *(c for c, _, _ in COLUMNS), *extra]
    body = []
    for r in rows:
        m = r["metrics"]
        values = [m.get(section, {}).get(key) for _, section, key in COLUMNS]
        values += [m.get("preservation", {}).get(k) for k in extra]
        body.append([r["run"], m["sae"]["name"], *values])
    return header, body


def markdown(header: list[str], body: list[list], missing: list[str], sweep: Path) -> str:
    def cell(v):
        return "—" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = [f"# Sweep {sweep}", "", "| " + " | ".join(header) + " |",
             "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in body]
    lines += ["", f"Missing runs (no metrics.json yet): {', '.join(missing) or 'none'}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path, help="a `python -m posae.train -m` output folder")
    sweep = parser.parse_args(argv).sweep
    rows, missing = collect(sweep)
    header, body = table(rows)
    (sweep / "report.md").write_text(markdown(header, body, missing, sweep))
    with open(sweep / "report.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *body])
    if rows:
        (sweep / "plots").mkdir(exist_ok=True)
        plots.runs_comparison(header, body, sweep / "plots" / "metrics_by_run.png")
        plots.position_curves_of_runs(
            {r["run"]: r["metrics"]["by_position"] for r in rows},
            sweep / "plots" / "position_curves_by_run.png")
    print(f"{len(rows)} runs reported, {len(missing)} missing"
          f"{': ' + ', '.join(missing) if missing else ''}; {sweep / 'report.md'}")


if __name__ == "__main__":
    main(sys.argv[1:])
