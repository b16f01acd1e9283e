"""Per-method mean ± sd over seeds at one target L0 of a matched sweep, for the numbers a
results file quotes beside the report's tables: held-out metrics (metrics.json) and the
last training step's mechanism state and coefficients (train_summary.json).

    python experiments/analysis/matched_runs.py experiments/runs/curriculum_matched/embedded
    python experiments/analysis/matched_runs.py <sweep> --l0 16 --extra mechanisms.mech/routing_norm
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

# (column, file, dotted path)
COLUMNS = [
    ("EV", "metrics.json", "core.explained_variance"),
    ("L0", "metrics.json", "core.l0"),
    ("‖x̂‖/‖x‖", "metrics.json", "core.l2_ratio"),
    ("position probe", "metrics.json", "structure.position_decodability.codes_accuracy"),
    ("final L1 coefficient", "train_summary.json", "mechanisms.coef/l1"),
]
FOLDER = re.compile(r"^(?P<run>.+)@l0_(?P<l0>\d+)_seed(?P<seed>\d+)$")


def lookup(tree: dict, path: str):
    """A value by dotted path, where a key may itself hold a slash (`mechanisms.coef/l1`)."""
    for key in path.split("."):
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def collect(sweep: Path, l0: int, columns: list[tuple[str, str, str]]) -> dict[str, dict]:
    """{method: {column: [values over seeds]}} of the finished runs at target `l0`."""
    found: dict[str, dict] = {}
    for job in sorted(sweep.iterdir()):
        match = FOLDER.match(job.name)
        if not match or int(match["l0"]) != l0 or not (job / "metrics.json").exists():
            continue
        files = {name: json.loads((job / name).read_text())
                 for name in {file for _, file, _ in columns} if (job / name).exists()}
        row = found.setdefault(match["run"], {"seeds": []})
        row["seeds"].append(int(match["seed"]))
        for label, file, path in columns:
            value = lookup(files.get(file, {}), path)
            if isinstance(value, (int, float)):
                row.setdefault(label, []).append(float(value))
    return found


def cell(values: list[float] | None) -> str:
    if not values:
        return "—"
    mean = statistics.fmean(values)
    return f"{mean:.3g} ± {statistics.stdev(values):.2g}" if len(values) > 1 else f"{mean:.3g}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path)
    parser.add_argument("--l0", type=int, default=32)
    parser.add_argument("--extra", action="append", default=[],
                        help="another column: a dotted path in train_summary.json")
    args = parser.parse_args(argv)
    columns = COLUMNS + [(path.split(".")[-1], "train_summary.json", path)
                         for path in args.extra]
    found = collect(args.sweep, args.l0, columns)
    labels = [label for label, _, _ in columns]
    print("| method | seeds | " + " | ".join(labels) + " |")
    print("|---" * (len(labels) + 2) + "|")
    for method, row in found.items():
        print(f"| `{method}` | {len(row['seeds'])} | "
              + " | ".join(cell(row.get(label)) for label in labels) + " |")


if __name__ == "__main__":
    main()
