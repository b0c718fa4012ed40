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
    cols = min(3, len(families))
    rows_n = -(-len(families) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.6 * cols, 3.4 * rows_n), squeeze=False)
    for ax, (family, rows) in zip(axes.flat, families.items(), strict=False):
        labels = [*first["per_prompt"][rows[0]]["answers"], "invalid"]
        width = 0.8 / (len(methods) + 1)

        def avg(method: str, key: str, rows=rows) -> list[float]:
            per = [results[method]["per_prompt"][r][key] for r in rows]
            return [sum(col) / len(col) for col in zip(*per, strict=True)]

        positions = list(range(len(labels)))
        ax.bar([p - 0.4 + width / 2 for p in positions], avg(methods[0], "target"), width,
               color="black", alpha=0.3, label="target softmax(r)")  # fmt: skip
        for m, method in enumerate(methods):
            ax.bar([p - 0.4 + width * (m + 1.5) for p in positions], avg(method, "distribution"),
                   width, color=METHOD_COLORS.get(method), label=method)  # fmt: skip
        ax.scatter(positions, avg(methods[0], "truth"), marker="_", s=300, color="black",
                   label="ground truth", zorder=3)  # fmt: skip
        ax.set_xticks(positions, labels)
        ax.set_title(family)
        ax.set_ylim(0, 1.05)
    for ax in axes.flat[len(families) :]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("share of sampled responses")
    handles, names = axes.flat[0].get_legend_handles_labels()
    fig.suptitle("Answer distribution per prompt family (held-out prompts)")
    fig.legend(
        handles, names, loc="upper center", bbox_to_anchor=(0.5, 0.95), ncol=len(names), fontsize=9
    )
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    return _save(fig, plt, path)


def answer_pair_preferences(per_prompt: list[dict[str, Any]]) -> dict[str, list[float]]:
    """For every pair of answers (i, j) of every prompt, oriented so the target prefers i:
    the target's preference t_i/(t_i+t_j) and the policy's p_i/(p_i+p_j).

    The policy's answer probabilities are the exact ones where available, else the sampled ones.
    """
    target_prefs, policy_prefs = [], []
    for row in per_prompt:
        target = row["target"][:-1]
        policy = row.get("exact_distribution", row["distribution"])[:-1]
        for i in range(len(target)):
            for j in range(i + 1, len(target)):
                a, b = (i, j) if target[i] >= target[j] else (j, i)
                target_prefs.append(target[a] / (target[a] + target[b]))
                total = policy[a] + policy[b]
                policy_prefs.append(policy[a] / total if total > 0 else 0.5)
    return {"target": target_prefs, "policy": policy_prefs}


def plot_preference_histograms(results: dict[str, dict[str, Any]], path: Path) -> Path:
    """Histograms of the pairwise preference each policy implies vs the reward model's."""
    plt = _pyplot()
    methods = list(results)
    fig, axes = plt.subplots(1, len(methods), figsize=(3.6 * len(methods), 3.2), squeeze=False,
                             sharey=True)  # fmt: skip
    bins = [i / 20 for i in range(21)]
    for ax, method in zip(axes[0], methods, strict=True):
        prefs = answer_pair_preferences(results[method]["per_prompt"])
        ax.hist(prefs["target"], bins=bins, alpha=0.45, color="black", label="reward model")
        ax.hist(
            prefs["policy"], bins=bins, alpha=0.6, color=METHOD_COLORS.get(method), label=method
        )
        ax.set_title(method)
        ax.set_xlabel("P(preferred answer ≻ other)")
    axes[0][0].set_ylabel("answer pairs")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle("Pairwise preference between answers: policy vs reward model")
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
