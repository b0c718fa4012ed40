"""RL fine-tuning of a Hugging Face causal LM with kl, pm or cpm regularisation.

Runs PPO (critic + GAE), RLOO, GRPO without std normalisation, or REINFORCE++ from a YAML
config (`--config`), with any field overridden by `--field value` or `--set field=value`.
The same command runs on many processes or GPUs under `accelerate launch`:

    accelerate launch --num_processes 2 -m pmrlhf rl --config configs/rl_example.yaml

Writes output_dir/metrics.jsonl (one line per step), output_dir/checkpoint (every
`save_every` steps and at the end; resume with --resume) and output_dir/policy.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pmrlhf.config import add_config_arguments, config_from_args
from pmrlhf.rl.config import RLConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--resume",
        type=Path,
        help="continue exactly from a checkpoint folder (output_dir/checkpoint)",
    )
    add_config_arguments(parser, RLConfig)


def run(args: argparse.Namespace) -> int:
    from pmrlhf.rl.trainer import RLTrainer

    config = config_from_args(RLConfig, args)
    if args.resume is not None and not args.resume.is_dir():
        raise FileNotFoundError(f"--resume: checkpoint folder not found: {args.resume}")
    RLTrainer(config).train(resume=args.resume)
    return 0
