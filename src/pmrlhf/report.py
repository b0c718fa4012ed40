"""Plots and the markdown report of a demo (or any set of evaluated policies)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

METHOD_COLORS = {"sft": "tab:gray", "kl": "tab:red", "pm": "tab:orange", "cpm": "tab:blue"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_answer_distributions(results: dict[str, dict[str, Any]], path: Path) -> Path:
    """Per prompt family: each method's answer distribution (+ invalid) against the target."""
    plt = _pyplot()
    first = next(iter(results.values()))
    families: dict[str, list[int]] = {}
    for i, row in enumerate(first["per_prompt"]):
        families.setdefault(row["family"], []).append(i)
    methods = list(results)
    fig, axes = plt.subplots(1, len(families), figsize=(4.2 * len(families), 3.8), squeeze=False)
    for ax, (family, rows) in zip(axes[0], families.items(), strict=True):
        labels = [*first["per_prompt"][rows[0]]["answers"], "invalid"]
        width = 0.8 / (len(methods) + 1)

        def avg(method: str, key: str, rows=rows) -> list[float]:
            per = [results[method]["per_prompt"][r][key] for r in rows]
            return [sum(col) / len(col) for col in zip(*per, strict=True)]

        positions = range(len(labels))
        ax.bar(
            [p - 0.4 + width / 2 for p in positions],
            avg(methods[0], "target"),
            width,
            color="black",
            alpha=0.25,
            label="target softmax(r)",
        )
        for m, method in enumerate(methods):
            ax.bar(
                [p - 0.4 + width * (m + 1.5) for p in positions],
                avg(method, "distribution"),
                width,
                color=METHOD_COLORS.get(method),
                label=method,
            )
        ax.scatter(
            list(positions),
            avg(methods[0], "truth"),
            marker="_",
            s=300,
            color="black",
            label="ground truth",
            zorder=3,
        )
        ax.set_xticks(list(positions), labels, rotation=20)
        ax.set_title(family)
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("share of sampled responses")
    axes[0][-1].legend(fontsize=8, loc="upper right")
    fig.suptitle("Answer distribution per prompt family (held-out prompts)")
    fig.tight_layout()
    return _save(fig, plt, path)


def plot_preference_histograms(pairs: dict[str, dict[str, list[float]]], path: Path) -> Path:
    """Implied pairwise preference σ(log π1 − log π2) of each method vs the RM's σ(r1 − r2)."""
    plt = _pyplot()
    methods = list(pairs)
    fig, axes = plt.subplots(
        1, len(methods), figsize=(3.6 * len(methods), 3.2), squeeze=False, sharey=True
    )
    bins = [i / 20 for i in range(21)]
    for ax, method in zip(axes[0], methods, strict=True):
        ax.hist(pairs[method]["rm"], bins=bins, alpha=0.5, color="black", label="reward model")
        ax.hist(
            pairs[method]["policy"],
            bins=bins,
            alpha=0.6,
            color=METHOD_COLORS.get(method),
            label=method,
        )
        ax.set_title(method)
        ax.set_xlabel("P(y1 ≻ y2)")
    axes[0][0].set_ylabel("sampled pairs")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle("Preference of sampled response pairs: policy vs reward model")
    fig.tight_layout()
    return _save(fig, plt, path)


def plot_training_curves(histories: dict[str, list[dict[str, float]]], path: Path) -> Path:
    plt = _pyplot()
    keys = [
        ("reward_mean", "reward"),
        ("penalty_mean", "Σ p_t (penalty)"),
        ("entropy", "token entropy"),
    ]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.2), squeeze=False)
    for ax, (key, label) in zip(axes[0], keys, strict=True):
        for method, rows in histories.items():
            ax.plot(
                [r["step"] for r in rows],
                [r.get(key, float("nan")) for r in rows],
                color=METHOD_COLORS.get(method),
                label=method,
            )
        ax.set_xlabel("step")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, plt, path)


def _save(fig, plt, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
