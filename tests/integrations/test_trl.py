"""The TRL plug-in: exact agreement with TRL's own k1 penalty, and convergence on a bandit.

Runs in an environment with TRL installed (``make test-integrations``); skipped elsewhere.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from transformers import AutoModelForCausalLM  # noqa: E402
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer  # noqa: E402
from trl_bandit import build_bandit_model, run_trl_bandit, trl_args  # noqa: E402

from pmrlhf.integrations.trl import PenaltyReward, pm_risks  # noqa: E402
from pmrlhf.metrics import total_variation  # noqa: E402
from pmrlhf.models import load_tokenizer  # noqa: E402
from pmrlhf.rl.config import PMSafetyWarning  # noqa: E402

PROMPTS = ["Which season do you like best ?", "Which drink do you prefer ?"]


def test_expected_trl_version():
    """The runner states which TRL it meant to test; make sure that is the one imported."""
    expected = os.environ.get("PMRLHF_EXPECT_TRL")
    if expected is None:
        pytest.skip("PMRLHF_EXPECT_TRL is not set")
    assert trl.__version__ == expected


def zero_reward(completion_ids, **kwargs):
    return [0.0] * len(completion_ids)


def length_reward(completion_ids, **kwargs):
    return [0.1 * len(ids) for ids in completion_ids]


# -- kl mode: the plug-in equals TRL's own k1 penalty ---------------------------------------------


def _record_logps(trainer):
    """Keep every tensor the trainer's own log-prob method returns (instrumentation only)."""
    calls: list[torch.Tensor] = []
    original = trainer._get_per_token_logps_and_entropies

    def recording(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append(out[0].detach().clone())
        return out

    trainer._get_per_token_logps_and_entropies = recording
    return calls


def _perturb(model, seed: int = 1) -> None:
    """Move the trainable weights (all of them, or the LoRA ones) away from the reference."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.3 * torch.randn(param.shape, generator=generator))


@pytest.mark.parametrize(
    ("use_peft", "temperature"),
    [(False, 1.0), (True, 1.0), (False, 0.7)],
    ids=["ref-model", "peft-adapter", "ref-model-temperature"],
)
def test_kl_mode_equals_trl_k1(tiny_model_dir, tmp_path, use_peft, temperature):
    """TRL's own k1 (beta=β) and the plug-in's kl (TRL beta=0) agree sequence by sequence.

    The reference is a separate model (TRL loads its own from the policy's folder), or, for a
    PEFT policy, the policy with its adapter disabled on both sides.
    """
    beta, group = 0.7, 4
    inputs = [{"prompt": p} for p in PROMPTS for _ in range(group)]
    common = dict(
        num_generations=group,
        per_device_train_batch_size=len(inputs),
        max_completion_length=6,
        normalize_advantages=False,
        mask_truncated_completions=use_peft,  # both masking modes, one per variant
        temperature=temperature,  # log-probs of the tempered policy, on both sides
    )
    tokenizer = load_tokenizer(str(tiny_model_dir))
    extra = {}
    if use_peft:
        from peft import LoraConfig

        extra["peft_config"] = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])

    def build(name, reward_funcs, trl_beta):
        trainer = RLOOTrainer(
            model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
            reward_funcs=reward_funcs,
            args=trl_args(RLOOConfig, tmp_path / name, beta=trl_beta, **common),
            train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS}),
            processing_class=tokenizer,
            **extra,
        )
        _perturb(trainer.model)  # the policy moves away from its reference
        return trainer

    # TRL's own KL-in-reward.
    trainer_a = build("a", [length_reward], beta)
    calls = _record_logps(trainer_a)
    torch.manual_seed(123)
    out_a = trainer_a._generate_and_score_completions([dict(x) for x in inputs])
    policy_logp, ref_logp = calls
    mask_a = out_a["completion_mask"]
    trl_k1 = ((policy_logp - ref_logp) * mask_a).sum(-1)

    # The plug-in's kl with TRL's beta=0 and the same policy weights.
    ref_model = None if use_peft else AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    penalty = PenaltyReward("kl", beta=beta, ref_model=ref_model)
    trainer_b = build("b", [length_reward, penalty], 0.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PMSafetyWarning)
        penalty.bind(trainer_b)
    risks = [str(w.message) for w in caught if issubclass(w.category, PMSafetyWarning)]
    assert len(risks) == (temperature != 1.0) and all("temperature" in r for r in risks)
    assert penalty.model is trainer_b.model and penalty.args is trainer_b.args
    assert penalty.processing_class is trainer_b.processing_class
    torch.manual_seed(123)
    out_b = trainer_b._generate_and_score_completions([dict(x) for x in inputs])

    # Same batch, with prompts of different lengths (left padding) and completions of several
    # lengths (EOS and right padding).
    assert torch.equal(out_a["completion_ids"], out_b["completion_ids"])
    assert torch.equal(out_a["prompt_mask"], out_b["prompt_mask"])
    assert out_a["prompt_mask"].sum(-1).unique().numel() == 2
    assert mask_a.sum(-1).unique().numel() > 1
    if use_peft:  # some completions hit the length limit and are masked out entirely
        assert (mask_a.sum(-1) == 0).any() and (
            penalty.last_penalty[mask_a.sum(-1).cpu() == 0] == 0
        ).all()
    assert trl_k1.abs().max() > 0.1  # the check is not vacuous
    torch.testing.assert_close(penalty.last_penalty, trl_k1.cpu(), rtol=1e-5, atol=1e-5)
    # ... and TRL's own arithmetic turns both into the same advantages.
    torch.testing.assert_close(out_b["advantages"], out_a["advantages"], rtol=1e-5, atol=1e-5)


def test_bind_checks_and_warnings(tiny_model_dir, tmp_path):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    unbound = PenaltyReward("pm", beta=1.0)
    with pytest.raises(RuntimeError, match="bind"):
        unbound(prompts=["a"], completions=["b"], completion_ids=[[4]])

    penalty = PenaltyReward("cpm", beta=1.0, alpha=0.1)  # no ref_model, no PEFT
    args = trl_args(
        GRPOConfig,
        tmp_path,
        beta=0.0,
        num_generations=2,
        per_device_train_batch_size=2,
        max_completion_length=2,
        temperature=0.7,
        top_k=5,
        top_p=0.9,
        scale_rewards="group",
        multi_objective_aggregation="normalize_then_sum",
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[zero_reward, penalty],
        args=args,
        train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS}),
        processing_class=tokenizer,
    )
    risks = " | ".join(pm_risks(trainer, penalty))
    for setting in ("temperature", "top_p", "top_k", "scale_rewards", "normalize_then_sum"):
        assert setting in risks
    with (
        pytest.warns(PMSafetyWarning, match="scale_rewards"),
        pytest.raises(ValueError, match="needs a reference"),
    ):
        penalty.bind(trainer)
    with pytest.raises(RuntimeError, match="not bound"):  # a failed bind leaves it unbound
        penalty(prompts=PROMPTS, completions=["a", "b"], completion_ids=[[4], [5]])
    with pytest.raises(ValueError, match="not among the trainer's reward_funcs"):
        PenaltyReward("pm").bind(trainer)
    with pytest.raises(ValueError, match="unknown regularizer"):
        PenaltyReward("entropy")


# -- convergence: a one-token bandit over the whole (tiny) vocabulary -----------------------------


@pytest.fixture(scope="module")
def bandit_dir(tmp_path_factory):
    return build_bandit_model(tmp_path_factory.mktemp("bandit"))


@pytest.mark.parametrize("regularizer", ["pm", "cpm", "kl"])
def test_rloo_bandit_reaches_closed_form(bandit_dir, tmp_path, regularizer):
    tv, reference, optimum, learned, _ = run_trl_bandit(bandit_dir, tmp_path, regularizer, "rloo")
    # the targets differ from each other and from the start, so reaching one is informative
    assert float(total_variation(reference, optimum)) > 0.1
    assert tv < 0.05, (regularizer, tv, optimum.tolist(), learned.tolist())


@pytest.mark.slow
@pytest.mark.parametrize("regularizer", ["pm", "cpm"])
def test_grpo_bandit_reaches_closed_form(bandit_dir, tmp_path, regularizer):
    tv, _, optimum, learned, _ = run_trl_bandit(bandit_dir, tmp_path, regularizer, "grpo")
    assert tv < 0.05, (regularizer, tv, optimum.tolist(), learned.tolist())


@pytest.mark.slow
@pytest.mark.multiprocess
def test_rloo_bandit_on_two_processes(bandit_dir, tmp_path):
    """Each process scores its own completions; TRL gathers them into groups across processes."""
    import json
    import subprocess
    import sys

    from conftest import two_process_launch

    script = Path(__file__).parent / "scripts" / "trl_bandit_two_ranks.py"
    command, env = two_process_launch(str(script), str(bandit_dir), str(tmp_path), "cpm")
    env["PYTHONPATH"] = os.pathsep.join(p for p in [env.get("PYTHONPATH", ""), *sys.path] if p)
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    assert all(r["processes"] == 2 for r in ranks)
    assert ranks[0]["learned"] == ranks[1]["learned"]  # the replicas stayed in sync
    assert ranks[0]["tv"] < 0.05, ranks[0]
