"""Refresh a paper's results folder from its sweep's report (`python -m posae.report`).

`results.md` keeps what was written by hand above its marker line and gets the report
below it (headings one level down); the report's matched.json, its CSV (as results.csv) and
its plots are copied beside it. Run the report first:

    sweep=experiments/runs/curriculum_matched/embedded
    python -m posae.report $sweep && python experiments/publish.py $sweep experiments/004_curriculum
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

MARKER = "<!-- below: posae.report's output, refreshed by experiments/publish.py; edit above -->"
COPIED = {"matched.json": "matched.json", "report.csv": "results.csv",
          "plots/frontier.png": "plots/frontier.png",
          "plots/metrics_by_run.png": "plots/metrics_by_run.png",
          "plots/position_curves_by_run.png": "plots/position_curves_by_run.png"}


def report_body(report: str) -> str:
    """The report without its title, each heading one level down."""
    lines = report.splitlines()[1:]  # the first line is the report's `# title`
    return "\n".join("#" + line if line.startswith("#") else line for line in lines).strip()


def publish(sweep: Path, paper: Path) -> None:
    report, results = sweep / "report.md", paper / "results.md"
    if not report.exists():
        raise SystemExit(f"{report}: no report; run `python -m posae.report {sweep}` first")
    text = results.read_text() if results.exists() else ""
    if MARKER not in text:
        raise SystemExit(f"{results}: no marker line; add this line where the report should "
                         f"start:\n{MARKER}")
    head = text.split(MARKER)[0]
    results.write_text(f"{head}{MARKER}\n\n{report_body(report.read_text())}\n")
    for source, target in COPIED.items():
        if (sweep / source).exists():
            (paper / target).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(sweep / source, paper / target)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path, help="a sweep folder that posae.report has read")
    parser.add_argument("paper", type=Path, help="experiments/<paper>, holding results.md")
    args = parser.parse_args(argv)
    publish(args.sweep, args.paper)


if __name__ == "__main__":
    main()
