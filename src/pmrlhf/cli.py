"""The ``pmrlhf`` command line. Each sub-command lives in its own module and is imported only
when it runs, so ``pmrlhf exact`` starts without loading transformers."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line summary). Each module defines ``add_arguments(parser)`` and
# ``run(args) -> int``.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("pmrlhf.demo", "preference collapse vs matching, end to end on a tiny LM"),
    "exact": ("pmrlhf.exact", "closed-form KL-RLHF vs PM optima: preference collapse, no training"),
    "bandit": ("pmrlhf.rl.bandit", "one-token bandit trained by the RL engine vs its closed form"),
    "rl": ("pmrlhf.rl.cli", "RL fine-tuning (PPO, RLOO, GRPO, REINFORCE++) with kl/pm/cpm"),
    "sft": ("pmrlhf.sft", "supervised fine-tuning of a causal LM"),
    "rm": ("pmrlhf.reward", "reward-model training (BTL pairwise, Plackett-Luce listwise)"),
    "score": ("pmrlhf.score", "score every response of a dataset with a reward model"),
    "eval": ("pmrlhf.evaluate", "PMD, reward, KL, entropy and diversity of a trained policy"),
}


def _top_level_parser() -> argparse.ArgumentParser:
    from pmrlhf import __version__

    parser = argparse.ArgumentParser(
        prog="pmrlhf",
        description="Preference-matching RLHF. Run `pmrlhf COMMAND --help` for a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n"
        + "\n".join(f"  {name:<8} {summary}" for name, (_, summary) in COMMANDS.items()),
    )
    parser.add_argument("--version", action="version", version=f"pmrlhf {__version__}")
    parser.add_argument("command", nargs="?", choices=list(COMMANDS), help="the command to run")
    return parser


def build_command_parser(name: str):
    module_name, summary = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(
        prog=f"pmrlhf {name}",
        description=(module.__doc__ or summary).strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    module.add_arguments(parser)
    return module, parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        _top_level_parser().parse_args(argv)
        _top_level_parser().print_help()
        return 0 if not argv else 2
    module, parser = build_command_parser(argv[0])
    args = parser.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        print(f"pmrlhf {argv[0]}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
