"""The ``pmrlhf`` command line. Each sub-command lives in its own module and is imported only
when it runs, so ``pmrlhf exact`` starts without loading transformers."""

from __future__ import annotations

import argparse
import atexit
import gc
import importlib
import os
import sys
import warnings
from typing import NoReturn

# What the user can fix: bad options, values, files and data. Every check in the project raises
# one of these with a message that names the option, file, row or field, so the command prints
# that one line and exits with 2 (argparse's code for usage errors). Any other exception is a
# bug in the project or a library and keeps its traceback, which is what a bug report needs.
# ValueError covers DataError, UnicodeDecodeError and the reward-function errors; the OSError
# subclasses are the file-system mistakes (a missing file, a folder where a file belongs, no
# permission).
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
)

# name -> (module, one-line summary). Each module defines ``add_arguments(parser)`` and
# ``run(args) -> int``.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("pmrlhf.demo", "preference collapse vs matching, end to end on a tiny LM"),
    "exact": ("pmrlhf.exact", "closed-form KL-RLHF vs PM optima: preference collapse, no training"),
    "bandit": ("pmrlhf.rl.bandit", "one-token bandit trained by the RL engine vs its closed form"),
    "rl": ("pmrlhf.rl.cli", "RL fine-tuning (PPO, RLOO, GRPO, REINFORCE++) with kl/pm/cpm"),
    "sft": ("pmrlhf.sft", "supervised fine-tuning of a causal LM"),
    "rm": ("pmrlhf.reward", "reward-model training (BTL pairwise, Plackett-Luce listwise)"),
    "dpo": ("pmrlhf.offline", "offline preference training: DPO and its PM/cPM counterparts"),
    "score": ("pmrlhf.score", "score every response of a dataset with a reward model"),
    "eval": ("pmrlhf.evaluate", "PMD, reward, KL, entropy and diversity of a trained policy"),
    "experiment": (
        "pmrlhf.experiment",
        "the paper's experiment on SmolLM2-135M: SFT, RM, RL kl vs cpm, report",
    ),
    "alpha": ("pmrlhf.alpha", "choose cpm's threshold α from the reference's token probabilities"),
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
    prog = f"pmrlhf {argv[0]}"
    formatwarning = warnings.formatwarning
    warnings.formatwarning = _warning_line(prog)
    try:
        code = int(module.run(args) or 0)
        if _end_process_group():
            _exit_without_teardown(code)
        return code
    except USER_ERRORS as err:
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = formatwarning


def _end_process_group() -> bool:
    """End the process group a command started under ``accelerate launch``, once it is done;
    returns whether there was one.

    Left to interpreter exit, the group's communication threads can abort a process whose run
    has finished ("terminate called without an active exception"). Objects that still hold the
    group (a wrapped model in a reference cycle) are collected first, so that destroying it
    really releases it. torch is only looked up, not imported: commands that never loaded it
    have no group.
    """
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        gc.collect()
        distributed.destroy_process_group()
        return True
    return False


def _exit_without_teardown(code: int) -> NoReturn:
    """Exit a finished multi-process command: exit handlers run and output is flushed, but the
    interpreter's teardown, where native threads of the communication libraries can still abort
    the process after its work is saved, is skipped."""
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def one_line(err: BaseException) -> str:
    """The error's message on one line (a library's multi-line message is joined with '; ')."""
    if isinstance(err, OSError) and err.strerror and err.filename is not None:
        return f"{err.filename}: {err.strerror}"  # rather than "[Errno 17] File exists: ..."
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return "; ".join(lines) or type(err).__name__


def _warning_line(prog: str):
    # Warnings print as "pmrlhf CMD: warning: ..." rather than with a source line of this package.
    def format_warning(message, category, filename, lineno, line=None) -> str:
        kind = "" if category is UserWarning else f"{category.__name__}: "
        return f"{prog}: warning: {kind}{message}\n"

    return format_warning


if __name__ == "__main__":
    sys.exit(main())
