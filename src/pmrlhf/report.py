"""The demo's table, plots and Markdown report (the plots serve any set of evaluated policies)."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pmrlhf.evaluate import AnswerDistribution

METHOD_COLORS = {"sft": "tab:gray", "kl": "tab:red", "pm": "tab:orange", "cpm": "tab:blue",
                 "dpo": "tab:pink", "cpm-dpo": "tab:cyan", "pm-dpo": "tab:olive",
                 "kl-strong": "tab:purple"}  # fmt: skip
#: for other method names, in order of appearance: colours no named method uses
SPARE_COLORS = ("tab:brown", "tab:green", "gold", "navy", "teal", "maroon")


def method_colors(methods: list[str]) -> dict[str, str]:
    """A distinct colour per method: its own from :data:`METHOD_COLORS`, else a spare one (a
    plotting library's default cycle would repeat the named methods' colours)."""
    spare = itertools.cycle(SPARE_COLORS)
    return {m: METHOD_COLORS[m] if m in METHOD_COLORS else next(spare) for m in methods}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_answer_distributions(
    per_prompt: dict[str, list[AnswerDistribution]],
    path: Path,
    ylabel: str = "share of sampled responses",
) -> Path:
    """Per prompt family: each method's answer distribution (+ invalid) against the target.

    ``per_prompt`` maps each method to its per-prompt distributions, prompts in the same order;
    ``ylabel`` says what they are (sampled shares, or exact probabilities).
    """
    plt = _pyplot()
    first = next(iter(per_prompt.values()))
    families: dict[str, list[int]] = {}
    for i, row in enumerate(first):
        families.setdefault(row.family, []).append(i)
    methods = list(per_prompt)
    colors = method_colors(methods)
    cols = min(3, len(families))
    rows_n = -(-len(families) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.6 * cols, 3.4 * rows_n), squeeze=False)
    for ax, (family, rows) in zip(axes.flat, families.items(), strict=False):
        labels = [*first[rows[0]].answers, "invalid"]
        width = 0.8 / (len(methods) + 1)

        def avg(method: str, key: str, rows=rows) -> list[float]:
            per = [getattr(per_prompt[method][r], key) for r in rows]
            return [sum(col) / len(col) for col in zip(*per, strict=True)]

        positions = list(range(len(labels)))
        ax.bar([p - 0.4 + width / 2 for p in positions], avg(methods[0], "target"), width,
               color="black", alpha=0.3, label="target softmax(r)")  # fmt: skip
        for m, method in enumerate(methods):
            ax.bar([p - 0.4 + width * (m + 1.5) for p in positions], avg(method, "distribution"),
                   width, color=colors[method], label=method)  # fmt: skip
        ax.scatter(positions, avg(methods[0], "truth"), marker="_", s=300, color="black",
                   label="ground truth", zorder=3)  # fmt: skip
        ax.set_xticks(positions, labels)
        ax.set_title(family)
        ax.set_ylim(0, 1.05)
    for ax in axes.flat[len(families) :]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel(ylabel)
    handles, names = axes.flat[0].get_legend_handles_labels()
    fig.suptitle("Answer distribution per prompt family (held-out prompts)")
    fig.legend(
        handles, names, loc="upper center", bbox_to_anchor=(0.5, 0.95), ncol=len(names), fontsize=9
    )
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    return _save(fig, plt, path)


def answer_pair_preferences(per_prompt: list[AnswerDistribution]) -> dict[str, list[float]]:
    """For every pair of answers (i, j) of every prompt, oriented so the target prefers i:
    the target's preference t_i/(t_i+t_j) and the policy's p_i/(p_i+p_j).

    The policy's answer probabilities are the exact ones where available, else the sampled ones.
    """
    target_prefs, policy_prefs = [], []
    for row in per_prompt:
        target = row.target[:-1]
        exact = row.exact_distribution
        policy = (exact if exact is not None else row.distribution)[:-1]
        for i in range(len(target)):
            for j in range(i + 1, len(target)):
                a, b = (i, j) if target[i] >= target[j] else (j, i)
                target_prefs.append(target[a] / (target[a] + target[b]))
                total = policy[a] + policy[b]
                policy_prefs.append(policy[a] / total if total > 0 else 0.5)
    return {"target": target_prefs, "policy": policy_prefs}


def plot_preference_histograms(per_prompt: dict[str, list[AnswerDistribution]], path: Path) -> Path:
    """Histograms of the pairwise preference each policy implies vs the reward model's."""
    plt = _pyplot()
    methods = list(per_prompt)
    colors = method_colors(methods)
    fig, axes = plt.subplots(1, len(methods), figsize=(3.6 * len(methods), 3.2), squeeze=False,
                             sharey=True)  # fmt: skip
    bins = [i / 20 for i in range(21)]
    for ax, method in zip(axes[0], methods, strict=True):
        prefs = answer_pair_preferences(per_prompt[method])
        ax.hist(prefs["target"], bins=bins, alpha=0.45, color="black", label="reward model")
        ax.hist(prefs["policy"], bins=bins, alpha=0.6, color=colors[method], label=method)
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
    colors = method_colors(list(histories))
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.2), squeeze=False)
    for ax, (key, label) in zip(axes[0], keys, strict=True):
        for method, rows in histories.items():
            ax.plot(
                [r["step"] for r in rows],
                [r.get(key, float("nan")) for r in rows],
                color=colors[method],
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


# --------------------------------------------------------------------------- the demo's report
@dataclass(frozen=True)
class DemoResults:
    """What the demo's table and report show: per-method metrics and the run's settings.

    ``methods`` maps each method to its metrics (``metrics.json``'s ``methods``);
    ``pmd_improvement`` maps pm/cpm to their relative PMD improvement over kl, and
    ``"<offline row> over dpo"`` to an offline row's improvement over the dpo row.
    """

    methods: dict[str, dict[str, Any]]
    pmd_improvement: dict[str, float]
    seconds: float
    version: str
    alpha_summary: str
    seed: int
    rl_algo: str
    rl_steps: int
    prompts_per_step: int
    samples_per_prompt: int
    eval_samples: int
    kl_beta: float
    pm_beta: float
    cpm_beta: float
    cpm_alpha: float
    dpo_beta: float = 0.1
    offline_beta: float = 1.0
    offline_steps: int = 0
    offline_sft_weight: float = 0.0


COLUMNS = (
    ("tv_to_target", "TV→target"),
    ("exact.tv_to_target", "exact TV"),
    ("tv_valid", "TV valid"),
    ("tv_to_truth", "TV→truth"),
    ("minority_mass", "minority"),
    ("invalid_rate", "invalid"),
    ("pmd", "PMD"),
    ("mean_reward", "reward"),
    ("kl_to_ref", "KL→ref"),
)


def _column(row: dict[str, Any], key: str) -> float:
    """``row[key]``, where ``a.b`` reads ``row[a][b]``; NaN when absent."""
    value: Any = row
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return float("nan")
        value = value[part]
    return float(value)


def format_table(results: DemoResults) -> str:
    """The demo's console table: one row per method, then the target and PMD improvement.

    ``TV→target`` is measured on the evaluation samples; ``exact TV`` is the same distance from
    the policy's exact answer probabilities (teacher forcing), free of the samples' noise (of the
    order of 0.01–0.02 at 1,000 samples per prompt).
    """
    methods = results.methods
    lines = [f"{'method':<7}" + "".join(f"{label:>11}" for _, label in COLUMNS)]
    for method, row in methods.items():
        lines.append(f"{method:<7}" + "".join(f"{_column(row, key):>11.3f}" for key, _ in COLUMNS))
    target_minority = next(iter(methods.values())).get("target_minority_mass")
    if target_minority is not None:
        lines.append(f"target minority mass (reward model's softmax(r)): {target_minority:.3f}")
    over_kl = {m: v for m, v in results.pmd_improvement.items() if " over " not in m}
    over_dpo = {m.split(" over ")[0]: v for m, v in results.pmd_improvement.items()
                if m.endswith(" over dpo")}  # fmt: skip
    for baseline, improvement in (("kl", over_kl), ("dpo", over_dpo)):
        if improvement:
            lines.append(
                f"PMD improvement over {baseline}: "
                + ", ".join(f"{m} {v:+.0%}" for m, v in improvement.items())
            )
    lines.append(f"wall time: {results.seconds:.0f} s")
    return "\n".join(lines)


def report_markdown(results: DemoResults, table: str, plots: list[Path]) -> str:
    """``report.md``: the table, what each method does, and the plots with their captions."""
    methods = results.methods

    def value(method: str, key: str) -> str:
        return (
            f"{methods[method][key]:.3f}" if method in methods and key in methods[method] else "n/a"
        )

    text = f"""# pmrlhf demo report

pmrlhf {results.version}; seed {results.seed}; {results.rl_steps} RL steps per method
({results.rl_algo}, {results.prompts_per_step} prompts × {results.samples_per_prompt} samples per step);
{results.eval_samples} samples per held-out prompt for evaluation.

```
{table}
```

- **kl (β={results.kl_beta})** is standard RLHF. Its optimum π_ref·exp(r/β) sharpens the reward
  model's preferences by 1/β, so the majority answer takes almost all the mass: minority mass
  {value("kl", "minority_mass")} against a target of {value("kl", "target_minority_mass")}. This is
  preference collapse.
- **pm (β={results.pm_beta})** regularises with −log π, whose optimum is softmax(r) over *all*
  token sequences. On text, each token can earn up to log V nats of bonus, far more than the
  reward differences, and the reward model never saw most sequences: pm drifts into invalid
  text (invalid rate {value("pm", "invalid_rate")}). That is the reason conditional PM exists.
- **cpm (β={results.cpm_beta}, α={results.cpm_alpha})** applies the PM term only to tokens the SFT
  model gives more than α, and the KL term elsewhere. Every token of a valid answer has SFT
  probability above α, while the SFT model's slips into invalid text sit far below it, so cpm
  matches the reward model on the valid answers (TV {value("cpm", "tv_to_target")} to the target)
  and keeps the invalid rate at {value("cpm", "invalid_rate")} (SFT: {value("sft", "invalid_rate")}).
- **Why α = {results.cpm_alpha}**: {results.alpha_summary}.
{_offline_bullets(results, value)}- **PMD** is the paper's preference matching divergence, over pairs of responses sampled with
  top-p 0.9 as in the paper (lower is better); `pmd_untruncated` in metrics.json uses plain
  samples, where rare invalid responses dominate it.

![answer distributions]({plots[0].name})

Each method's share of sampled answers on held-out prompts, per question family. The light grey
bar is the reward model's target softmax(r) (summed over each answer's paraphrases), the black
tick the hidden ground truth, and "invalid" is everything that is not a valid answer.

![preference histograms]({plots[1].name})

For every pair of answers of a held-out prompt, the preference the policy implies,
π(a)/(π(a) + π(b)), against the reward model's, with a the answer the reward model prefers
(exact answer probabilities by teacher forcing). A preference-matching policy reproduces the
reward model's histogram; a collapsed one piles up at 1.
"""
    if len(plots) > 2:
        text += f"""
![training curves]({plots[2].name})

Mean reward, total penalty Σ p_t and token entropy over the RL steps.
"""
    return text


def _offline_bullets(results: DemoResults, value: Callable[[str, str], str]) -> str:
    """Report lines of the offline rows present (``pmrlhf dpo`` on the annotators' rankings)."""
    lines = []
    if "dpo" in results.methods:
        lines.append(
            f"""- **dpo (β={results.dpo_beta}, offline)** trains `pmrlhf dpo` for {results.offline_steps}
  steps on the annotators' rankings the reward model saw, from the SFT model. Its fixed point is
  the kl optimum, so it collapses too (minority mass {value("dpo", "minority_mass")}), and since
  no term of the loss holds the probability of text outside the data, pushing the losers down
  sends mass into invalid text (invalid rate {value("dpo", "invalid_rate")})."""
        )
    for row, loss in (("pm-dpo", "pm"), ("cpm-dpo", "cpm")):
        if row in results.methods:
            lines.append(
                f"""- **{row} (β={results.offline_beta}, sft_weight={results.offline_sft_weight}, offline)** is
  `pmrlhf dpo --loss {loss}` on the same data: its fixed point is softmax(r) (moved slightly
  towards the preferred responses by the SFT term), so it matches the preferences (TV
  {value(row, "tv_to_target")} to the target), and the SFT term, the one part of the loss that
  holds the probability of text outside the data, keeps the invalid rate at
  {value(row, "invalid_rate")} (SFT: {value("sft", "invalid_rate")})."""
            )
    return "\n".join(lines) + ("\n" if lines else "")


def write_report(
    results: DemoResults,
    per_prompt: dict[str, list[AnswerDistribution]],
    histories: dict[str, list[dict[str, float]]],
    out: Path,
) -> str:
    """Draw the plots and write ``report.md`` into ``out``; returns the console table."""
    plots = [
        plot_answer_distributions(per_prompt, out / "answer_distributions.png"),
        plot_preference_histograms(per_prompt, out / "preference_histograms.png"),
    ]
    if histories:
        plots.append(plot_training_curves(histories, out / "training_curves.png"))
    table = format_table(results)
    (out / "report.md").write_text(report_markdown(results, table, plots))
    return table
