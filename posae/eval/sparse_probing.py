"""Sparse probing (SAEBench: Karvonen et al. 2025; after Gurnee et al. 2023).

How well do a few SAE latents linearly encode a known property of a text?

1. Pool. Every text of a task (`conf/probing/<task>.yaml`) goes once through the LM to
   block `layer` (truncated to `context_size` tokens) and the SAE; per text, the SAE codes
   and, as the reference, the raw residual stream are mean-pooled over the text's own
   tokens (no special tokens, no padding).
2. Split. Each class's texts are shuffled (seeded) and split into a train and a test
   pool: at most n_train/2 and n_test/2, else in the ratio n_train : n_test.
3. Binary tasks. For each class: positives = its pool, negatives = an equal number drawn
   round-robin from the other classes' pools (balanced over the classes), separately for
   train and test, so up to n_train / n_test texts each, half positive. A text is in a
   train pool or a test pool, never both, whichever class it is a negative for.
4. Probes. sklearn LogisticRegression (L2, C = 1, lbfgs) on the raw pooled features, as
   SAEBench fits them (`eval.probing.standardize=true` puts a StandardScaler first):
   - `sae_top_{k}_test_accuracy`: on the k latents with the largest |mean(pos) - mean(neg)|
     of the pooled codes on the TRAIN split (never the test split), k in `ks`;
   - `sae_test_accuracy`: on all latents; `llm_test_accuracy`: on the raw activations
     (full d), SAEBench's references; `llm_top_{k}_test_accuracy`: the same top-k rule on
     the raw dimensions.
   Results are per class and averaged over classes (`mean`), each accuracy with a 95 %
   bootstrap interval over the test texts (`per_class.<c>.ci95`, `mean_ci95`; `bootstrap`
   resamples; the mean's interval resamples the union of the classes' test texts once per
   resample, since classes share texts).

Differences from SAEBench, all deliberate: every probe is the sklearn one (SAEBench trains
the full-width probes with a torch loop); the train/test texts come from one split of the
source, split here; texts that occur in two classes are dropped (stdlib docstrings repeat).

Texts are run through the LM in batches of similar length, each padded only to its own
longest text instead of `context_size` (`trim_padding`): padding is masked, so the
activations are the same, and short texts cost less. Position-aware SAEs see true
positions either way.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from posae.config import ConfigError, typed
from posae.data.sequences import SpecialTokens
from posae.eval.text_inputs import text_batches
from posae.models.lm import LanguageModel

TASK_SOURCES = ("stdlib", "hf")
# `label_field` values of source=stdlib: the first component of the docstring's module.
STDLIB_LABEL_FIELDS = ("package",)


# ---------------------------------------------------------------------------------------
# settings


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
    """Typed settings from a dict / DictConfig (None: defaults); errors name the key."""
    cfg = typed(_as_node(node or {}), ProbingConfig, "eval.probing")
    for key in ("batch_size", "context_size", "max_iter", "bootstrap"):
        _positive(getattr(cfg, key), f"eval.probing.{key}")
    for key in ("n_train", "n_test"):
        if getattr(cfg, key) is not None:
            _positive(getattr(cfg, key), f"eval.probing.{key}")
    if not cfg.ks:
        raise ConfigError("eval.probing.ks: give at least one k")
    for k in cfg.ks:
        _positive(k, "eval.probing.ks")
    if cfg.C <= 0:
        raise ConfigError(f"eval.probing.C: must be positive, got {cfg.C}")
    return cfg


@dataclass
class ProbingTaskConfig:
    """One task (conf/probing/<name>.yaml)."""

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
    """Typed task config; errors name `probing.<field>`."""
    raw = _as_node(node)
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
    _positive(cfg.n_train, f"{key}.n_train")
    _positive(cfg.n_test, f"{key}.n_test")
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


def _as_node(node: Any) -> DictConfig:
    if isinstance(node, DictConfig):
        return node
    if isinstance(node, dict):
        return OmegaConf.create(node)
    raise ConfigError(f"expected a mapping, got {node!r}")


def _positive(value: Any, key: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key}: must be a positive integer, got {value!r}")


def label_key(value: Any) -> str:
    """Labels compared as strings; integral floats as integers (rating 5.0 == class 5)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


# ---------------------------------------------------------------------------------------
# tasks


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


# ---------------------------------------------------------------------------------------
# pooling


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


@torch.no_grad()
def pool_texts(sae, lm: LanguageModel, special: SpecialTokens, layer: int, texts: list[str],
               context_size: int = 128, batch_size: int = 32,
               trim_padding: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per text, the mean over its own tokens of the raw residual stream after block `layer`
    [N, d] and of the SAE codes [N, d_sae] (None without an SAE); float32 on the CPU.

    With `trim_padding`, texts are grouped by token count and each batch is padded only to
    its longest text (truncation to `context_size` is unchanged)."""
    n = len(texts)
    if trim_padding:
        room = special.content_length(context_size)
        lengths = [len(ids) for ids in lm.tokenizer(list(texts), add_special_tokens=False,
                                                    truncation=True, max_length=room)["input_ids"]]
        order = sorted(range(n), key=lambda i: (lengths[i], i))
    else:
        order = list(range(n))
    raw_out: torch.Tensor | None = None
    sae_out: torch.Tensor | None = None
    extra = len(special.prefix) + len(special.suffix)
    sae_device = _device_of(sae) if sae is not None else None
    was_training = sae.training if sae is not None else False
    if sae is not None:
        sae.eval()
    try:
        for start in range(0, n, batch_size):
            rows = order[start:start + batch_size]
            chunk = [texts[i] for i in rows]
            context = (min(context_size, max(lengths[i] for i in rows) + extra)
                       if trim_padding else context_size)
            for batch in text_batches(lm, special, chunk, layer, context, len(chunk)):
                count = batch.mask.sum(1, keepdim=True).clamp_min(1).float()
                weights = batch.mask.float().unsqueeze(-1)
                raw = ((batch.x * weights).sum(1) / count).cpu()
                if raw_out is None:
                    raw_out = torch.empty(n, raw.shape[1])
                raw_out[rows] = raw
                if sae is not None:
                    f = sae.encode(batch.x.to(sae_device), batch.pos.to(sae_device),
                                   batch.mask.to(sae_device)).float()
                    pooled = ((f * weights.to(sae_device)).sum(1) / count.to(sae_device)).cpu()
                    if sae_out is None:
                        sae_out = torch.empty(n, pooled.shape[1])
                    sae_out[rows] = pooled
    finally:
        if sae is not None:
            sae.train(was_training)
    if raw_out is None:
        raise ValueError("no texts to pool")
    return raw_out, sae_out


# ---------------------------------------------------------------------------------------
# splits and probes


@dataclass
class BinarySplit:
    """Indices into the task's texts of one class-vs-rest problem."""

    train: np.ndarray
    train_y: np.ndarray
    test: np.ndarray
    test_y: np.ndarray


def class_pools(labels: list[str], classes: list[str], n_train: int, n_test: int,
                seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per class, disjoint (train, test) index pools: a seeded shuffle of the class's texts,
    at most n_train/2 and n_test/2, split n_train : n_test when the class has fewer."""
    labels_arr = np.asarray(labels)
    half_train, half_test = math.ceil(n_train / 2), math.ceil(n_test / 2)
    pools = {}
    for ci, c in enumerate(classes):
        idx = np.flatnonzero(labels_arr == c)
        idx = idx[np.random.default_rng([seed, ci]).permutation(len(idx))]
        if len(idx) >= half_train + half_test:
            n_te, n_tr = half_test, half_train
        else:
            n_te = min(half_test, max(1, round(len(idx) * n_test / (n_train + n_test))))
            n_tr = min(half_train, len(idx) - n_te)
        pools[c] = (np.sort(idx[:n_tr]), np.sort(idx[n_tr:n_tr + n_te]))
    return pools


def _round_robin(lists: list[np.ndarray], n: int) -> np.ndarray:
    """n items taken one from each list in turn (skipping exhausted ones)."""
    out: list[int] = []
    depth = 0
    while len(out) < n and any(depth < len(x) for x in lists):
        for x in lists:
            if depth < len(x) and len(out) < n:
                out.append(int(x[depth]))
        depth += 1
    return np.asarray(out, dtype=np.int64)


def binary_split(pools: dict[str, tuple[np.ndarray, np.ndarray]], target: str, n_train: int,
                 n_test: int, seed: int) -> BinarySplit:
    """`target` vs the rest: balanced positives and negatives, negatives spread evenly over
    the other classes (each class's pool shuffled with a seed of its own per target)."""
    classes = list(pools)
    ti = classes.index(target)
    parts = []
    for which, n_max in ((0, n_train), (1, n_test)):
        others = [pools[c][which][np.random.default_rng([seed, ti, oi, which])
                                  .permutation(len(pools[c][which]))]
                  for oi, c in enumerate(classes) if c != target]
        positives = pools[target][which]
        n = min(len(positives), math.ceil(n_max / 2), sum(len(o) for o in others))
        negatives = _round_robin(others, n)
        index = np.concatenate([positives[:n], negatives])
        y = np.concatenate([np.ones(n, dtype=np.int64), np.zeros(len(negatives), np.int64)])
        parts += [index, y]
    return BinarySplit(*parts)


def top_k_latents(features: torch.Tensor | np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """The k columns with the largest |mean over positives - mean over negatives| (ties:
    lower index first). Call it with TRAINING features and labels only."""
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(y).astype(bool)
    if y.all() or not y.any():
        raise ValueError("top_k_latents needs positives and negatives")
    score = np.abs(x[y].mean(0) - x[~y].mean(0))
    return np.argsort(-score, kind="stable")[: min(k, x.shape[1])]


def probe_correct(train_x, train_y, test_x, test_y, C: float = 1.0, max_iter: int = 1000,
                  seed: int = 0, standardize: bool = False) -> tuple[np.ndarray, bool]:
    """Which test examples an L2 LogisticRegression fitted on the train split classifies
    correctly (on raw features, or standardised), and whether lbfgs converged."""
    probe = LogisticRegression(C=C, max_iter=max_iter, random_state=seed)
    if standardize:
        probe = make_pipeline(StandardScaler(), probe)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        probe.fit(np.asarray(train_x, dtype=np.float64), np.asarray(train_y))
    fitted = probe[-1] if standardize else probe
    converged = bool(np.all(fitted.n_iter_ < max_iter))
    correct = probe.predict(np.asarray(test_x, dtype=np.float64)) == np.asarray(test_y)
    return correct, converged


def probe_family(prefix: str, train_x, train_y, test_x, test_y, ks: list[int], C: float = 1.0,
                 max_iter: int = 1000, seed: int = 0, standardize: bool = False
                 ) -> tuple[dict[str, np.ndarray], np.ndarray, int]:
    """Per-test-example correctness of `{prefix}_test_accuracy` (all columns) and
    `{prefix}_top_{k}_test_accuracy` (top-k by train mean difference); also the top max(k)
    columns and the number of probes that did not converge."""
    train_x, test_x = np.asarray(train_x, np.float64), np.asarray(test_x, np.float64)
    columns = {f"{prefix}_test_accuracy": slice(None)}
    ranked = top_k_latents(train_x, train_y, max(ks))
    columns.update({f"{prefix}_top_{k}_test_accuracy": ranked[:k] for k in ks
                    if k <= train_x.shape[1]})
    result, not_converged = {}, 0
    for key, cols in columns.items():
        result[key], ok = probe_correct(train_x[:, cols], train_y, test_x[:, cols], test_y, C,
                                        max_iter, seed, standardize)
        not_converged += not ok
    return result, ranked, not_converged


def bootstrap_ci(correct: list[np.ndarray], texts: list[np.ndarray], resamples: int,
                 seed: int) -> list[float]:
    """95 % percentile interval of the mean over classes of the accuracy. Classes share test
    texts (one class's positives are others' negatives), so each resample draws the texts
    of the union once, with replacement, and every class reweights its own test examples
    by how often their texts were drawn (`correct`, `texts`: one array per class, aligned)."""
    rng = np.random.default_rng(seed)
    pool = np.unique(np.concatenate(texts))
    counts = rng.multinomial(len(pool), np.full(len(pool), 1 / len(pool)), size=resamples)
    means = []
    for right, ids in zip(correct, texts):
        weight = counts[:, np.searchsorted(pool, ids)]                # [resamples, n]
        means.append((weight * right).sum(1) / np.maximum(weight.sum(1), 1))
    return [float(v) for v in np.percentile(np.mean(means, 0), [2.5, 97.5])]


# ---------------------------------------------------------------------------------------
# the evaluation


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
        "task_info": _jsonable(task.info),
        "timing_s": {"pool": round(t_pool, 3),
                     "probes": round(time.perf_counter() - t0 - t_pool, 3)},
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    return value


__all__ = [
    "ProbingConfig", "ProbingTaskConfig", "ProbingTask", "ProbingDataError", "probing_config",
    "task_config", "load_probing_task", "pool_texts", "class_pools", "binary_split",
    "top_k_latents", "probe_correct", "probe_family", "bootstrap_ci", "sparse_probing",
]
