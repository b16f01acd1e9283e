"""Evaluate the SAE saved in a training run's folder: `metrics.json` and `plots/` beside it.

The run's saved config names the cache, layer and model; its held-out sequences (the
last `trainer.eval_fraction` of the cache, never trained on) feed the cache-based
metrics and the model-preservation splice. Schema of metrics.json: docs/metrics.md.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from posae.config import (
    ConfigError,
    EvalConfig,
    cache_request,
    probing_task_file,
    trainer_config,
)
from posae.data.cache_format import CacheSpec
from posae.data.cache_reader import ActivationCache
from posae.data.sequences import SpecialTokens
from posae.data.synthetic import FAMILIES, SyntheticActivations
from posae.eval import plots
from posae.eval.absorption import AbsorptionConfig, absorption
from posae.eval.held_out import held_out_pass
from posae.eval.preservation import model_preservation
from posae.eval.recovery import recovery
from posae.eval.safe import json_safe
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
from posae.models.lm import load_language_model, resolve_device
from posae.sae import load_sae
from posae.sae.base import SAE
from posae.training.batches import BatchLoader, held_out_split, split_fingerprint, whole_sequences

log = logging.getLogger("posae")

SCHEMA_VERSION = 1
# The definitions behind the numbers (docs/metrics.md). 2: specificity against its null,
# chance-corrected adjacency, zero ablation of every position, raw-feature probes, document
# split, training-window dead fraction. posae.report refuses to mix versions.
METRIC_VERSION = 2
RUN_CONFIG = "run_config.yaml"


class RunInputs:
    """What an evaluation reads from a run folder, checked before any compute."""

    def __init__(self, run_dir: Path, device: torch.device):
        self.run_dir = Path(run_dir)
        for needed in (RUN_CONFIG, "sae/cfg.json"):
            if not (self.run_dir / needed).exists():
                raise ConfigError(f"run_dir: {self.run_dir} has no {needed}; pass the folder "
                                  f"of a finished `python -m posae.train` run")
        self.cfg = OmegaConf.load(self.run_dir / RUN_CONFIG)
        self.req = cache_request(self.cfg, "layer")
        self.layer = self.req.layers[0]
        self.trainer = trainer_config(self.cfg.trainer, self.req.context_size)
        self.device = device
        self.sae: SAE = load_sae(self.run_dir / "sae", str(device))
        self.cache = ActivationCache.open(CacheSpec.from_request(self.req), self.layer,
                                          self.req.cache.verify)
        _, self.eval_ids = held_out_split(self.cache, self.req.dataset.pack,
                                          self.trainer.eval_fraction)
        trained_with = json.loads((self.run_dir / "sae" / "cfg.json").read_text()).get(
            "held_out_split")
        if trained_with != split_fingerprint(self.eval_ids):
            raise ConfigError(
                f"run_dir: {self.run_dir} was trained holding out other sequences "
                f"({trained_with or 'the last 5 % of the cache, before 2026-12'}) than "
                f"the evaluation would use now ({split_fingerprint(self.eval_ids)}): its "
                f"numbers would include sequences it trained on; retrain it")

    def held_out_batches(self, ids: np.ndarray, batch_sequences: int):
        # saved SAEs have the training input scale folded in: they read raw activations
        loader = BatchLoader(self.cache, self.req.context_size, 1.0,
                             self.trainer.train_on_special_tokens, self.device)
        return (loader.load(units) for units in whole_sequences(ids, batch_sequences))


def subsample(ids: np.ndarray, n: int | None) -> np.ndarray:
    """A seeded random subset of n held-out sequences, in order (all of them for None), so
    that a budget of sequences samples the whole held-out set, not its first blocks."""
    if n is None or n >= len(ids):
        return ids
    return np.sort(np.random.default_rng(0).choice(ids, n, replace=False))


def training_dead_fraction(inputs: RunInputs) -> dict:
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


def _codes_for_probe(inputs: RunInputs, ids: np.ndarray, max_tokens: int, batch: int):
    """Codes (before any input-independent offset), raw activations, positions and sequence
    ids of up to `max_tokens` counted held-out tokens, whole sequences at a time, drawn in
    a seeded random order from the whole held-out set."""
    ids = np.random.default_rng(0).permutation(ids)
    codes, raw, positions, sequences, n = [], [], [], [], 0
    for i, b in zip(range(0, len(ids), batch), inputs.held_out_batches(ids, batch)):
        out = inputs.sae(b.x, b.pos, b.mask)
        f = out.input_codes
        rows = torch.as_tensor(ids[i : i + batch], device=b.x.device)[:, None].expand_as(b.pos)
        codes.append(f[b.mask].cpu().numpy())
        raw.append(b.x[b.mask].cpu().numpy())
        positions.append(b.pos[b.mask].cpu().numpy())
        sequences.append(rows[b.mask].cpu().numpy())
        n += int(b.mask.sum())
        if n >= max_tokens:
            break
    return (np.concatenate(codes), np.concatenate(raw), np.concatenate(positions),
            np.concatenate(sequences))


def _preservation_sequences(inputs: RunInputs, ids: np.ndarray, batch: int):
    special = torch.tensor(inputs.cache.special_token_ids)
    for start in range(0, len(ids), batch):
        seqs = inputs.cache.sequences(ids[start : start + batch])
        tokens, attention = torch.as_tensor(seqs.tokens).long(), torch.as_tensor(seqs.mask)
        yield tokens, attention, attention & ~torch.isin(tokens, special)


@torch.no_grad()
def evaluate_run(run_dir: Path, cfg: EvalConfig, logger=None) -> dict:
    """Evaluate `run_dir/sae`; write `metrics.json` and `plots/`; log a summary."""
    device = resolve_device(cfg.device)
    inputs = RunInputs(run_dir, device)
    sae, name = inputs.sae, inputs.sae.cfg.name
    ids = subsample(inputs.eval_ids, cfg.max_sequences)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    result = held_out_pass(sae, inputs.held_out_batches(ids, cfg.batch_sequences),
                           inputs.req.context_size)
    timings["held_out"] = time.perf_counter() - start
    arrays = result.pop("_arrays")
    result["core"]["dead_fraction_held_out"] = result["core"].pop("dead_fraction")
    result["core"].update(training_dead_fraction(inputs))
    metrics = {"schema_version": SCHEMA_VERSION, "metric_version": METRIC_VERSION,
               "run_dir": str(inputs.run_dir),
               "sae": {"name": name, "architecture": sae.cfg.arch, "d_in": sae.cfg.d_in,
                       "d_sae": sae.cfg.d_sae},
               "model": inputs.req.model.name, "layer": inputs.layer,
               "held_out_sequences": int(len(ids)), **result}
    figures = {}
    plot_dir = inputs.run_dir / "plots"
    title = f"{name} · {inputs.req.model.name} layer {inputs.layer}"
    if cfg.plots:
        plot_dir.mkdir(exist_ok=True)
        figures["feature_density"] = plots.feature_density(
            arrays["frequency"], plot_dir / "feature_density.png", title)
        figures["position_curves"] = plots.position_curves(
            result["by_position"], plot_dir / "position_curves.png", title)
        figures["adjacent_stability"] = plots.adjacent_stability(
            result["by_position"], result["temporal"], plot_dir / "adjacent_stability.png",
            title)
        figures["feature_position_heatmap"] = plots.feature_position_heatmap(
            arrays["firing_rate"], arrays["positions"], plot_dir / "feature_position.png", title)

    if "structure" in cfg.families:
        start = time.perf_counter()
        spec = position_specificity(arrays["fire_counts"], arrays["position_tokens"])
        clusters = profile_clusters(arrays["mean_activation"], arrays["frequency"],
                                    cfg.cluster_latents, cfg.max_clusters)
        codes, raw, positions, sequences = _codes_for_probe(
            inputs, ids, cfg.position_probe_tokens, cfg.batch_sequences)
        metrics["structure"] = {
            **specificity_summary(spec),
            "position_profile_clusters": clusters["n_clusters"],
            "position_profile_silhouette": clusters.get("silhouette"),
            "position_decodability": position_decodability(
                codes, raw, positions, sequences, inputs.req.context_size,
                cfg.position_buckets),
        }
        if cfg.plots:
            figures["position_specificity"] = plots.specificity_against_null(
                spec, arrays["fire_counts"].sum(0), plot_dir / "position_specificity.png",
                title)
            if clusters["linkage"] is not None:
                figures["position_profile_dendrogram"] = plots.profile_dendrogram(
                    clusters, plot_dir / "position_profile_dendrogram.png", title)
        timings["structure"] = time.perf_counter() - start

    synthetic = inputs.req.dataset.synthetic
    if synthetic is not None:
        start = time.perf_counter()
        source = SyntheticActivations(synthetic, inputs.req.context_size)
        found = recovery(sae, source, arrays["firing_rate"], arrays["mean_activation"],
                         arrays["positions"])
        metrics["recovery"] = found
        if cfg.plots:
            figures["recovery"] = plots.recovery_histogram(
                found["_max_cosine"], found["_family"], FAMILIES, found["threshold"],
                plot_dir / "recovery.png", title)
        timings["recovery"] = time.perf_counter() - start

    needs_lm = {"preservation", "probing", "absorption"} & set(cfg.families)
    if needs_lm and synthetic is not None:
        log.info("no language model behind synthetic activations: %s skipped",
                 ", ".join(sorted(needs_lm)))
        needs_lm = set()
    if needs_lm:
        lm = load_language_model(inputs.req.model, device)
        special = SpecialTokens.for_tokenizer(lm.tokenizer, inputs.req.model.prepend_bos)
    if "preservation" in needs_lm:
        start = time.perf_counter()
        metrics["preservation"] = model_preservation(
            sae, lm, inputs.layer, _preservation_sequences(
                inputs, subsample(ids, cfg.preservation_sequences), cfg.batch_sequences))
        timings["preservation"] = time.perf_counter() - start
    if "probing" in needs_lm:
        start = time.perf_counter()
        settings = probing_config({**cfg.probing, "context_size": inputs.req.context_size})
        metrics["sparse_probing"] = {}
        for task_name in cfg.probing_tasks:
            task = load_probing_task(task_config(OmegaConf.load(probing_task_file(task_name))))
            result = sparse_probing(sae, lm, special, inputs.layer, task, settings)
            metrics["sparse_probing"][task_name] = result
            if cfg.plots:
                figures[f"sparse_probing_{task_name}"] = plots.sparse_probing_curve(
                    result, result["settings"]["ks"],
                    plot_dir / f"sparse_probing_{task_name}.png", f"{title} · {task_name}")
        timings["sparse_probing"] = time.perf_counter() - start
    if "absorption" in needs_lm:
        start = time.perf_counter()
        metrics["absorption"] = absorption(sae, lm, special, inputs.layer,
                                           inputs.req.context_size,
                                           AbsorptionConfig(**cfg.absorption))
        timings["absorption"] = time.perf_counter() - start
    metrics["seconds"] = timings
    metrics["plots"] = sorted(str(p.relative_to(inputs.run_dir)) for p in figures.values())
    metrics = json_safe(metrics)
    tmp = inputs.run_dir / "metrics.json.tmp"
    tmp.write_text(json.dumps(metrics, indent=1))
    tmp.replace(inputs.run_dir / "metrics.json")
    if logger is not None:
        logger.summary(flat_scalars(metrics))
        logger.images(figures)
    return metrics


def flat_scalars(metrics: dict, prefix: str = "eval") -> dict[str, float]:
    """Every scalar of the metrics as `eval/<section>/<name>` (curves and lists left out)."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            out.update(flat_scalars(value, f"{prefix}/{key}"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}/{key}"] = value
    return out
