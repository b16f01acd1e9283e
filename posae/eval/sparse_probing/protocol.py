"""The sparse-probing protocol (SAEBench), steps 1-4 of the package docstring tied
together: its settings (`eval.probing`) and `sparse_probing`, one task's result."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import numpy as np
from omegaconf import OmegaConf

from posae.config import ConfigError, positive_int, typed
from posae.data.sequences import SpecialTokens
from posae.eval.safe import json_safe
from posae.eval.sparse_probing.pooling import pool_texts
from posae.eval.sparse_probing.probes import binary_split, bootstrap_ci, class_pools, probe_family
from posae.eval.sparse_probing.tasks import ProbingTask
from posae.models.lm import LanguageModel


@dataclass
class ProbingConfig:
    """Protocol settings (SAEBench defaults); `eval.probing` in the evaluate config."""

    ks: list[int] = field(default_factory=lambda: [1, 2, 5, 10, 20, 50])
    # Texts per binary task, half positive; null: the task file's n_train / n_test.
    n_train: Optional[int] = None
    n_test: Optional[int] = None
    seed: int = 42
    batch_size: int = 32
    context_size: int = 128
    # Pad each LM batch only to its longest text (same activations, less compute).
    trim_padding: bool = True
    # LogisticRegression
    C: float = 1.0
    max_iter: int = 1000
    # StandardScaler before the probe (SAEBench: no, raw features)
    standardize: bool = False
    # Bootstrap resamples of the test texts for the 95 % intervals
    bootstrap: int = 1000


def probing_config(node: Any = None) -> ProbingConfig:
    """Typed settings from a mapping (None: defaults); errors name the key."""
    cfg = typed(OmegaConf.create(node or {}), ProbingConfig, "eval.probing")
    for key in ("batch_size", "context_size", "max_iter", "bootstrap"):
        positive_int(getattr(cfg, key), f"eval.probing.{key}")
    for key in ("n_train", "n_test"):
        if getattr(cfg, key) is not None:
            positive_int(getattr(cfg, key), f"eval.probing.{key}")
    if not cfg.ks:
        raise ConfigError("eval.probing.ks: give at least one k")
    for k in cfg.ks:
        positive_int(k, "eval.probing.ks")
    if cfg.C <= 0:
        raise ConfigError(f"eval.probing.C: must be positive, got {cfg.C}")
    return cfg



def sparse_probing(sae, lm: LanguageModel, special: SpecialTokens, layer: int,
                   task: ProbingTask, cfg: ProbingConfig | dict | None = None) -> dict:
    """SAEBench sparse probing of `sae` at block `layer` on `task`; a JSON-serialisable dict
    with per-class and mean accuracies (see the module docstring)."""
    if sae is None:
        raise ValueError("sparse_probing needs an SAE (pool_texts alone gives the raw means)")
    if not isinstance(cfg, ProbingConfig):
        cfg = probing_config(cfg)
    n_train = cfg.n_train or task.n_train
    n_test = cfg.n_test or task.n_test
    ks = sorted(set(cfg.ks))
    notes = []
    # Texts the tokenizer turns into nothing cannot be pooled; leave them out.
    ids = lm.tokenizer(list(task.texts), add_special_tokens=False, truncation=True,
                       max_length=1)["input_ids"]
    valid = np.asarray([i for i, t in enumerate(ids) if t], dtype=np.int64)
    if len(valid) < len(task.texts):
        notes.append(f"{len(task.texts) - len(valid)} texts tokenize to nothing and were "
                     "left out")
    pools = {c: (valid[tr], valid[te]) for c, (tr, te) in class_pools(
        [task.labels[i] for i in valid], task.classes, n_train, n_test, cfg.seed).items()}
    empty = [c for c, (tr, te) in pools.items() if not len(tr) or not len(te)]
    if empty:
        raise ValueError(f"task {task.name!r}: classes {empty} have no train or no test texts")
    used = np.unique(np.concatenate([np.concatenate(p) for p in pools.values()]))
    t0 = time.perf_counter()
    raw, codes = pool_texts(sae, lm, special, layer, [task.texts[i] for i in used],
                            cfg.context_size, cfg.batch_size, cfg.trim_padding)
    t_pool = time.perf_counter() - t0
    row_of = np.full(len(task.texts), -1, dtype=np.int64)
    row_of[used] = np.arange(len(used))
    raw, codes = raw.numpy(), codes.numpy()  # float32; probes take float64 copies of splits

    per_class, correct, texts = {}, {}, {}
    not_converged = 0
    for c in task.classes:
        split = binary_split(pools, c, n_train, n_test, cfg.seed)
        tr, te = row_of[split.train], row_of[split.test]
        entry: dict[str, Any] = {
            "n_train": len(tr), "n_test": len(te),
            "n_train_positive": int(split.train_y.sum()),
            "n_test_positive": int(split.test_y.sum()),
        }
        if len(tr) < n_train or len(te) < n_test:
            notes.append(f"class {c!r}: {len(tr)} train / {len(te)} test texts "
                         f"(asked {n_train} / {n_test}; the data has fewer)")
        settings = (ks, cfg.C, cfg.max_iter, cfg.seed, cfg.standardize)
        llm, _, bad_llm = probe_family("llm", raw[tr], split.train_y, raw[te], split.test_y,
                                       *settings)
        sae_res, ranked, bad_sae = probe_family("sae", codes[tr], split.train_y, codes[te],
                                                split.test_y, *settings)
        not_converged += bad_llm + bad_sae
        correct[c], texts[c] = {**llm, **sae_res}, split.test
        entry.update({key: float(right.mean()) for key, right in correct[c].items()})
        entry["ci95"] = {key: bootstrap_ci([right], [split.test], cfg.bootstrap, cfg.seed)
                         for key, right in correct[c].items()}
        entry["sae_top_latents"] = [int(i) for i in ranked]
        per_class[c] = entry
    metric_keys = list(correct[task.classes[0]])
    mean = {k: float(np.mean([per_class[c][k] for c in task.classes])) for k in metric_keys}
    mean_ci95 = {k: bootstrap_ci([correct[c][k] for c in task.classes],
                                 [texts[c] for c in task.classes], cfg.bootstrap, cfg.seed)
                 for k in metric_keys}
    if not_converged:
        notes.append(f"{not_converged} probes stopped at max_iter={cfg.max_iter} before "
                     "lbfgs converged")
    return {
        "task": task.name,
        "layer": layer,
        "classes": list(task.classes),
        "settings": {**asdict(cfg), "n_train": n_train, "n_test": n_test, "ks": ks},
        "n_texts_pooled": int(len(used)),
        "texts_used_per_class": {c: int(len(pools[c][0]) + len(pools[c][1]))
                                 for c in task.classes},
        "d_model": int(raw.shape[1]),
        "d_sae": int(codes.shape[1]),
        "mean": mean,
        "mean_ci95": mean_ci95,
        "per_class": per_class,
        "notes": notes,
        "task_info": json_safe(task.info),
        "timing_s": {"pool": round(t_pool, 3),
                     "probes": round(time.perf_counter() - t0 - t_pool, 3)},
    }

