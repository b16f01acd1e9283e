"""Sparse probing (posae/eval/sparse_probing/): tasks, splits, probes, the whole protocol."""

from __future__ import annotations

import inspect
import json
import logging
import unittest
from email.message import Message

import numpy as np
import pytest
import torch
from conftest import CONF, identity_sae
from omegaconf import OmegaConf

from posae.config import ConfigError
from posae.data.sequences import SpecialTokens
from posae.data.stdlib_docs import iter_stdlib_module_docstrings
from posae.eval.sparse_probing import (
    ProbingConfig,
    ProbingDataError,
    ProbingTask,
    binary_split,
    class_pools,
    load_probing_task,
    pool_texts,
    probe_family,
    sparse_probing,
    task_config,
    top_k_latents,
)
from posae.sae import REGISTRY, build_sae

KS = [1, 2, 5, 10, 20, 50]
STDLIB = CONF / "probing" / "stdlib_packages.yaml"


@pytest.fixture(scope="module")
def stdlib_task():
    return load_probing_task(OmegaConf.load(STDLIB))


@pytest.fixture(scope="module")
def special(minilm):
    return SpecialTokens.for_tokenizer(minilm.tokenizer, prepend_bos=False)


def subset(task: ProbingTask, classes: list[str], per_class: int, **kw) -> ProbingTask:
    """The first `per_class` texts of some classes of a task."""
    keep = [i for c in classes
            for i in [j for j, y in enumerate(task.labels) if y == c][:per_class]]
    return ProbingTask(task.name, [task.texts[i] for i in keep], [task.labels[i] for i in keep],
                       classes, **kw)


# --- tasks -----------------------------------------------------------------------------


def test_stdlib_task_is_deterministic_and_labelled_by_package(stdlib_task):
    task = stdlib_task
    cfg = OmegaConf.load(STDLIB)
    assert task.classes == list(cfg.classes)
    again = load_probing_task(cfg)
    assert again.texts == task.texts and again.labels == task.labels
    label_of = dict(zip(task.texts, task.labels))
    assert len(label_of) == len(task.texts)  # no text twice
    for obj, package in ((logging.Handler, "logging"), (logging.StreamHandler, "logging"),
                         (Message, "email"), (unittest.TestCase, "unittest")):
        assert label_of[inspect.getdoc(obj)] == package, obj
    counts = {c: task.labels.count(c) for c in task.classes}
    assert min(counts.values()) >= 100, counts
    # docstrings of test sub-packages (unittest.test) are not unittest's
    test_docs = {doc for module, doc in iter_stdlib_module_docstrings(packages={"unittest"})
                 if ".test" in module}
    other_docs = {doc for module, doc in iter_stdlib_module_docstrings(packages={"unittest"})
                  if ".test" not in module}
    only_in_tests = test_docs - other_docs
    assert only_in_tests and not only_in_tests & set(task.texts)


def test_task_files_are_valid_and_named_after_their_file():
    files = sorted((CONF / "probing").glob("*.yaml"))
    assert {f.stem for f in files} >= {"stdlib_packages", "bias_in_bios_set1", "ag_news",
                                       "amazon_reviews_category", "amazon_reviews_sentiment",
                                       "github_code", "europarl"}
    for f in files:
        cfg = task_config(OmegaConf.load(f))
        assert cfg.name == f.stem
        assert (cfg.source == "stdlib") == (f.stem == "stdlib_packages")
    with pytest.raises(ConfigError, match="source"):
        task_config({"name": "x", "source": "web", "classes": ["a", "b"]})
    with pytest.raises(ConfigError, match="hf_id"):
        task_config({"name": "x", "source": "hf", "classes": ["a", "b"], "text_field": "t"})


def test_hub_task_without_the_hub_names_the_task(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    cfg = OmegaConf.load(CONF / "probing" / "bias_in_bios_set1.yaml")
    try:
        load_probing_task(cfg)
    except ProbingDataError as err:
        assert "bias_in_bios_set1" in str(err) and "LabHC/bias_in_bios" in str(err)
    else:
        pytest.skip("LabHC/bias_in_bios is in the local datasets cache")


def test_hf_loader_on_local_files(tmp_path):
    """The source=hf code path, through datasets.load_dataset on local json files."""
    rows = [{"text": f"review {i}", "rating": [1.0, 3.0, 5.0][i % 3], "topic": i % 4}
            for i in range(60)]
    rows += [{"text": "same text", "rating": 1.0, "topic": 0},
             {"text": "same text", "rating": 5.0, "topic": 1}, {"text": "  ", "rating": 5.0,
                                                                "topic": 1}]
    path = tmp_path / "reviews.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = {"name": "local", "source": "hf", "hf_id": "json", "data_files": str(path),
            "text_field": "text", "n_train": 8, "n_test": 4}
    task = load_probing_task({**base, "label_field": "rating", "classes": [1, 5]})
    assert task.classes == ["1", "5"]
    assert [task.labels.count(c) for c in task.classes] == [6, 6]  # 8/2 + 4/2 per class
    assert "same text" not in task.texts and "  " not in task.texts
    assert all(t.startswith("review ") for t in task.texts)
    assert all(int(t.split()[1]) % 3 == (0 if y == "1" else 2)
               for t, y in zip(task.texts, task.labels))
    assert task.texts == load_probing_task({**base, "label_field": "rating",
                                            "classes": [1, 5]}).texts
    named = load_probing_task({**base, "label_field": "topic", "classes": ["b", "d"],
                               "label_names": ["a", "b", "c", "d"], "streaming": True})
    assert all(int(t.split()[1]) % 4 == (1 if y == "b" else 3)
               for t, y in zip(named.texts, named.labels))
    with pytest.raises(ProbingDataError, match="local.*'7'"):
        load_probing_task({**base, "label_field": "topic", "classes": [0, 7]})

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"translation": {"en": f"hello {i}", "fr": f"salut {i}"}})
                             + "\n" for i in range(20)))
    task = load_probing_task({**base, "data_files": str(pairs), "text_field": "translation",
                              "label_field": None, "classes": ["fr", "en"], "streaming": True})
    assert task.texts[:2] == ["salut 0", "salut 1"] and task.labels.count("en") == 6


# --- splits and probes -----------------------------------------------------------------


def test_splits_are_balanced_and_train_test_disjoint():
    labels = ["a"] * 50 + ["b"] * 300 + ["c"] * 200 + ["d"] * 7
    classes = ["a", "b", "c", "d"]
    pools = class_pools(labels, classes, n_train=200, n_test=100, seed=3)
    train = np.concatenate([p[0] for p in pools.values()])
    test = np.concatenate([p[1] for p in pools.values()])
    assert not set(train) & set(test)
    assert [len(pools[c][0]) for c in classes] == [33, 100, 100, 5]
    assert [len(pools[c][1]) for c in classes] == [17, 50, 50, 2]
    for c in classes:
        split = binary_split(pools, c, 200, 100, seed=3)
        assert set(split.train) <= set(train) and set(split.test) <= set(test)
        assert split.train_y.sum() * 2 == len(split.train_y)
        assert split.test_y.sum() * 2 == len(split.test_y)
        assert all(labels[i] == c for i in split.train[split.train_y == 1])
        assert all(labels[i] != c for i in split.train[split.train_y == 0])
        negatives = [labels[i] for i in split.train[split.train_y == 0]]
        counts = [negatives.count(o) for o in classes if o != c]
        assert max(counts) - min(counts) <= 1 or min(counts) == len(pools["d"][0])
    assert len(binary_split(pools, "b", 200, 100, seed=3).train) == 200
    again = class_pools(labels, classes, 200, 100, seed=3)
    assert all((again[c][0] == pools[c][0]).all() for c in classes)


def planted(n: int, d: int, informative: int, rng: np.random.Generator, noise: float = 0.3):
    y = rng.integers(0, 2, n)
    x = rng.normal(size=(n, d))
    if informative is not None:
        x[:, informative] = y + noise * rng.normal(size=n)
    return x, y


def test_planted_latent_is_found_and_random_labels_give_chance():
    rng = np.random.default_rng(0)
    x, y = planted(5000, 64, informative=17, rng=rng)
    res, ranked, _ = probe_family("sae", x[:4000], y[:4000], x[4000:], y[4000:], KS)
    assert ranked[0] == 17
    assert res["sae_top_1_test_accuracy"].mean() > 0.93
    assert set(res) == {"sae_test_accuracy"} | {f"sae_top_{k}_test_accuracy" for k in KS}
    shuffled = rng.permutation(y)  # labels unrelated to every latent
    res, _, _ = probe_family("sae", x[:4000], shuffled[:4000], x[4000:], shuffled[4000:], KS)
    assert 0.44 < res["sae_top_1_test_accuracy"].mean() < 0.56
    assert 0.44 < res["sae_test_accuracy"].mean() < 0.56


def test_probes_fit_raw_features_as_saebench_and_match_scikit_learn():
    """A hand-made dataset on very different feature scales: posae's probe equals a direct
    LogisticRegression on the raw features; the standardised option is a different probe."""
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(3)
    x, y = planted(800, 12, informative=4, rng=rng, noise=1.5)
    x *= np.logspace(-3, 3, 12)  # scales from 1e-3 to 1e3
    train, test = slice(0, 600), slice(600, None)
    ours, _, _ = probe_family("sae", x[train], y[train], x[test], y[test], [1])
    direct = LogisticRegression(C=1.0, max_iter=1000, random_state=0).fit(x[train], y[train])
    expected = direct.predict(x[test]) == y[test]
    np.testing.assert_array_equal(ours["sae_test_accuracy"], expected)
    scaled, _, _ = probe_family("sae", x[train], y[train], x[test], y[test], [1],
                                standardize=True)
    assert not np.array_equal(scaled["sae_test_accuracy"], expected)


def test_bootstrap_interval_brackets_the_accuracy_and_shrinks_with_more_texts():
    from posae.eval.sparse_probing import bootstrap_ci

    rng = np.random.default_rng(0)
    small, large = rng.random(100) < 0.8, rng.random(10000) < 0.8
    lo, hi = bootstrap_ci([small], [np.arange(100)], 1000, 0)
    assert lo < small.mean() < hi and 0.1 < hi - lo < 0.2  # ≈ ±1.96 √(0.16/100)
    lo2, hi2 = bootstrap_ci([large], [np.arange(10000)], 1000, 0)
    assert hi2 - lo2 < (hi - lo) / 5
    # two classes judged on the same texts, right and wrong together: their mean is no
    # surer than one of them (independent resampling would narrow it by about √2)
    joint = bootstrap_ci([small, small], [np.arange(100), np.arange(100)], 1000, 0)
    assert joint[1] - joint[0] == pytest.approx(hi - lo, rel=0.15)


def test_top_k_is_chosen_on_the_training_split_only():
    rng = np.random.default_rng(1)
    n, d = 600, 20
    y_train, y_test = rng.integers(0, 2, n), rng.integers(0, 2, n)
    x_train, x_test = rng.normal(size=(n, d)), rng.normal(size=(n, d))
    x_train[:, 3] += 3 * y_train  # informative on train only
    x_test[:, 11] += 3 * y_test   # informative on test only: a leak would pick it
    assert list(top_k_latents(x_train, y_train, 1)) == [3]
    res, ranked, _ = probe_family("sae", x_train, y_train, x_test, y_test, [1])
    assert ranked[0] == 3
    assert res["sae_top_1_test_accuracy"].mean() < 0.6  # chance: latent 3 says nothing on test
    assert res["sae_test_accuracy"].mean() < 0.7


# --- pooling and the whole protocol ------------------------------------------------------


def test_trimmed_padding_pools_like_the_full_context(minilm, special, stdlib_task):
    texts = stdlib_task.texts[::60]
    sae = identity_sae(384)
    raw, codes = pool_texts(sae, minilm, special, 3, texts, context_size=64, batch_size=8)
    full, _ = pool_texts(None, minilm, special, 3, texts, 64, 8, trim_padding=False)
    assert raw.shape == (len(texts), 384) and codes.shape == (len(texts), 768)
    torch.testing.assert_close(raw, full, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(codes[:, :384] - codes[:, 384:], raw, atol=1e-5, rtol=1e-5)


def test_identity_sae_matches_the_raw_activation_probe(minilm, special, stdlib_task):
    task = subset(stdlib_task, ["email", "logging", "tkinter", "xml"], 150)
    cfg = ProbingConfig(n_train=200, n_test=100, context_size=64)
    res = sparse_probing(identity_sae(384), minilm, special, 3, task, cfg)
    assert res["n_texts_pooled"] == 600 and res["d_sae"] == 768
    assert res["mean"]["llm_test_accuracy"] > 0.7
    assert abs(res["mean"]["sae_test_accuracy"] - res["mean"]["llm_test_accuracy"]) < 0.03
    for c in task.classes:
        entry = res["per_class"][c]
        assert entry["n_train"] == 200 and entry["n_test"] == 100
        assert abs(entry["sae_test_accuracy"] - entry["llm_test_accuracy"]) < 0.06
    assert not res["notes"]


def test_sparse_probing_output_is_complete_and_deterministic(minilm, special, stdlib_task):
    task = subset(stdlib_task, ["asyncio", "unittest", "xml"], 30)  # n_train 4000 asked
    torch.manual_seed(0)
    sae = build_sae(REGISTRY["relu"].config_class(name="relu", d_in=384, width=768))
    cfg = {"context_size": 32, "batch_size": 16}
    first = sparse_probing(sae, minilm, special, 2, task, cfg)
    second = sparse_probing(sae, minilm, special, 2, task, cfg)
    first.pop("timing_s"), second.pop("timing_s")
    assert json.loads(json.dumps(first)) == second
    keys = {"llm_test_accuracy", "sae_test_accuracy"} | {
        f"{m}_top_{k}_test_accuracy" for m in ("llm", "sae") for k in KS}
    assert set(first["mean"]) == keys == set(first["mean_ci95"])
    for key in keys:
        lo, hi = first["mean_ci95"][key]
        assert lo <= first["mean"][key] <= hi
    for c in task.classes:
        entry = first["per_class"][c]
        assert keys <= set(entry)
        assert (entry["n_train"], entry["n_test"]) == (48, 12)  # 24 + 6 per class, balanced
        assert len(entry["sae_top_latents"]) == 50
        assert all(0 <= entry[k] <= 1 for k in keys)
    assert len(first["notes"]) == 3 and "fewer" in first["notes"][0]
    assert first["mean"]["sae_test_accuracy"] == pytest.approx(
        np.mean([first["per_class"][c]["sae_test_accuracy"] for c in task.classes]))
    with pytest.raises(ConfigError, match="eval.probing.ks"):
        sparse_probing(sae, minilm, special, 2, task, {"ks": [0]})
