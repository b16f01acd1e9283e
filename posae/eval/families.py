"""The metric families of an evaluation, each a function (inputs, settings) -> (sections of
metrics.json, plots written), by the name `seconds` times it under (docs/metrics.md).

`held_out` (sections `core`, `temporal`, `by_position`) always runs, first: the others
read its tables. `structure`, `smoothness`, `preservation`, `sparse_probing`
(eval.families: `probing`), `word_class` and `absorption` run when `eval.families` names
them; `recovery` on synthetic data, which has no language model for the last four.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from posae.config import EvalConfig, probing_task_file
from posae.data.synthetic import FAMILIES as PLANTED_FAMILIES
from posae.data.synthetic import SyntheticActivations
from posae.eval import plots
from posae.eval.absorption import AbsorptionConfig, absorption
from posae.eval.inputs import EvalInputs, subsample
from posae.eval.preservation import model_preservation
from posae.eval.recovery import recovery
from posae.eval.smoothness import group_bounds, sequence_measurements
from posae.eval.sparse_probing import (
    load_probing_task,
    probing_config,
    sparse_probing,
    task_config,
)
from posae.eval.structure import (
    position_decodability,
    position_specificity,
    profile_clusters,
    specificity_summary,
)
from posae.eval.word_class import WORD_CLASS_TOKENS, word_class_labels, word_class_probing

log = logging.getLogger("posae")

Family = Callable[[EvalInputs, EvalConfig], tuple[dict, dict[str, Path]]]


def training_dead_fraction(inputs: EvalInputs) -> dict:
    """The headline dead fraction: latents that did not fire over the last
    `trainer.dead_after_tokens` training tokens (as SAELens's dead-feature window), from
    train_summary.json; the held-out pass alone sees too few tokens (a latent firing at
    1e-5 looks dead on 25k tokens with probability 0.78). Null without a training record."""
    path, window = inputs.run_dir / "train_summary.json", inputs.trainer.dead_after_tokens
    summary = json.loads(path.read_text()) if path.exists() else {}
    if summary.get("tokens", 0) < window:  # no record, or too short a run to tell
        return {"dead_fraction": None, "dead_window_tokens": None}
    return {"dead_fraction": summary["final_train_stats"].get("dead_fraction"),
            "dead_window_tokens": window}


def held_out_family(inputs: EvalInputs, cfg: EvalConfig):
    """`core`, `temporal`, `by_position` (docs/metrics.md); `core.dead_fraction` is the
    training window's, the pass's own is `core.dead_fraction_held_out`."""
    result, figures = inputs.held_out, {}
    core = {k: v for k, v in result["core"].items() if k != "dead_fraction"}
    core["dead_fraction_held_out"] = result["core"]["dead_fraction"]
    core.update(training_dead_fraction(inputs))
    if cfg.plots:
        arrays, title = result["_arrays"], inputs.title
        figures["feature_density"] = plots.feature_density(
            arrays["frequency"], inputs.plot_dir / "feature_density.png", title)
        figures["position_curves"] = plots.position_curves(
            result["by_position"], inputs.plot_dir / "position_curves.png", title)
        figures["adjacent_stability"] = plots.adjacent_stability(
            result["by_position"], result["temporal"],
            inputs.plot_dir / "adjacent_stability.png", title)
        figures["feature_position_heatmap"] = plots.feature_position_heatmap(
            arrays["firing_rate"], arrays["positions"], inputs.plot_dir / "feature_position.png",
            title)
    return ({"core": core, "temporal": result["temporal"],
             "by_position": result["by_position"]}, figures)


def held_out_tokens(inputs: EvalInputs, max_tokens: int, label_row=None) -> dict:
    """Codes (before any input-independent offset), raw activations, positions, sequence
    ids and, with `label_row` (a sequence's token ids -> one label each), labels of up to
    `max_tokens` counted held-out tokens, whole sequences at a time, drawn in a seeded
    random order from the evaluation's held-out sequences."""
    ids, batch = np.random.default_rng(0).permutation(inputs.ids), inputs.batch_sequences
    found, n = {key: [] for key in ("codes", "raw", "positions", "sequences", "labels")}, 0
    for i, b in zip(range(0, len(ids), batch), inputs.held_out_batches(ids, batch)):
        f = inputs.sae(b.x, b.pos, b.mask).input_codes
        rows = torch.as_tensor(ids[i : i + batch], device=b.x.device)[:, None].expand_as(b.pos)
        for key, value in (("codes", f), ("raw", b.x), ("positions", b.pos),
                           ("sequences", rows)):
            found[key].append(value[b.mask].cpu().numpy())
        if label_row is not None:
            mask = b.mask.cpu().numpy()
            found["labels"] += [label_row(row)[m] for row, m in zip(b.tokens.cpu().numpy(), mask)]
        n += int(b.mask.sum())
        if n >= max_tokens:
            break
    return {key: np.concatenate(value) for key, value in found.items() if value}


def structure_family(inputs: EvalInputs, cfg: EvalConfig):
    """`structure`: position specificity against its null, position-profile clusters,
    position decodability (posae/eval/structure.py)."""
    arrays, figures = inputs.held_out["_arrays"], {}
    spec = position_specificity(arrays["fire_counts"], arrays["position_tokens"])
    clusters = profile_clusters(arrays["mean_activation"], arrays["frequency"],
                                cfg.cluster_latents, cfg.max_clusters)
    tokens = held_out_tokens(inputs, cfg.position_probe_tokens)
    codes, raw, positions, sequences = (tokens[k] for k in ("codes", "raw", "positions",
                                                            "sequences"))
    section = {
        **specificity_summary(spec),
        "position_profile_clusters": clusters["n_clusters"],
        "position_profile_silhouette": clusters.get("silhouette"),
        "position_decodability": position_decodability(
            codes, raw, positions, sequences, inputs.req.context_size, cfg.position_buckets),
    }
    if cfg.plots:
        figures["position_specificity"] = plots.specificity_against_null(
            spec, arrays["fire_counts"].sum(0), inputs.plot_dir / "position_specificity.png",
            inputs.title)
        if clusters["linkage"] is not None:
            figures["position_profile_dendrogram"] = plots.profile_dendrogram(
                clusters, inputs.plot_dir / "position_profile_dendrogram.png", inputs.title)
    return {"structure": section}, figures


def smoothness_family(inputs: EvalInputs, cfg: EvalConfig):
    """`smoothness`, and `predicted_novel` for SAEs with a predicted part, each beside its
    value on the same sequences shuffled (posae/eval/smoothness.py)."""
    batches = inputs.held_out_batches(inputs.ids, inputs.batch_sequences)
    return sequence_measurements(inputs.sae, batches), {}


def word_class_family(inputs: EvalInputs, cfg: EvalConfig):
    """`word_class_probing`: closed word classes of held-out tokens from their codes
    (posae/eval/word_class.py), the syntactic beside `sparse_probing`'s semantic."""
    tokenizer = inputs.lm.tokenizer
    tokens = held_out_tokens(inputs, WORD_CLASS_TOKENS,
                             lambda row: word_class_labels(tokenizer, row))
    return {"word_class_probing": {"tokens": len(tokens["labels"]), **word_class_probing(
        tokens["raw"], tokens["codes"], tokens["labels"], group_bounds(inputs.sae))}}, {}


def recovery_family(inputs: EvalInputs, cfg: EvalConfig):
    """`recovery`: the planted dictionary of `dataset=synthetic` (posae/eval/recovery.py)."""
    arrays, figures = inputs.held_out["_arrays"], {}
    source = SyntheticActivations(inputs.req.dataset.synthetic, inputs.req.context_size)
    found = recovery(inputs.sae, source, arrays["firing_rate"], arrays["mean_activation"],
                     arrays["positions"])
    if cfg.plots:
        figures["recovery"] = plots.recovery_histogram(
            found["_max_cosine"], found["_family"], PLANTED_FAMILIES, found["threshold"],
            inputs.plot_dir / "recovery.png", inputs.title)
    return {"recovery": found}, figures


def _preservation_sequences(inputs: EvalInputs, ids: np.ndarray, batch: int):
    special = torch.tensor(inputs.cache.special_token_ids)
    for start in range(0, len(ids), batch):
        seqs = inputs.cache.sequences(ids[start : start + batch])
        tokens, attention = torch.as_tensor(seqs.tokens).long(), torch.as_tensor(seqs.mask)
        yield tokens, attention, attention & ~torch.isin(tokens, special)


def preservation_family(inputs: EvalInputs, cfg: EvalConfig):
    """`preservation`: x̂ spliced into the model on `eval.preservation_sequences` held-out
    sequences (posae/eval/preservation.py)."""
    sequences = _preservation_sequences(inputs, subsample(inputs.ids, cfg.preservation_sequences),
                                        cfg.batch_sequences)
    return {"preservation": model_preservation(inputs.sae, inputs.lm, inputs.layer,
                                               sequences)}, {}


def probing_family(inputs: EvalInputs, cfg: EvalConfig):
    """`sparse_probing`: SAEBench sparse probing per task of `eval.probing_tasks`, texts
    cut to the run's context (posae/eval/sparse_probing/)."""
    settings = probing_config({**cfg.probing, "context_size": inputs.req.context_size})
    section, figures = {}, {}
    for name in cfg.probing_tasks:
        task = load_probing_task(task_config(OmegaConf.load(probing_task_file(name))))
        result = sparse_probing(inputs.sae, inputs.lm, inputs.special, inputs.layer, task,
                                settings)
        section[name] = result
        if cfg.plots:
            figures[f"sparse_probing_{name}"] = plots.sparse_probing_curve(
                result, result["settings"]["ks"],
                inputs.plot_dir / f"sparse_probing_{name}.png", f"{inputs.title} · {name}")
    return {"sparse_probing": section}, figures


def absorption_family(inputs: EvalInputs, cfg: EvalConfig):
    """`absorption`: first-letter feature absorption (posae/eval/absorption.py)."""
    return {"absorption": absorption(inputs.sae, inputs.lm, inputs.special, inputs.layer,
                                     inputs.req.context_size,
                                     AbsorptionConfig(**cfg.absorption))}, {}


FAMILIES: dict[str, Family] = {
    "held_out": held_out_family,
    "structure": structure_family,
    "smoothness": smoothness_family,
    "recovery": recovery_family,
    "preservation": preservation_family,
    "sparse_probing": probing_family,
    "absorption": absorption_family,
    "word_class": word_class_family,
}
# eval.families names of the families that need the language model, by their FAMILIES name
LANGUAGE_MODEL_FAMILIES = {"preservation": "preservation", "probing": "sparse_probing",
                           "word_class": "word_class", "absorption": "absorption"}


def families_to_run(inputs: EvalInputs, cfg: EvalConfig) -> list[str]:
    """The FAMILIES this evaluation runs, in order (module docstring)."""
    chosen = ["held_out", *(name for name in ("structure", "smoothness") if name in cfg.families)]
    asked = [name for name in LANGUAGE_MODEL_FAMILIES if name in cfg.families]
    if inputs.req.dataset.synthetic is None:
        return chosen + [LANGUAGE_MODEL_FAMILIES[name] for name in asked]
    if asked:
        log.info("no language model behind synthetic activations: %s skipped",
                 ", ".join(sorted(asked)))
    return chosen + ["recovery"]
