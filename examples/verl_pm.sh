#!/usr/bin/env bash
# Conditional preference matching in verl 0.9 (GRPO estimator, penalty in the reward).
#
#   MODEL=Qwen/Qwen2.5-0.5B-Instruct TRAIN=~/data/gsm8k/train.parquet VAL=~/data/gsm8k/test.parquet \
#     bash examples/verl_pm.sh [extra Hydra overrides]
#
# PENALTY is `pm` or `cpm:<alpha>` (default cpm:0.1) and BETA the penalty strength (default 1.0).
# pmrlhf must be importable by the Ray workers (install it in verl's environment). See
# docs/integrations.md for the settings that would move the preference-matching target.
set -euo pipefail

PENALTY=${PENALTY:-cpm:0.1}
BETA=${BETA:-1.0}
: "${MODEL:?set MODEL to a Hugging Face model id or folder}"
: "${TRAIN:?set TRAIN to a training parquet file}"
: "${VAL:?set VAL to a validation parquet file}"

python3 -m verl.trainer.main_ppo \
  algorithm.adv_estimator=grpo \
  algorithm.norm_adv_by_std_in_grpo=False \
  algorithm.use_kl_in_reward=True \
  algorithm.kl_penalty="$PENALTY" \
  algorithm.kl_ctrl.type=fixed \
  algorithm.kl_ctrl.kl_coef="$BETA" \
  actor_rollout_ref.actor.use_kl_loss=False \
  actor_rollout_ref.rollout.temperature=1.0 \
  actor_rollout_ref.rollout.top_p=1.0 \
  actor_rollout_ref.rollout.top_k=-1 \
  actor_rollout_ref.rollout.n=8 \
  actor_rollout_ref.model.path="$MODEL" \
  data.train_files="$TRAIN" \
  data.val_files="$VAL" \
  +ray_kwargs.ray_init.runtime_env.worker_process_setup_hook=pmrlhf.integrations.verl.install \
  "$@"
