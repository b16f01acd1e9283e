"""`python -m posae.summary`: the table of experiments/SUMMARY.md, one row per paper
mechanism, from the matched sweeps' `matched.json` files committed beside each paper's
results (`experiments/<paper>/matched.json`, written by `posae.report`).

Each cell is the mechanism's effect at the sweep's common L0 against its comparator (the
ReLU baseline, or TopK for a mechanism on TopK): "better", "no difference" or "worse" with
the difference and its Welch 95 % interval over three seeds. For every metric here higher
is what the papers aim for, so "higher" reads "better". The table is written between the
two marker lines of SUMMARY.md; the text around it is left as it is.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from posae.matched import interval_text

EXPERIMENTS = Path("experiments")
SUMMARY = EXPERIMENTS / "SUMMARY.md"
BEGIN, END = "<!-- mechanisms table: python -m posae.summary -->", "<!-- end of table -->"

# (column, matched.json metric labels: the first the sweep has)
COLUMNS = [
    ("EV", ["EV"]),
    ("preservation", ["KL score", "embedding score (KL proxy)"]),
    ("temporal stability (adjacent Jaccard, chance-corrected)", ["adjacent Jaccard, corrected"]),
    ("position specificity (null-corrected)", ["specificity, corrected"]),
    ("probing top-1", ["probing top-1"]),
]
RECOVERY = "planted features recovered"

# (mechanism, [(paper folder, method in its matched sweep)], synthetic method or None)
MECHANISMS = [
    ("PA soft masks (000 eq. 3)", [("000_pa_sae", "t1_2_soft_masking")], None),
    ("PA hard masks (000 §5)", [("000_pa_sae", "t1_1_hard_masking")], None),
    ("PA adaptive rates (000 eq. 2, 4)", [("000_pa_sae", "t1_3_rates_only")], None),
    ("PA importance-weighted L1 (000 eq. 5-6)", [("000_pa_sae", "importance_only")], None),
    ("PA-SAE, all three (000)", [("000_pa_sae", "t1_3_full")], "pa_sae"),
    ("ATR temporal term R_t (001 eq. 2-3)", [("001_atr", "run_8_no_resampling"),
                                             ("001_atr", "topk_temporal")], "topk_temporal"),
    ("ATR R_t at a fixed α = 0.2 (001 Run 3; against R_t at its momentum α)",
     [("001_atr", "run_3_fixed_penalties")], None),
    ("ATR resampling (001 eq. 6)", [("001_atr", "resampling_only_100")], None),
    ("ATR resampling of random latents (control; against eq. 6's choice)",
     [("001_atr", "resampling_random_100")], None),
    ("ATR, all (001)", [("001_atr", "atr_resample_100")], "atr_resample_100"),
    ("hierarchical routing and gate (002 eq. 2-5)",
     [("002_hierarchical", "run_5_hierarchical")], "hierarchical"),
    ("hierarchical, L1 on the input codes only (control; against run 5)",
     [("002_hierarchical", "run_5_hierarchical_l1_input_codes")], None),
    ("pure attention routing (002 §4.2)",
     [("002_hierarchical", "run_8_pure_attention_routing")], None),
    ("position masking, hard (002, 004 run 1)", [("002_hierarchical", "run_2_position_masking"),
                                                 ("004_curriculum", "run_1_hard_masks")],
     "masked_hard"),
    ("position masking, hard, on TopK (control; against TopK)",
     [("004_curriculum", "topk_hard_masks")], None),
    ("position masking, Gaussian (002, 004 run 2)", [("002_hierarchical", "run_3_soft_masking"),
                                                     ("004_curriculum", "run_2_gaussian_masks")],
     None),
    ("position masking, Gaussian closed beyond 3σ (control)",
     [("004_curriculum", "run_2_gaussian_masks_cutoff_3sigma")], None),
    ("progressive masks (004 run 6)", [("004_curriculum", "run_6_progressive_masks")], None),
    ("range encoders (004 run 8)", [("004_curriculum", "run_8_range_encoders")], None),
    ("contrastive (002)", [("002_hierarchical", "run_6_contrastive"),
                           ("002_hierarchical", "topk_contrastive")], "contrastive"),
    ("contrastive at coefficients 1 and 10 (control; 002: 0.1)",
     [("002_hierarchical", "topk_contrastive_coef_1"),
      ("002_hierarchical", "topk_contrastive_coef_10")], None),
    ("multi-scale (002)", [("002_hierarchical", "run_7_multiscale")], "multiscale_510"),
    ("TC window (003 eq. 6)", [("003_tc_sae", "tc_sae"), ("003_tc_sae", "topk_tc_window")],
     "topk_tc_window"),
    ("T-SAE temporal InfoNCE (2511.05541 §3.2)",
     [("t_sae", "t_sae"), ("t_sae", "t_sae_code"), ("t_sae", "t_sae_temperature")], "t_sae"),
    ("Temporal SAE predicted part (2511.01836 eq. 3)", [("temporal_sae", "temporal_sae")],
     "temporal_sae"),
    ("Temporal SAE dictionary without prediction (control; against TopK)",
     [("temporal_sae", "no_prediction")], None),
]
NOT_MATCHABLE = [("curriculum adapters (004 eq. 3)",
                  "not matched: its codes add an adapter output no ReLU follows, so every latent "
                  "is active once the curriculum starts and no coefficient sets its L0")]


def load(folder: str) -> dict | None:
    path = EXPERIMENTS / folder / "matched.json"
    return json.loads(path.read_text()) if path.exists() else None


def unmatched(result: dict | None) -> set[str]:
    """Methods with a run off the target at the sweep's common L0 (matched.json)."""
    if result is None:
        return set()
    return {miss["method"] for miss in result.get("not_matched", [])
            if miss["target_l0"] == result.get("common_l0")}


def effect_text(effect: dict | None) -> str:
    if effect is None:
        return "—"
    word = {"higher": "better", "lower": "worse"}.get(effect["verdict"], effect["verdict"])
    return f"{word} {interval_text(effect)}"


def cell(result: dict | None, method: str, labels: list[str]) -> str:
    """The effect of `method` in one sweep's matched.json on the first label it has."""
    if result is None:
        return "not run yet"
    found = result["effects"].get(method)
    if found is None:
        return "not in the sweep"
    if "missing" in found:
        return found["missing"]
    label = next((label for label in labels if label in found), None)
    return effect_text(found.get(label)) if label else "—"


def sweep_label(folder: str) -> str:
    """A seed paper's number (`003` of `003_tc_sae`), or the folder's name."""
    return folder[:3] if folder[:3].isdigit() else folder


def table() -> list[str]:
    header = ["mechanism", "sweep: method (against)", *(c for c, _ in COLUMNS),
              "synthetic: planted features recovered"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    results = {folder: load(folder) for folder in {f for _, runs, _ in MECHANISMS
                                                    for f, _ in runs}}
    synthetic = load("synthetic")
    for name, runs, synthetic_method in MECHANISMS:
        recovery = "no synthetic run"
        if synthetic_method:
            against = ((synthetic or {}).get("effects", {}).get(synthetic_method, {})
                       .get("against", "—"))
            recovery = (f"{synthetic_method} ({against}): "
                        f"{cell(synthetic, synthetic_method, [RECOVERY])}")
        for i, (folder, method) in enumerate(runs):
            result = results[folder]
            against = (result or {}).get("effects", {}).get(method, {}).get("against", "—")
            mark = " †" if {method, against} & unmatched(result) else ""
            lines.append("| " + " | ".join([
                name if i == 0 else "″", f"{sweep_label(folder)}: {method} ({against}){mark}",
                *(cell(result, method, labels) for _, labels in COLUMNS),
                recovery if i == 0 else "″"]) + " |")
    for name, why in NOT_MATCHABLE:
        lines.append("| " + " | ".join([name, why, *[""] * (len(header) - 2)]) + " |")
    return lines + ["", "† a run behind the effect is not matched at the common L0 (held-out "
                        "L0 more than 10 % from the target, or training L0 not settled); "
                        "its paper's results.md names it."]


def main() -> None:
    text = SUMMARY.read_text()
    if BEGIN not in text or END not in text:
        sys.exit(f"{SUMMARY}: the marker lines {BEGIN!r} and {END!r} are missing")
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    SUMMARY.write_text(head + BEGIN + "\n" + "\n".join(table()) + "\n" + END + tail)
    print(f"{SUMMARY}: table of {len(MECHANISMS)} mechanisms written")


if __name__ == "__main__":
    main()
