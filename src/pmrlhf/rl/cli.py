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

from pmrlhf.config import add_config_arguments, add_resume_arguments, config_from_args
from pmrlhf.rl.config import RLConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_resume_arguments(parser)
    add_config_arguments(parser, RLConfig)


def run(args: argparse.Namespace) -> int:
    from pmrlhf.rl.trainer import RLTrainer
    from pmrlhf.runtime import has_complete_copy

    config = config_from_args(RLConfig, args)
    # checked before any model is loaded; a save cut short between its renames still counts
    if args.resume is not None and not has_complete_copy(args.resume):
        raise FileNotFoundError(f"--resume: checkpoint folder not found: {args.resume}")
    RLTrainer(config).train(resume=args.resume, allow_config_change=args.allow_config_change)
    return 0
