"""LoRA adapter folders as the RL policy and as the critic's start: adapters train, bases do not."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from pmrlhf import lora
from pmrlhf.models import load_causal_lm, load_reward_model, load_tokenizer
from pmrlhf.rl.config import RLConfig
from pmrlhf.rl.rollout import ValueModel
from pmrlhf.rl.trainer import RLTrainer
from pmrlhf.runtime import read_jsonl

SCRIPTS = Path(__file__).parent / "scripts"
REWARD_SPEC = f"{SCRIPTS / 'reward_fns.py'}:likes_tea"
PROMPTS = ["Which drink do you prefer ?", "Which season do you like best ?"]


@pytest.fixture(scope="module")
def policy_adapter(tiny_model_dir, tmp_path_factory) -> Path:
    """A LoRA adapter folder for the tiny causal LM, as `pmrlhf sft --lora` saves one."""
    out = tmp_path_factory.mktemp("policy-adapter")
    lora.apply_lora(load_causal_lm(str(tiny_model_dir)), "causal_lm", r=4).save_pretrained(out)
    load_tokenizer(str(tiny_model_dir)).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def reward_adapter(tiny_model_dir, tmp_path_factory) -> Path:
    """A LoRA reward-model folder (adapter + scalar head), as `pmrlhf rm --lora` saves one."""
    out = tmp_path_factory.mktemp("reward-adapter")
    model = lora.apply_lora(load_reward_model(str(tiny_model_dir)), "seq_cls", r=4)
    model.save_pretrained(out)
    load_tokenizer(str(tiny_model_dir)).save_pretrained(out)
    return out


def split_parameters(model: torch.nn.Module) -> tuple[dict, dict]:
    """Copies of (adapter and head weights, base weights), by name."""
    adapter, base = {}, {}
    for name, param in model.named_parameters():
        trained = "lora_" in name or "modules_to_save" in name or name.endswith("score.weight")
        (adapter if trained else base)[name] = param.detach().clone()
    return adapter, base


def moved(before: dict, model: torch.nn.Module) -> set[str]:
    now = dict(model.named_parameters())
    return {name for name, value in before.items() if not torch.equal(value, now[name].detach())}


def test_policy_adapter_loads_trainable_and_frozen_copies_load_frozen(policy_adapter):
    policy = lora.load_policy_model(policy_adapter)
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert not policy.training and not any(m.training for m in policy.modules())
    frozen = lora.load_policy_model(policy_adapter, trainable=False)
    assert not any(p.requires_grad for p in frozen.parameters())
    assert not lora.load_scoring_model(policy_adapter).training


CASES = [
    ("ppo", "policy"),
    ("ppo", "reward"),
    ("rloo", None),
    ("grpo", None),
    ("reinforce_pp", None),
]


@pytest.mark.parametrize(("algo", "critic_init"), CASES)
def test_every_algorithm_trains_a_lora_adapter_policy(
    policy_adapter, reward_adapter, tmp_path, algo, critic_init
):
    reward = str(reward_adapter) if critic_init == "reward" else REWARD_SPEC
    config = RLConfig(
        policy=str(policy_adapter), reward=reward, algo=algo, regularizer="kl",
        critic_init=critic_init or "auto", max_steps=2, prompts_per_step=2, samples_per_prompt=2,
        max_new_tokens=4, lr=5e-2, critic_lr=5e-2, beta=0.1, output_dir=str(tmp_path),
        quiet=True,
    )  # fmt: skip
    trainer = RLTrainer(config, prompts=PROMPTS)
    policy = trainer.accelerator.unwrap_model(trainer.policy)
    assert lora.is_peft_model(policy)
    adapter, base = split_parameters(policy)
    assert adapter and base
    critic = trainer.accelerator.unwrap_model(trainer.critic) if trainer.critic else None
    if critic is not None:
        critic_adapter, critic_base = split_parameters(critic)
    trainer.train()

    assert moved(adapter, policy) == set(adapter), "some adapter weights did not train"
    assert moved(base, policy) == set(), "base weights of the policy changed"
    if critic is not None:
        assert moved(critic_adapter, critic), "the critic's adapter and head did not train"
        assert moved(critic_base, critic) == set(), "base weights of the critic changed"
    for row in read_jsonl(tmp_path / "metrics.jsonl"):
        assert math.isfinite(row["policy_loss"]) and math.isfinite(row["kl_to_ref"])
    # the saved policy is again an adapter folder, and it holds the trained adapter
    saved = lora.load_policy_model(tmp_path / "policy", trainable=False)
    assert lora.is_adapter_dir(tmp_path / "policy")
    trained = {n: p.detach() for n, p in policy.named_parameters() if n in adapter}
    for name, param in saved.named_parameters():
        if name in trained:
            torch.testing.assert_close(param, trained[name])


def test_a_lora_reward_model_starts_the_critic(reward_adapter, tiny_model_dir):
    """The critic reads the reward model's own backbone (with its adapter) and head."""
    critic = ValueModel(lora.load_scoring_model(reward_adapter))
    tokenizer = load_tokenizer(str(tiny_model_dir))
    batch = tokenizer(["Which drink do you prefer ? tea"], return_tensors="pt")
    values = critic(batch.input_ids, batch.attention_mask, prompt_length=6)
    assert values.shape == (1, batch.input_ids.shape[1] - 6)
    # the value before the last token is the reward model's score of the text up to there
    scorer = lora.load_scoring_model(reward_adapter)
    with torch.no_grad():
        score = scorer(input_ids=batch.input_ids[:, :-1]).logits[0, 0]
    torch.testing.assert_close(values[0, -1].detach(), score, rtol=0, atol=1e-5)
