"""The matched-sparsity protocol's side of `posae.report` (docs/protocol.md).

A matched sweep runs every method at target L0s (`scale.target_l0`, with `match_l0=true`)
and seeds (`+matched_point=l0_<L0>_seed<s>`). Here runs are grouped by (method, target L0):
each metric's mean, standard deviation and count over seeds; each method against the
sweep's first method (the baseline) at the common L0 by Welch's t-test, written "higher",
"lower" or "no difference" (p ≥ 0.05; no verdict with fewer than two seeds a side); and a
run whose L0 misses its target by more than `L0_TOLERANCE`, or whose training L0 had not
settled, is flagged.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import yaml
from scipy.stats import ttest_ind

COMMON_L0 = 32
L0_TOLERANCE = 0.1
SETTLED = 0.5
# (label, metrics.json paths: the first the run has)
METRICS = [
    ("L0", ["core.l0"]),
    ("EV", ["core.explained_variance"]),
    ("preservation", ["preservation.kl_score", "preservation.embedding_score"]),
    ("adjacent Jaccard, corrected", ["temporal.adjacent_jaccard_corrected"]),
    ("adjacent code cosine, corrected", ["temporal.adjacent_code_cosine_corrected"]),
    ("specificity, corrected", ["structure.mean_corrected_specificity"]),
    ("position-specialised", ["structure.position_specialised_fraction"]),
    ("probing top-1", ["sparse_probing.*.mean.sae_top_1_test_accuracy"]),
    ("probing, all latents", ["sparse_probing.*.mean.sae_test_accuracy"]),
    ("planted features recovered", ["recovery.all.recovered_fraction"]),
]


def matched_point(job: Path) -> tuple[int, int] | None:
    """(target L0, seed) of a job run under match_l0, from its saved config; else None."""
    config = yaml.safe_load((job / "run_config.yaml").read_text())
    if not config.get("match_l0"):
        return None
    return int(config["scale"]["target_l0"]), int(config["seed"])


def aggregate(rows: list[dict], first_metric) -> dict[tuple[str, int], dict[str, list[float]]]:
    """{(method, target L0): {metric label: values over seeds}} for rows with a point."""
    groups: dict[tuple[str, int], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if row.get("point") is None:
            continue
        values = groups[(row["run"], row["point"][0])]
        for label, paths in METRICS:
            value = first_metric(row["metrics"], paths)
            if value is not None and math.isfinite(value):
                values[label].append(float(value))
    return groups


def summary(values: list[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (0 for one value) and count."""
    if not values:
        return math.nan, math.nan, 0
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0, \
        len(values)


def verdict(values: list[float], baseline: list[float]) -> str | None:
    """Welch's t-test at 5 %: "higher", "lower" or "no difference"; None (no test) with fewer
    than two values a side."""
    if len(values) < 2 or len(baseline) < 2:
        return None
    if np.std(values) == 0 and np.std(baseline) == 0:
        return "no difference" if values[0] == baseline[0] else (
            "higher" if values[0] > baseline[0] else "lower")
    p = ttest_ind(values, baseline, equal_var=False).pvalue
    if not p < 0.05:
        return "no difference"
    return "higher" if np.mean(values) > np.mean(baseline) else "lower"


def cell(mean: float, sd: float, n: int) -> str:
    if n == 0:
        return "—"
    return f"{mean:.4g}" if n == 1 else f"{mean:.4g} ± {sd:.2g}"


def l0_misses(rows: list[dict]) -> list[str]:
    """Runs whose held-out L0 is more than L0_TOLERANCE away from their target, or whose
    training L0 had not settled: over the last quarter of the logged steps it left
    ±`SETTLED` of the target (a controller that oscillates can end near the target)."""
    missed = []
    for row in rows:
        if row.get("point") is None:
            continue
        target, l0 = row["point"][0], row["metrics"]["core"]["l0"]
        name = f"{row['run']} (target {target}, seed {row['point'][1]})"
        if abs(l0 - target) > L0_TOLERANCE * target:
            missed.append(f"{name}: held-out L0 {l0:.1f}")
        path = row["job"] / "train_log.jsonl"
        if path.exists():
            trace = [json.loads(line)["l0"] for line in path.read_text().splitlines()]
            late = trace[len(trace) * 3 // 4:]
            if late and (min(late) < (1 - SETTLED) * target or max(late) > (1 + SETTLED) * target):
                missed.append(f"{name}: training L0 not settled, {min(late):.1f}–{max(late):.1f}"
                              f" over the last quarter")
    return missed


def markdown(rows: list[dict], groups: dict, methods: list[str]) -> list[str]:
    """The matched table at the common L0 (mean ± sd over seeds, each metric beside the
    verdict against the first method) and the frontier table (every target L0)."""
    baseline = methods[0]
    labels = [label for label, _ in METRICS
              if any(groups[key].get(label) for key in groups)]
    header = ["method", "seeds"] + [f"{label}" for label in labels]
    lines = [f"## At matched L0 = {COMMON_L0} (mean ± sd over seeds; against {baseline})", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method in methods:
        values = groups.get((method, COMMON_L0), {})
        n = max((len(v) for v in values.values()), default=0)
        cells = []
        for label in labels:
            text = cell(*summary(values.get(label, [])))
            if method != baseline and label != "L0" and values.get(label):
                found = verdict(values[label], groups[(baseline, COMMON_L0)].get(label, []))
                text += f" ({found})" if found else ""
            cells.append(text)
        lines.append("| " + " | ".join([method, str(n), *cells]) + " |")
    targets = sorted({target for _, target in groups})
    lines += ["", "## Frontier: every target L0 (mean over seeds where there are several)", "",
              "| method | target L0 | " + " | ".join(labels) + " |",
              "|" + "---|" * (len(labels) + 2)]
    for method in methods:
        for target in targets:
            values = groups.get((method, target))
            if values:
                lines.append("| " + " | ".join([method, str(target), *(
                    cell(*summary(values.get(label, []))) for label in labels)]) + " |")
    missed = l0_misses(rows)
    lines += ["", f"Runs not matched (held-out L0 more than {L0_TOLERANCE:.0%} from the target, "
              f"or training L0 outside ±{SETTLED:.0%} of it in the last quarter): "
              f"{'; '.join(missed) or 'none'}.", ""]
    return lines
