"""Sparse probing (SAEBench: Karvonen et al. 2025; after Gurnee et al. 2023).

How well do a few SAE latents linearly encode a known property of a text?

1. Pool. Every text of a task (`posae/conf/probing/<task>.yaml`) goes once through the LM to
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

Modules: `tasks` (the task files and their texts), `pooling` (step 1), `probes` (steps
2-4), `protocol` (the settings and `sparse_probing`, which ties them).
"""

from posae.eval.sparse_probing.pooling import pool_texts
from posae.eval.sparse_probing.probes import (
    BinarySplit,
    binary_split,
    bootstrap_ci,
    class_pools,
    probe_correct,
    probe_family,
    top_k_latents,
)
from posae.eval.sparse_probing.protocol import ProbingConfig, probing_config, sparse_probing
from posae.eval.sparse_probing.tasks import (
    ProbingDataError,
    ProbingTask,
    ProbingTaskConfig,
    load_probing_task,
    task_config,
)

__all__ = [
    "ProbingConfig", "ProbingTaskConfig", "ProbingTask", "ProbingDataError", "probing_config",
    "task_config", "load_probing_task", "pool_texts", "class_pools", "binary_split",
    "BinarySplit", "top_k_latents", "probe_correct", "probe_family", "bootstrap_ci",
    "sparse_probing",
]
