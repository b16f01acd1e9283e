"""Probing tasks (step 1's texts): the task files' schema (posae/conf/probing/<task>.yaml) and
their texts and labels, from the embedded standard-library docstrings (source=stdlib) or
a Hugging Face dataset (source=hf). Texts found in two classes are dropped."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
from omegaconf import DictConfig, OmegaConf

from posae.config import ConfigError, positive_int, typed

TASK_SOURCES = ("stdlib", "hf")
# `label_field` values of source=stdlib: the first component of the docstring's module.
STDLIB_LABEL_FIELDS = ("package",)


@dataclass
class ProbingTaskConfig:
    """One task (posae/conf/probing/<name>.yaml)."""

    name: str
    # stdlib: the embedded standard-library docstrings | hf: a Hugging Face dataset
    source: str
    # Label values, as they appear in the label column (or names, see label_names).
    classes: list[Any]
    hf_id: Optional[str] = None
    # Dataset config name, or a list of them loaded one after another.
    hf_config: Optional[Any] = None
    split: Optional[str] = "train"
    text_field: Optional[str] = None
    # null with source=hf: `text_field` holds {label: text} dicts (translation pairs), and
    # each entry whose key is a class is one text of that class.
    label_field: Optional[str] = None
    # Names of integer labels (index -> name), so `classes` may list names.
    label_names: Optional[list[str]] = None
    # Texts per binary task (half positive), before the protocol's override.
    n_train: int = 4000
    n_test: int = 1000
    # Read rows as a stream (huge datasets), stopping when every class is full.
    streaming: bool = False
    # Stop a row-by-row read after this many rows of each config (null: no limit).
    max_scan_rows: Optional[int] = None
    # Passed to datasets.load_dataset (data_files: local files, e.g. hf_id=json).
    data_files: Optional[Any] = None
    load_kwargs: dict = field(default_factory=dict)
    # Seed of the per-class subsample of a large dataset.
    seed: int = 0


def task_config(node: Any) -> ProbingTaskConfig:
    """Typed task config from a mapping (a task file, a dict); errors name
    `probing[<task>].<field>`."""
    raw = OmegaConf.create(node)
    name = raw.get("name", "?") if isinstance(raw, DictConfig) else "?"
    cfg = typed(raw, ProbingTaskConfig, f"probing[{name}]")
    key = f"probing[{cfg.name}]"
    if cfg.source not in TASK_SOURCES:
        raise ConfigError(f"{key}.source: {cfg.source!r} is not one of {', '.join(TASK_SOURCES)}")
    if len(cfg.classes) < 2:
        raise ConfigError(f"{key}.classes: a probing task needs at least two classes")
    keys = [label_key(c) for c in cfg.classes]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"{key}.classes: repeated class in {keys}")
    positive_int(cfg.n_train, f"{key}.n_train")
    positive_int(cfg.n_test, f"{key}.n_test")
    if cfg.n_train < 2 or cfg.n_test < 2:
        raise ConfigError(f"{key}: n_train and n_test must be at least 2 (half positive)")
    if cfg.source == "stdlib":
        if cfg.label_field not in STDLIB_LABEL_FIELDS:
            raise ConfigError(f"{key}.label_field: source=stdlib supports "
                              f"{', '.join(STDLIB_LABEL_FIELDS)}, got {cfg.label_field!r}")
    else:
        if not cfg.hf_id:
            raise ConfigError(f"{key}.hf_id: a Hugging Face dataset id is required for source=hf")
        if not cfg.text_field:
            raise ConfigError(f"{key}.text_field: required for source=hf")
        if not cfg.split:
            raise ConfigError(f"{key}.split: required for source=hf")
    return cfg


def label_key(value: Any) -> str:
    """Labels compared as strings; integral floats as integers (rating 5.0 == class 5)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)



@dataclass
class ProbingTask:
    name: str
    texts: list[str]
    # Class of each text: one of `classes`.
    labels: list[str]
    classes: list[str]
    n_train: int = 4000
    n_test: int = 1000
    # Texts per class before the cap, duplicates dropped, etc.
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        if len(self.texts) != len(self.labels):
            raise ValueError(f"task {self.name!r}: {len(self.texts)} texts, "
                             f"{len(self.labels)} labels")
        unknown = set(self.labels) - set(self.classes)
        if unknown:
            raise ValueError(f"task {self.name!r}: labels {sorted(unknown)} are not classes")


class ProbingDataError(RuntimeError):
    """A task's texts cannot be loaded (e.g. the Hub is unreachable); names the task."""


def per_class_cap(n_train: int, n_test: int) -> int:
    """The most texts of one class any binary task can use: n_train/2 + n_test/2."""
    return math.ceil(n_train / 2) + math.ceil(n_test / 2)


def load_probing_task(task_cfg: Any, cap: Optional[int] = None) -> ProbingTask:
    """The texts and labels of a task config (a dict, DictConfig or ProbingTaskConfig).

    Each class keeps at most `cap` texts (default: n_train/2 + n_test/2 of the task, all a
    binary task can use): the first in stdlib order, a seeded sample of a Hugging Face
    dataset, or the first rows of a stream. Empty texts and texts found in two classes are
    dropped. Texts are returned grouped by class, in source order within a class.
    """
    cfg = task_cfg if isinstance(task_cfg, ProbingTaskConfig) else task_config(task_cfg)
    classes = [label_key(c) for c in cfg.classes]
    cap = cap or per_class_cap(cfg.n_train, cfg.n_test)
    if cfg.source == "stdlib":
        candidates, info = _stdlib_candidates(cfg, classes)
    else:
        candidates, info = _hf_candidates(cfg, classes, cap)
    return _finish(cfg, classes, candidates, cap, info)


def _finish(cfg: ProbingTaskConfig, classes: list[str], candidates: dict[str, list[str]],
            cap: int, info: dict) -> ProbingTask:
    owners: dict[str, set[str]] = {}
    for c in classes:
        for text in candidates[c]:
            owners.setdefault(text, set()).add(c)
    texts, labels, counts = [], [], {}
    info["dropped_in_several_classes"] = sum(len(o) > 1 for o in owners.values())
    info["available_per_class"] = {}
    for c in classes:
        unique = [t for t in dict.fromkeys(candidates[c]) if len(owners[t]) == 1]
        info["available_per_class"][c] = len(unique)
        kept = unique[:cap]
        if len(kept) < 2:
            raise ProbingDataError(
                f"probing task {cfg.name!r}: class {c!r} has {len(kept)} usable texts, "
                "at least 2 are needed (one to train, one to test)")
        texts += kept
        labels += [c] * len(kept)
        counts[c] = len(kept)
    info["texts_per_class"] = counts
    return ProbingTask(cfg.name, texts, labels, classes, cfg.n_train, cfg.n_test, info)


def _stdlib_candidates(cfg: ProbingTaskConfig, classes: list[str]):
    """Docstrings labelled with the top-level package of their module. Docstrings in test
    sub-packages (a later module component `test`, `tests` or `test_*`, such as
    unittest.test or ctypes.test) are left out: they describe tests, not the package."""
    from posae.data.stdlib_docs import iter_stdlib_module_docstrings, stdlib_version

    wanted = set(classes)
    candidates: dict[str, list[str]] = {c: [] for c in classes}
    skipped = 0
    for module, doc in iter_stdlib_module_docstrings(packages=wanted):
        parts = module.split(".")
        if parts[0] not in wanted:
            continue
        if any(p in ("test", "tests") or p.startswith("test_") for p in parts[1:]):
            skipped += 1
            continue
        candidates[parts[0]].append(doc)
    missing = [c for c in classes if not candidates[c]]
    if missing:
        raise ProbingDataError(f"probing task {cfg.name!r}: no docstrings for {missing} in "
                               f"this Python's standard library ({stdlib_version()})")
    return candidates, {"source": "stdlib", "python": stdlib_version(),
                        "skipped_test_subpackages": skipped}


def _label_names(cfg: ProbingTaskConfig, feature) -> list[str] | None:
    if cfg.label_names is not None:
        return [str(n) for n in cfg.label_names]
    names = getattr(feature, "names", None)  # datasets.ClassLabel
    return list(names) if names else None


def _keys_of(value: Any, names: list[str] | None) -> tuple[str, ...]:
    """The strings a label matches: itself, and its name when it indexes `names`."""
    key = label_key(value)
    if names is not None and isinstance(value, (int, np.integer)) and 0 <= value < len(names):
        return key, names[int(value)]
    return (key,)


def _load_hf(cfg: ProbingTaskConfig, name: Optional[str]):
    import datasets

    try:
        return datasets.load_dataset(cfg.hf_id, name, split=cfg.split, streaming=cfg.streaming,
                                     data_files=cfg.data_files, **dict(cfg.load_kwargs))
    except Exception as err:  # the Hub unreachable, a missing id, split or config
        where = cfg.hf_id + (f" ({name})" if name else "") + f", split {cfg.split!r}"
        raise ProbingDataError(
            f"probing task {cfg.name!r}: cannot load the Hugging Face dataset {where}: "
            f"{type(err).__name__}: {err}. Tasks with source=hf need the Hub (or the dataset "
            "in the local datasets cache); the offline task is stdlib_packages."
        ) from err


def _hf_candidates(cfg: ProbingTaskConfig, classes: list[str], cap: int):
    """Up to `cap` texts per class (a little more before duplicates are dropped)."""
    wanted = set(classes)
    want = cap + max(8, cap // 10)
    candidates: dict[str, list[str]] = {c: [] for c in classes}
    seen: set[str] = set()
    names = cfg.hf_config if isinstance(cfg.hf_config, (list, tuple)) else [cfg.hf_config]
    rows = 0
    for config_name in names:
        ds = _load_hf(cfg, config_name)
        columns = getattr(ds, "column_names", None)
        for key in (cfg.text_field, cfg.label_field):
            if key is not None and columns is not None and key not in columns:
                raise ProbingDataError(f"probing task {cfg.name!r}: {cfg.hf_id} has no column "
                                       f"{key!r}; its columns are {columns}")
        if cfg.label_field is not None and not cfg.streaming:
            # Column path: a seeded sample of each class's rows, reading only those texts.
            feature = ds.features[cfg.label_field]
            label_names = _label_names(cfg, feature)
            order = np.random.default_rng(cfg.seed).permutation(len(ds))
            label_keys = [_keys_of(v, label_names) for v in ds[cfg.label_field]]
            seen.update(keys[-1] for keys in label_keys)
            picked: dict[str, list[int]] = {c: [] for c in classes}
            for i in order.tolist():
                key = next((k for k in label_keys[i] if k in wanted), None)
                if key is not None and len(picked[key]) < want:
                    picked[key].append(i)
            rows += len(ds)
            for c in classes:
                idx = sorted(picked[c])
                if idx:
                    candidates[c] += [t for t in ds.select(idx)[cfg.text_field]
                                      if isinstance(t, str) and t.strip()]
            continue
        # Row path: streams and {label: text} columns, in the source's order.
        features = getattr(ds, "features", None)  # None for some streams
        label_names = _label_names(cfg, features.get(cfg.label_field) if features and
                                   cfg.label_field is not None else None)
        for n_read, row in enumerate(ds, 1):
            rows += 1
            for keys, text in _row_examples(cfg, row, label_names):
                seen.add(keys[-1])
                key = next((k for k in keys if k in wanted), None)
                if (key is not None and len(candidates[key]) < want and isinstance(text, str)
                        and text.strip()):
                    candidates[key].append(text)
            if all(len(candidates[c]) >= want for c in classes):
                break
            if cfg.max_scan_rows is not None and n_read >= cfg.max_scan_rows:
                break
    missing = [c for c in classes if not candidates[c]]
    if missing:
        shown = sorted(seen)[:30]
        raise ProbingDataError(f"probing task {cfg.name!r}: no texts of classes {missing} in "
                               f"{cfg.hf_id} ({rows} rows read); labels seen: {shown}")
    return candidates, {"source": "hf", "hf_id": cfg.hf_id, "split": cfg.split,
                        "rows_read": rows}


def _row_examples(cfg: ProbingTaskConfig, row: dict, label_names):
    if cfg.label_field is None:
        pairs = row[cfg.text_field]
        if not isinstance(pairs, dict):
            raise ProbingDataError(f"probing task {cfg.name!r}: label_field is null, so "
                                   f"{cfg.text_field!r} must hold {{label: text}} dicts")
        for lang, text in pairs.items():
            yield (label_key(lang),), text
    else:
        yield _keys_of(row[cfg.label_field], label_names), row[cfg.text_field]


