"""Preference collapse in closed form, with no training.

For a finite set of responses with rewards r and a reference distribution π_ref, prints the
KL-RLHF optimum π_ref·exp(r/β)/Z for each β next to the PM optimum softmax(r/β_pm), the
preference each implies between the two highest-reward responses, the reward model's own
preference σ(r1 − r2), and the mass left on minority responses.

With no arguments it shows the spec's 51%/49% example: as β goes 1 → 0.1 → 0.01, KL-RLHF
picks the majority with probability 0.51 → 0.599 → 0.982, while PM stays at 0.51.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from pmrlhf.theory import (
    collapse_table,
    default_collapse_reward,
    kl_optimal_policy,
    pm_optimal_policy,
)


def _floats(text: str, what: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{what}: expected comma-separated numbers, got {text!r}"
        ) from None
    if not values:
        raise argparse.ArgumentTypeError(f"{what}: no numbers given")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--reward",
        type=lambda s: _floats(s, "--reward"),
        default=None,
        help="comma-separated rewards of the responses (default: log(0.51/0.49),0 — the 51%%/49%% example)",
    )
    parser.add_argument(
        "--ref",
        type=lambda s: _floats(s, "--ref"),
        default=None,
        help="comma-separated reference probabilities, one per response; normalised (default: uniform)",
    )
    parser.add_argument(
        "--beta",
        type=float,
        nargs="+",
        default=[1.0, 0.1, 0.01],
        help="KL-RLHF regularisation strengths to tabulate (default: 1 0.1 0.01)",
    )
    parser.add_argument(
        "--pm-beta",
        type=float,
        default=1.0,
        help="β of the PM row; 1 is exact preference matching (default: 1)",
    )
    parser.add_argument("--plot", type=Path, help="write a PNG of implied preference against β")
    parser.add_argument(
        "--json", action="store_true", help="print the numbers as JSON instead of a table"
    )


def _validated_inputs(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    reward = torch.tensor(args.reward or default_collapse_reward(), dtype=torch.float64)
    if reward.numel() < 2:
        raise ValueError("--reward needs at least two responses")
    if args.ref is None:
        ref = torch.full_like(reward, 1.0 / reward.numel())
    else:
        ref = torch.tensor(args.ref, dtype=torch.float64)
        if ref.numel() != reward.numel():
            raise ValueError(f"--ref has {ref.numel()} values but --reward has {reward.numel()}")
        if (ref <= 0).any():
            raise ValueError("--ref probabilities must all be > 0")
        ref = ref / ref.sum()
    for beta in [*args.beta, args.pm_beta]:
        if not beta > 0:
            raise ValueError(f"--beta values must be > 0, got {beta}")
    return reward, ref


def format_table(table: dict) -> str:
    top, second = table["top_pair"]
    lines = [
        f"rewards {', '.join(f'{r:.4f}' for r in table['reward'])}   "
        f"reference {', '.join(f'{p:.3f}' for p in table['ref'])}",
        f"top pair: response {top} vs response {second}",
        "",
        f"{'method':<8}{'beta':>8}  {'P(top ≻ 2nd)':>13}  {'RM σ(Δr)':>9}  {'minority':>9}  "
        f"{'TV to PM':>9}  policy",
    ]
    for row in table["rows"]:
        policy = " ".join(f"{p:.3f}" for p in row["policy"])
        lines.append(
            f"{row['method']:<8}{row['beta']:>8g}  {row['implied_preference']:>13.3f}  "
            f"{row['rm_preference']:>9.3f}  {row['minority_mass']:>9.3f}  {row['tv_to_pm_target']:>9.3f}  {policy}"
        )
    lines.append("")
    lines.append(
        f"target minority mass (softmax(r)): {table['target_minority_mass']:.3f}. "
        "KL-RLHF sharpens toward the majority as β shrinks (preference collapse); PM at β=1 matches."
    )
    return "\n".join(lines)


def plot_collapse(reward: torch.Tensor, ref: torch.Tensor, pm_beta: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = torch.argsort(reward, descending=True)
    top, second = int(order[0]), int(order[1])
    betas = torch.logspace(-2.5, 1, 200, dtype=torch.float64)

    def pair(probs: torch.Tensor) -> float:
        return float(probs[top] / (probs[top] + probs[second]))

    kl_curve = [pair(kl_optimal_policy(reward, ref, float(b))) for b in betas]
    pm_value = pair(pm_optimal_policy(reward, pm_beta))
    rm_value = float(torch.sigmoid(reward[top] - reward[second]))
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.plot(betas, kl_curve, label="KL-RLHF optimum", color="tab:red")
    ax.axhline(pm_value, color="tab:blue", label=f"PM optimum (β={pm_beta:g})")
    ax.axhline(rm_value, color="black", linestyle=":", label="reward model σ(r1 − r2)")
    ax.set_xscale("log")
    ax.set_xlabel("β (regularisation strength)")
    ax.set_ylabel(f"implied P(response {top} ≻ response {second})")
    ax.set_title("Preference collapse: KL-RLHF sharpens as β → 0")
    ax.set_ylim(min(0.45, rm_value - 0.05), 1.02)
    ax.legend(loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    reward, ref = _validated_inputs(args)
    table = collapse_table(reward, ref, list(args.beta), pm_beta=args.pm_beta)
    if args.plot:
        plot_collapse(reward, ref, args.pm_beta, args.plot)
        table["plot"] = str(args.plot)
    if args.json:
        print(json.dumps(table, indent=2))
    else:
        print(format_table(table))
        if args.plot:
            print(f"plot written to {args.plot}")
    return 0


__all__ = ["add_arguments", "format_table", "plot_collapse", "run"]
