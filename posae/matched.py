"""The matched-sparsity protocol's side of `posae.report` (docs/protocol.md).

A matched sweep runs every method at target L0s (`scale.target_l0`, with `match_l0=true`)
and seeds (`+matched_point=l0_<L0>_seed<s>`). Here runs are grouped by (method, target L0):
each metric's mean, standard deviation and count over seeds; each method's effect at the
common L0 against its comparator (the sweep's first method, or the one the experiment's
`paper.compare` names: TopK for a mechanism on TopK): the difference of means with its
Welch 95 % interval, written "higher", "lower" or "no difference" (the interval holds 0; no
verdict with fewer than two seeds a side); and a run whose L0 misses its target by more
than `L0_TOLERANCE`, or whose training L0 had not settled, is flagged.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import yaml
from scipy.stats import ttest_ind

# the L0 of the matched table; an experiment may name another (`paper.common_l0`)
COMMON_L0 = 32
L0_TOLERANCE = 0.1
SETTLED = 0.5
# (label, metrics.json paths: the first the run has); the preservation score is the KL
# score on causal LMs and the embedding score, its proxy, on MiniLM (docs/metrics.md)
METRICS = [
    ("L0", ["core.l0"]),
    ("EV", ["core.explained_variance"]),
    ("KL score", ["preservation.kl_score"]),
    ("embedding score (KL proxy)", ["preservation.embedding_score"]),
    ("adjacent Jaccard, corrected", ["temporal.adjacent_jaccard_corrected"]),
    ("adjacent code cosine, corrected", ["temporal.adjacent_code_cosine_corrected"]),
    ("specificity, corrected", ["structure.mean_corrected_specificity"]),
    ("position-specialised", ["structure.position_specialised_fraction"]),
    ("probing top-1", ["sparse_probing.*.mean.sae_top_1_test_accuracy"]),
    ("probing, all latents", ["sparse_probing.*.mean.sae_test_accuracy"]),
    ("planted features recovered", ["recovery.all.recovered_fraction"]),
]
# the frontier plot's y-axis labels: what each number is
AXIS_LABELS = {
    "EV": "explained variance\n(held-out)",
    "KL score": "KL score",
    "embedding score (KL proxy)": "embedding score\n(KL proxy)",
    "adjacent Jaccard, corrected": "adjacent Jaccard\n(0 = chance, 1 = equal)",
    "adjacent code cosine, corrected": "adjacent cosine\n(0 = chance, 1 = equal)",
    "specificity, corrected": "position specificity\n(0 = null)",
    "position-specialised": "position-specialised\nlatents (fraction)",
    "probing top-1": "sparse probing\ntop-1 accuracy",
    "probing, all latents": "probing accuracy\n(all latents)",
    "planted features recovered": "planted features\nrecovered (fraction)",
}


def matched_point(job: Path) -> tuple[int, int] | None:
    """(target L0, seed) of a job run under match_l0, from its saved config; else None."""
    config = yaml.safe_load((job / "run_config.yaml").read_text())
    if not config.get("match_l0"):
        return None
    return int(config["scale"]["target_l0"]), int(config["seed"])


def aggregate(rows: list[dict], first_metric) -> tuple[dict[tuple[str, int], dict[str, list]],
                                                        list[dict]]:
    """{(method, target L0): {metric label: values over seeds}} for rows with a point, and
    the non-finite values left out of it (each: method, target, seed and metric)."""
    groups: dict[tuple[str, int], dict[str, list]] = defaultdict(lambda: defaultdict(list))
    non_finite = []
    for row in rows:
        if row.get("point") is None:
            continue
        (target, seed), values = row["point"], groups[(row["run"], row["point"][0])]
        for label, paths in METRICS:
            value = first_metric(row["metrics"], paths)
            if value is None:
                continue
            if math.isfinite(value):
                values[label].append(float(value))
            else:
                non_finite.append({"method": row["run"], "target_l0": target, "seed": seed,
                                   "metric": label})
    return groups, non_finite


def summary(values: list[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (0 for one value) and count."""
    if not values:
        return math.nan, math.nan, 0
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0, \
        len(values)


def effect(values: list[float], baseline: list[float]) -> dict | None:
    """Difference of means (values - baseline) with its Welch 95 % interval and the verdict
    "higher", "lower" or "no difference" (the interval holds 0); None with fewer than two
    values a side. Where neither side varies (a quantised metric) the interval is the
    difference itself and `no_spread` says so."""
    if len(values) < 2 or len(baseline) < 2:
        return None
    difference = float(np.mean(values) - np.mean(baseline))
    no_spread = bool(np.std(values) == 0 and np.std(baseline) == 0)
    if no_spread:
        low = high = difference
    else:
        interval = ttest_ind(values, baseline, equal_var=False).confidence_interval(0.95)
        low, high = float(interval.low), float(interval.high)
    found = "higher" if low > 0 else "lower" if high < 0 else "no difference"
    return {"difference": difference, "ci95": [low, high], "verdict": found,
            "no_spread": no_spread}


def comparators(methods: list[str], compare: dict | None,
                declared: list[str] | None = None) -> dict[str, str]:
    """{method: the method it is compared with}: the sweep's first method unless the
    experiment's `paper.compare` names another. Both names of an entry must be among
    `declared`, the experiment's own list of runs (this sweep's `methods` by default); an
    entry for a method this sweep does not run (a subset given on the command line) is
    left out."""
    compare, declared = dict(compare or {}), declared or methods
    for method, other in compare.items():
        for name in (method, other):
            if name not in declared:
                raise ValueError(f"paper.compare: {method}: {other} names {name}, which is not "
                                 f"among the experiment's runs {declared}")
    return {method: compare.get(method, methods[0]) for method in methods[1:]}


def effects(groups: dict, methods: list[str], compare: dict | None, common: int,
            declared: list[str] | None = None) -> dict:
    """{method: {"against": comparator, metric label: effect or None}} at the common L0;
    "missing" says why there is nothing to compare yet."""
    found = {}
    for method, other in comparators(methods, compare, declared).items():
        values, base = groups.get((method, common)), groups.get((other, common))
        if other not in methods:
            found[method] = {"against": other, "missing": f"{other} is not in this sweep"}
        elif not values or not base:
            found[method] = {"against": other, "missing": f"no finished run of "
                             f"{method if not values else other} at L0 {common} yet"}
        else:
            found[method] = {"against": other, **{
                label: effect(values.get(label, []), base.get(label, []))
                for label, _ in METRICS if label != "L0" and values.get(label)}}
    return found


def cell(mean: float, sd: float, n: int) -> str:
    if n == 0:
        return "—"
    return f"{mean:.4g}" if n == 1 else f"{mean:.4g} ± {sd:.2g}"


def interval_text(e: dict) -> str:
    """An effect's difference and 95 % interval, e.g. `+0.02 [+0.01, +0.03]`."""
    return f"{e['difference']:+.3g} [{e['ci95'][0]:+.3g}, {e['ci95'][1]:+.3g}]"


def effect_cell(e: dict | None) -> str:
    if e is None:
        return "—"
    return f"{interval_text(e)} {e['verdict']}" + (" (no spread)" if e["no_spread"] else "")


def l0_misses(rows: list[dict]) -> list[dict]:
    """Runs whose held-out L0 is more than L0_TOLERANCE away from their target (or not a
    number), or whose training L0 had not settled: over the last quarter of the logged
    steps it left ±`SETTLED` of the target (a controller that oscillates can end near the
    target). Each: method, target, seed and the reason."""
    missed = []
    for row in rows:
        if row.get("point") is None:
            continue
        (target, seed), l0 = row["point"], row["metrics"]["core"]["l0"]
        reasons = []
        if not abs(l0 - target) <= L0_TOLERANCE * target:
            reasons.append(f"held-out L0 {l0:.1f}")
        path = row["job"] / "train_log.jsonl"
        if path.exists():
            trace = [json.loads(line)["l0"] for line in path.read_text().splitlines()]
            late = trace[len(trace) * 3 // 4:]
            if late and (min(late) < (1 - SETTLED) * target or max(late) > (1 + SETTLED) * target):
                reasons.append(f"training L0 not settled, {min(late):.1f}–{max(late):.1f} over "
                               f"the last quarter")
        if reasons:
            missed.append({"method": row["run"], "target_l0": target, "seed": seed,
                           "reason": "; ".join(reasons)})
    return missed


def markdown(groups: dict, methods: list[str], found: dict, common: int, missed: list[dict],
             non_finite: list[dict]
             ) -> list[str]:
    """The matched table at the common L0 (mean ± sd over seeds), the effects table (each
    method against its comparator: difference, Welch 95 % interval, verdict; † where a run
    behind it is not matched) and the frontier table (every target L0)."""
    labels = [label for label, _ in METRICS
              if any(groups[key].get(label) for key in groups)]
    header = ["method", "seeds"] + labels
    lines = [f"## At matched L0 = {common} (mean ± sd over seeds)", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method in methods:
        values = groups.get((method, common), {})
        n = max((len(values[label]) for label in labels if values.get(label)), default=0)
        lines.append("| " + " | ".join([method, str(n), *(
            cell(*summary(values.get(label, []))) for label in labels)]) + " |")
    unmatched = {m["method"] for m in missed if m["target_l0"] == common}
    compared = [label for label in labels if label != "L0"]
    lines += ["", f"## Effects at L0 = {common}: difference from the comparator, Welch 95 % "
              "interval; \"no difference\" where the interval holds 0; † a run behind it is "
              "not matched", "",
              "| method | against | " + " | ".join(compared) + " |",
              "|" + "---|" * (len(compared) + 2)]
    for method, result in found.items():
        mark = " †" if {method, result["against"]} & unmatched else ""
        cells = ([result["missing"]] + [""] * (len(compared) - 1) if "missing" in result
                 else [effect_cell(result.get(label)) for label in compared])
        lines.append("| " + " | ".join([method + mark, result["against"], *cells]) + " |")
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
    dropped = [f"{v['method']} (target {v['target_l0']}, seed {v['seed']}): {v['metric']}"
               for v in non_finite]
    listing = "; ".join(f"{m['method']} (target {m['target_l0']}, seed {m['seed']}): "
                        f"{m['reason']}" for m in missed)
    lines += ["", f"Runs not matched (held-out L0 more than {L0_TOLERANCE:.0%} from the target, "
              f"or training L0 outside ±{SETTLED:.0%} of it in the last quarter): "
              f"{listing or 'none'}.", "",
              f"Non-finite values left out: {'; '.join(dropped) or 'none'}.", ""]
    return lines


def claimed_levels(paper: dict) -> dict[str, list[tuple[str, float]]]:
    """{frontier metric label: [(method, the paper's number)]}: the experiment's numeric
    claims on a metric the frontier shows (their `paper.metrics` paths overlap). Drawn as
    reference levels, not points: the papers' numbers are Gemma-2-2b's at their own L0."""
    paths = paper.get("metrics", {})
    levels = defaultdict(list)
    for method, claims in (paper.get("claims") or {}).items():
        for name, value in claims.items():
            label = next((label for label, ours in METRICS
                          if set(ours) & set(paths.get(name, []))), None)
            if label and label != "L0" and isinstance(value, (int, float)):
                levels[label].append((method, float(value)))
    return dict(levels)


def summary_json(groups: dict, found: dict, common: int, missed: list[dict],
                 non_finite: list[dict]) -> dict:
    """`matched.json`: per (method, target L0) each metric's mean, sd and seeds, the effects
    at the common L0, the runs not matched and the non-finite values left out; what
    experiments/SUMMARY.md is read from."""
    return {
        "common_l0": common,
        "points": [{"method": method, "target_l0": target, **{
            label: dict(zip(("mean", "sd", "n"), summary(values)))
            for label, values in metrics.items()}}
            for (method, target), metrics in sorted(groups.items())],
        "effects": found,
        "not_matched": missed,
        "non_finite": non_finite,
    }
