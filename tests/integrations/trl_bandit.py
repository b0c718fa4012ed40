"""A one-token bandit over a tiny vocabulary, trained by TRL with the pmrlhf penalty plug-in.

One prompt; every token of the 8-token vocabulary is an answer with a known reward, and the
exact optimum comes from :mod:`pmrlhf.theory`. Shared by ``test_trl.py`` and the two-process
script in ``scripts/``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import datasets
import torch
from transformers import AutoModelForCausalLM
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

from pmrlhf.integrations.trl import PenaltyReward
from pmrlhf.metrics import total_variation
from pmrlhf.models import build_tiny_model, load_tokenizer
from pmrlhf.rl.config import PMSafetyWarning
from pmrlhf.theory import cpm_optimal_policy, kl_optimal_policy, pm_optimal_policy


def trl_args(config_cls, out: Path, **overrides):
    base = dict(
        output_dir=str(out),
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=10_000,
        disable_tqdm=True,
        seed=0,
        bf16=False,
        fp16=False,
        disable_dropout=True,
    )
    base.update(overrides)
    return config_cls(**base)


BANDIT_TARGET = {"answer0": 0.15, "answer1": 0.35, "answer2": 0.30}  # the rest share 0.2
BANDIT_REWARD = {"answer0": 1.0, "answer1": 0.5, "answer2": 0.0}  # the rest get -1
BANDIT_PROMPT = "question0"


def build_bandit_model(folder: Path) -> Path:
    """A tiny LM whose full next-token distribution after the prompt is the reference."""
    folder = build_tiny_model(
        folder,
        [BANDIT_PROMPT, *BANDIT_REWARD],
        seed=0,
        hidden_size=32,
        num_layers=1,
        num_heads=2,
    )
    tokenizer = load_tokenizer(str(folder))
    model = AutoModelForCausalLM.from_pretrained(folder)
    vocab = len(tokenizer)
    target = torch.full((vocab,), 0.2 / (vocab - len(BANDIT_TARGET)))
    for word, prob in BANDIT_TARGET.items():
        target[tokenizer.convert_tokens_to_ids(word)] = prob
    encoded = tokenizer([BANDIT_PROMPT], return_tensors="pt")
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        logp = torch.log_softmax(model(**encoded).logits[0, -1], -1)
        loss = torch.nn.functional.kl_div(logp, target, reduction="sum")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(folder)
    return folder


def _rewards(tokenizer) -> torch.Tensor:
    rewards = torch.full((len(tokenizer),), -1.0, dtype=torch.float64)
    for word, value in BANDIT_REWARD.items():
        rewards[tokenizer.convert_tokens_to_ids(word)] = value
    return rewards


@torch.no_grad()
def _distribution(model, tokenizer) -> torch.Tensor:
    encoded = tokenizer([BANDIT_PROMPT], return_tensors="pt").to(model.device)
    return torch.softmax(model(**encoded).logits[0, -1].double(), -1).cpu()


def _optimum(name: str, rewards, reference, beta: float, alpha: float) -> torch.Tensor:
    if name == "pm":
        return pm_optimal_policy(rewards, beta)
    if name == "kl":
        return kl_optimal_policy(rewards, reference, beta)
    probs = reference.unsqueeze(-1)
    return cpm_optimal_policy(rewards, probs, torch.ones_like(probs), alpha, beta)


def run_trl_bandit(
    bandit_dir,
    tmp_path,
    regularizer: str,
    trainer_name: str,
    steps: int = 300,
    per_device: int = 16,
):
    """Train on the bandit with the plug-in; (TV, reference, optimum, learned, trainer)."""
    beta, alpha, group = 1.0, 0.2, 16
    tokenizer = load_tokenizer(str(bandit_dir))
    rewards = _rewards(tokenizer)

    def task_reward(completion_ids, **kwargs):
        return [float(rewards[ids[0]]) for ids in completion_ids]

    policy = AutoModelForCausalLM.from_pretrained(bandit_dir)
    reference = _distribution(policy, tokenizer)
    ref_model = AutoModelForCausalLM.from_pretrained(bandit_dir) if regularizer != "pm" else None
    penalty = PenaltyReward(regularizer, beta=beta, alpha=alpha, ref_model=ref_model)
    common = dict(
        beta=0.0,
        num_generations=group,
        per_device_train_batch_size=per_device,
        max_completion_length=1,
        learning_rate=3e-3,
        max_steps=steps,
        lr_scheduler_type="linear",
        max_grad_norm=0.0,
    )
    if trainer_name == "rloo":
        trainer_cls, args = RLOOTrainer, trl_args(RLOOConfig, tmp_path, **common)
    else:
        args = trl_args(GRPOConfig, tmp_path, scale_rewards="none", **common)
        trainer_cls = GRPOTrainer
    trainer = trainer_cls(
        model=policy,
        reward_funcs=[task_reward, penalty],
        args=args,
        train_dataset=datasets.Dataset.from_dict({"prompt": [BANDIT_PROMPT] * 64}),
        processing_class=tokenizer,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", PMSafetyWarning)
        penalty.bind(trainer)
    trainer.train()
    learned = _distribution(trainer.model, tokenizer)
    optimum = _optimum(regularizer, rewards, reference, beta, alpha)
    tv = float(total_variation(learned, optimum))
    print(f"{trainer_name}/{regularizer}: TV to the closed form {tv:.4f}")
    return tv, reference, optimum, learned, trainer
