"""The evaluation's figures, one function per PNG under `<run>/plots/`."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy.cluster.hierarchy import dendrogram  # noqa: E402


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def feature_density(frequency: np.ndarray, path: Path, title: str) -> Path:
    """Histogram of log10 firing frequency per latent; dead latents counted apart."""
    fig, ax = plt.subplots(figsize=(6, 4))
    alive = frequency[frequency > 0]
    if alive.size:
        ax.hist(np.log10(alive), bins=50, color="tab:blue")
    ax.set_xlabel("log10 firing frequency (fraction of held-out tokens)")
    ax.set_ylabel("latents")
    ax.set_title(f"{title}\n{(frequency == 0).sum()} dead of {frequency.size} latents")
    ax.axvline(np.log10(0.1), color="grey", ls="--", lw=1, label="dense (10 %)")
    ax.legend()
    return _save(fig, path)


def position_curves(curves: dict, path: Path, title: str) -> Path:
    """MSE, explained variance and L0 against token position."""
    fig, axes = plt.subplots(3, 1, figsize=(7, 7), sharex=True)
    for ax, key, label in zip(axes, ("mse", "explained_variance", "l0"),
                              ("MSE", "explained variance", "L0")):
        ax.plot(curves["position"], curves[key], color="tab:blue")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("token position in sequence")
    axes[0].set_title(title)
    return _save(fig, path)


def adjacent_stability(curves: dict, temporal: dict, path: Path, title: str) -> Path:
    """Jaccard of active sets and cosine of codes between positions t and t+1, each with
    its chance value (shuffled pairs) as a dashed line of the same colour."""
    fig, ax = plt.subplots(figsize=(7, 4))
    t = curves["position"][:-1]
    for key, label, colour in (("adjacent_jaccard", "Jaccard of active sets", "tab:blue"),
                               ("adjacent_code_cosine", "cosine of codes", "tab:orange")):
        ax.plot(t, curves[key][:-1], label=label, color=colour)
        ax.axhline(temporal[f"{key}_chance"], color=colour, linestyle="--",
                   label=f"{label}, chance (shuffled pairs)")
    ax.set_xlabel("position t (pair t, t+1)")
    ax.set_ylabel("similarity")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def feature_position_heatmap(firing_rate: np.ndarray, positions: np.ndarray, path: Path,
                             title: str, max_latents: int = 256) -> Path:
    """Firing rate of the most frequent latents (rows, sorted by peak position) over positions."""
    frequency = firing_rate.mean(0)
    top = np.argsort(-frequency)[:max_latents]
    top = top[frequency[top] > 0]
    rates = firing_rate[:, top].T
    order = np.argsort(rates.argmax(1), kind="stable")
    fig, ax = plt.subplots(figsize=(8, 6))
    image = ax.imshow(rates[order], aspect="auto", cmap="viridis", interpolation="nearest",
                      extent=(positions[0] - 0.5, positions[-1] + 0.5, len(top) - 0.5, -0.5))
    fig.colorbar(image, ax=ax, label="firing rate")
    ax.set_xlabel("token position")
    ax.set_ylabel(f"latent (top {len(top)} by frequency, sorted by peak position)")
    ax.set_title(title)
    return _save(fig, path)


def specificity_against_null(result: dict, n_fires: np.ndarray, path: Path, title: str
                             ) -> Path:
    """Each scored latent's position specificity against its firing count, beside the
    null (the same count dealt over positions by chance: mean and mean + 2 sd), latents
    specialised at the false-discovery rate in colour."""
    scored = ~np.isnan(result["specificity"])
    fires, spec = n_fires[scored], result["specificity"][scored]
    special = result["specialised"][scored]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    if not scored.any():
        ax.text(0.5, 0.5, "no latent fired often enough to be scored", ha="center",
                transform=ax.transAxes)
        ax.set_title(title)
        return _save(fig, path)
    ax.scatter(fires[~special], spec[~special], s=4, color="grey", alpha=0.5,
               label="not above its null")
    ax.scatter(fires[special], spec[special], s=6, color="tab:purple",
               label=f"specialised ({int(special.sum())} of {int(scored.sum())})")
    order = np.argsort(fires)
    mean, sd = result["null_mean"][scored][order], result["null_sd"][scored][order]
    ax.plot(fires[order], mean, color="black", lw=1, label="null mean (chance)")
    ax.plot(fires[order], mean + 2 * sd, color="black", lw=1, ls="--", label="null mean + 2 sd")
    ax.set_xscale("log")
    ax.set_ylim(0, 1)
    ax.set_xlabel("held-out fires of the latent")
    ax.set_ylabel("position specificity 1 − H(p)/log T")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def profile_dendrogram(clusters: dict, path: Path, title: str) -> Path:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    dendrogram(clusters["linkage"], ax=ax, truncate_mode="lastp", p=40, no_labels=True,
               color_threshold=None)
    ax.set_xlabel(f"{clusters['n_latents']} latents (most frequent), leaves merged to 40")
    ax.set_ylabel("correlation distance of position profiles")
    ax.set_title(f"{title}\n{clusters['n_clusters']} clusters (best silhouette)")
    return _save(fig, path)


def sparse_probing_curve(results: dict, ks: list[int], path: Path, title: str) -> Path:
    """Mean test accuracy of k-sparse probes on SAE latents against k, with references."""
    mean = results["mean"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ks, [mean[f"sae_top_{k}_test_accuracy"] for k in ks], "o-", label="SAE top-k latents")
    ax.axhline(mean["sae_test_accuracy"], color="tab:green", ls="--", label="SAE, all latents")
    ax.axhline(mean["llm_test_accuracy"], color="black", ls=":", label="raw activations")
    ax.set_xscale("log")
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("k (latents in the probe)")
    ax.set_ylabel("test accuracy (mean over classes)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def recovery_histogram(max_cosine: np.ndarray, family: np.ndarray, families: tuple[str, ...],
                       threshold: float, path: Path, title: str) -> Path:
    """Per true feature, the best latent's cosine similarity, one histogram per family."""
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.linspace(min(0.0, max_cosine.min()), 1.0, 41)
    for index, name in enumerate(families):
        values = max_cosine[family == index]
        if values.size:
            ax.hist(values, bins=bins, histtype="step", lw=1.5,
                    label=f"{name} ({(values > threshold).mean():.0%} recovered)")
    ax.axvline(threshold, color="grey", ls="--", lw=1)
    ax.set_xlabel("max cosine similarity of a true feature with any decoder row")
    ax.set_ylabel("true features")
    ax.set_title(f"{title}\nrecovery of the planted dictionary")
    ax.legend(fontsize=8)
    return _save(fig, path)


def runs_comparison(header: list[str], body: list[list], path: Path) -> Path:
    """One bar chart per numeric column of a sweep's report, runs along x."""
    columns = [i for i, name in enumerate(header) if i >= 2]
    runs = [row[0] for row in body]
    fig, axes = plt.subplots(len(columns), 1, figsize=(max(6, 0.9 * len(runs) + 2),
                                                       1.8 * len(columns)), sharex=True)
    for ax, i in zip(np.atleast_1d(axes), columns):
        values = [np.nan if row[i] is None else row[i] for row in body]
        ax.bar(range(len(runs)), values, color="tab:blue")
        ax.set_ylabel(header[i], rotation=0, ha="right", va="center")
        ax.grid(axis="y", alpha=0.3)
    np.atleast_1d(axes)[-1].set_xticks(range(len(runs)), runs, rotation=30, ha="right")
    return _save(fig, path)


def position_curves_of_runs(curves: dict[str, dict], path: Path) -> Path:
    """Explained variance, L0 and adjacent Jaccard over positions, every run on one figure."""
    keys = [("explained_variance", "explained variance"), ("l0", "L0"),
            ("adjacent_jaccard", "adjacent Jaccard")]
    fig, axes = plt.subplots(len(keys), 1, figsize=(8, 7), sharex=True)
    for ax, (key, label) in zip(axes, keys):
        for run, c in curves.items():
            ax.plot(c["position"], c[key], label=run, lw=1.2)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, ncol=2)
    axes[-1].set_xlabel("token position in sequence")
    return _save(fig, path)


def matched_frontier(groups: dict, methods: list[str], labels: list[str], path: Path,
                     title: str, claims: dict[str, list[tuple[str, float]]] | None = None
                     ) -> Path:
    """One panel per metric: its mean over seeds against the achieved L0 (log axis), one
    line per method, error bars of one standard deviation where there are several seeds;
    a paper's claimed number as a dotted level in its method's colour (`claims`: {label:
    [(method, value)]}; Gemma-2-2b at the paper's own L0, so a reference, not a point)."""
    from posae.matched import AXIS_LABELS, summary  # the report's, not the evaluation's
    shown = [label for label in labels if any(g.get(label) for g in groups.values())]
    fig, axes = plt.subplots(len(shown), 1, figsize=(7, 2.4 * len(shown)), sharex=True)
    drawn = False
    for ax, label in zip(np.atleast_1d(axes), shown):
        for i, method in enumerate(methods):
            points = sorted((t, g) for (m, t), g in groups.items() if m == method and g.get(label))
            if not points:
                continue
            l0 = [summary(g["L0"])[0] for _, g in points]
            mean, sd, _ = zip(*(summary(g[label]) for _, g in points))
            # ten colours, then the next line style: every method its own line
            line = ax.errorbar(l0, mean, yerr=sd, marker="osD^"[i // 10 % 4], ms=3, capsize=3,
                               color=f"C{i % 10}", ls=["-", "--", "-.", ":"][i // 10 % 4],
                               label=method)
            for claimed, value in (claims or {}).get(label, []):
                if claimed == method:
                    ax.axhline(value, ls=":", lw=1, color=line[0].get_color())
                    drawn = True
        ax.set_ylabel(AXIS_LABELS.get(label, label), fontsize=8)
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
    axes = np.atleast_1d(axes)
    axes[0].set_title(title + ("\ndotted: the paper's number (Gemma-2-2b, its own L0)"
                               if drawn else ""), fontsize=9)
    axes[0].legend(fontsize=7, ncol=2)
    ticks = sorted({target for _, target in groups})  # the targets, plain, no minor labels
    axes[-1].set_xticks(ticks, [str(t) for t in ticks])
    axes[-1].xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes[-1].set_xlim(min(l0 for g in groups.values() for l0 in g["L0"]) / 1.3,
                      max(l0 for g in groups.values() for l0 in g["L0"]) * 1.3)
    axes[-1].set_xlabel("held-out L0 (log scale)")
    return _save(fig, path)
