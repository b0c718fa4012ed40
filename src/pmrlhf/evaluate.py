"""Evaluate a policy: PMD (the paper's metric), reward, KL to a reference, entropy, diversity.

For each prompt, N responses are sampled from the policy. Consecutive samples form the
independent pairs of the PMD protocol (spec §6):

    PMD = mean [(r(y1) − r(y2)) − (log π(y1) − log π(y2))]²

with unclipped reward-model scores and full-softmax sequence log-probs. Where the prompts come
from an enumerable world (``--world default``, the demo's), every sample is also mapped to an
answer or to "invalid", and the distribution-matching metrics are reported: TV to the reward
model's target and to the ground truth, TV over valid answers only, minority mass and invalid
rate. On real data those are omitted.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from pmrlhf.metrics import pmd, total_variation
from pmrlhf.rl.rewards import RewardFn
from pmrlhf.rl.rollout import generate, token_logprobs


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Unique n-grams over all n-grams of the responses (word level)."""
    grams = [
        tuple(words[i : i + n])
        for words in (t.split() for t in texts)
        for i in range(len(words) - n + 1)
    ]
    return len(set(grams)) / len(grams) if grams else 0.0


@torch.no_grad()
def sample_and_score(
    policy,
    tokenizer,
    reward_fn: RewardFn,
    prompts: Sequence[str],
    n_samples: int,
    max_new_tokens: int,
    ref=None,
    batch_size: int = 256,
    temperature: float = 1.0,
    top_p: float = 1.0,
) -> list[dict[str, Any]]:
    """For each prompt: its samples, their rewards, policy log-probs (and reference log-probs)."""
    policy.eval()
    jobs = [p for p in prompts for _ in range(n_samples)]
    texts: list[str] = []
    rewards: list[torch.Tensor] = []
    logps: list[torch.Tensor] = []
    ref_logps: list[torch.Tensor] = []
    entropies: list[torch.Tensor] = []
    for start in range(0, len(jobs), batch_size):
        batch = jobs[start : start + batch_size]
        rollout = generate(
            policy, tokenizer, batch, max_new_tokens, temperature=temperature, top_p=top_p
        )
        mask = rollout.response_mask.float()
        logp, entropy = token_logprobs(
            policy,
            rollout.sequences,
            rollout.attention_mask,
            rollout.prompt_length,
            with_entropy=True,
        )
        assert entropy is not None
        logps.append((logp * mask).sum(-1).cpu())
        entropies.append(((entropy * mask).sum(-1) / mask.sum(-1)).cpu())
        if ref is not None:
            ref_logp, _ = token_logprobs(
                ref, rollout.sequences, rollout.attention_mask, rollout.prompt_length
            )
            ref_logps.append((ref_logp * mask).sum(-1).cpu())
        rewards.append(reward_fn(batch, rollout.responses).float().cpu())
        texts.extend(rollout.responses)
    all_rewards, all_logps, all_entropy = torch.cat(rewards), torch.cat(logps), torch.cat(entropies)
    all_ref = torch.cat(ref_logps) if ref_logps else None
    out = []
    for i, prompt in enumerate(prompts):
        part = slice(i * n_samples, (i + 1) * n_samples)
        out.append(
            {
                "prompt": prompt,
                "texts": texts[part],
                "rewards": all_rewards[part],
                "logp": all_logps[part],
                "ref_logp": all_ref[part] if all_ref is not None else None,
                "entropy": all_entropy[part],
            }
        )
    return out


def _pairs(
    samples: list[dict[str, Any]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Independent pairs: samples (0,1), (2,3), … of every prompt → (r1, r2, logp1, logp2)."""
    r1, r2, l1, l2 = [], [], [], []
    for s in samples:
        n = len(s["texts"]) // 2 * 2
        r1.append(s["rewards"][0:n:2])
        r2.append(s["rewards"][1:n:2])
        l1.append(s["logp"][0:n:2])
        l2.append(s["logp"][1:n:2])
    return torch.cat(r1), torch.cat(r2), torch.cat(l1), torch.cat(l2)


def pmd_from_samples(samples: list[dict[str, Any]]) -> float:
    return float(pmd(*_pairs(samples)))


def pair_preferences(samples: list[dict[str, Any]]) -> dict[str, list[float]]:
    """For each sampled pair: the policy's σ(log π1 − log π2) and the reward model's σ(r1 − r2)."""
    r1, r2, l1, l2 = _pairs(samples)
    return {"policy": torch.sigmoid(l1 - l2).tolist(), "rm": torch.sigmoid(r1 - r2).tolist()}


def general_metrics(samples: list[dict[str, Any]]) -> dict[str, float]:
    texts = [t for s in samples for t in s["texts"]]
    metrics = {
        "mean_reward": float(torch.cat([s["rewards"] for s in samples]).mean()),
        "entropy": float(torch.cat([s["entropy"] for s in samples]).mean()),
        "neg_logp": float(-torch.cat([s["logp"] for s in samples]).mean()),
        "response_words": sum(len(t.split()) for t in texts) / max(1, len(texts)),
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
    }
    if samples and samples[0]["ref_logp"] is not None:
        # Monte-Carlo estimate of KL(π ‖ π_ref) over whole responses.
        metrics["kl_to_ref"] = float(torch.cat([s["logp"] - s["ref_logp"] for s in samples]).mean())
    return metrics


@torch.no_grad()
@torch.no_grad()
def valid_sequence_logprobs(
    policy, tokenizer, world, prompt: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced log-probs of every valid response of ``prompt`` (each ending in EOS).

    Returns ``(logp, mask)`` of shape (n_valid, T), rows aligned with ``world.valid_sequences``.
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=True).input_ids
    responses = [
        [*tokenizer(text, add_special_tokens=False).input_ids, tokenizer.eos_token_id]
        for _, text in world.valid_sequences(prompt)
    ]
    width = max(len(r) for r in responses)
    device = next(policy.parameters()).device
    pad = tokenizer.pad_token_id
    sequences = torch.tensor(
        [prompt_ids + r + [pad] * (width - len(r)) for r in responses], device=device
    )
    attention = torch.tensor(
        [[1] * (len(prompt_ids) + len(r)) + [0] * (width - len(r)) for r in responses],
        device=device,
    )
    logp, _ = token_logprobs(policy, sequences, attention, len(prompt_ids))
    return logp, attention[:, len(prompt_ids) :]


def exact_answer_distribution(policy, tokenizer, world, prompt: str) -> torch.Tensor:
    """The policy's exact probability of each answer (+ "invalid" = the rest), by teacher forcing.

    An answer's probability is the sum over its valid surface forms y of π(y, EOS | x), each a
    full-softmax product over the response tokens.
    """
    logp, mask = valid_sequence_logprobs(policy, tokenizer, world, prompt)
    sequence_probs = (logp * mask).sum(-1).exp().double().cpu()
    answers = torch.zeros(len(world.answers(prompt)) + 1, dtype=torch.float64)
    for (answer, _), prob in zip(world.valid_sequences(prompt), sequence_probs, strict=True):
        answers[answer] += prob
    answers[-1] = (1.0 - answers[:-1].sum()).clamp_min(0.0)
    return answers


def _distribution_metrics(
    dist: torch.Tensor, target_valid: torch.Tensor, truth_valid: torch.Tensor
) -> dict[str, float]:
    """TV to target/truth over answers + invalid, TV over valid answers only, minority mass."""
    zero = torch.zeros(1, dtype=torch.float64)
    valid_mass = float(dist[:-1].sum())
    majority = int(truth_valid.argmax())
    return {
        "tv_to_target": float(total_variation(dist, torch.cat([target_valid, zero]))),
        "tv_to_truth": float(total_variation(dist, torch.cat([truth_valid, zero]))),
        "tv_valid": float(total_variation(dist[:-1] / valid_mass, target_valid))
        if valid_mass > 0
        else float("nan"),
        "minority_mass": valid_mass - float(dist[majority]),
        # the same, as a share of the valid answers only (defined even when most output is invalid)
        "minority_share_valid": (1.0 - float(dist[majority]) / valid_mass)
        if valid_mass > 0
        else float("nan"),
        "target_minority_mass": 1.0 - float(target_valid[majority]),
        "invalid_rate": float(dist[-1]),
    }


def world_metrics(
    samples: list[dict[str, Any]], world, reward_fn: RewardFn, policy=None, tokenizer=None
) -> dict[str, Any]:
    """Distribution-matching metrics over enumerable answers (+ an "invalid" category).

    The main numbers come from the samples. With ``policy`` and ``tokenizer`` the same metrics
    are also computed from the exact answer probabilities (key ``exact``); where a prompt has no
    valid sample at all, its ``tv_valid`` is taken from those exact probabilities, since the
    samples then say nothing about it (``tv_valid_from_exact`` counts such prompts).
    """
    sampled, exact, per_prompt = [], [], []
    fallback = 0
    for s in samples:
        prompt = s["prompt"]
        dist = torch.tensor(world.distribution(prompt, s["texts"]), dtype=torch.float64)
        valid = world.valid_sequences(prompt)
        scores = reward_fn([prompt] * len(valid), [text for _, text in valid]).double()
        target_valid = torch.tensor(
            world.answer_target(prompt, scores.tolist()), dtype=torch.float64
        )
        truth_valid = torch.tensor(world.truth_shares(prompt), dtype=torch.float64)
        row = _distribution_metrics(dist, target_valid, truth_valid)
        record = {
            "prompt": prompt,
            "family": world.family_of(prompt),
            "answers": world.answers(prompt),
            "distribution": dist.tolist(),
            "target": [*target_valid.tolist(), 0.0],
            "truth": [*truth_valid.tolist(), 0.0],
        }
        if policy is not None:
            exact_dist = exact_answer_distribution(policy, tokenizer, world, prompt)
            exact_row = _distribution_metrics(exact_dist, target_valid, truth_valid)
            exact.append(exact_row)
            record["exact_distribution"] = exact_dist.tolist()
            if math.isnan(row["tv_valid"]):  # no valid sample for this prompt
                row["tv_valid"] = exact_row["tv_valid"]
                row["minority_share_valid"] = exact_row["minority_share_valid"]
                fallback += 1
        sampled.append(row)
        per_prompt.append(record)

    def mean(rows: list[dict[str, float]]) -> dict[str, float]:
        return {key: sum(r[key] for r in rows) / len(rows) for key in rows[0]}

    out: dict[str, Any] = {**mean(sampled), "per_prompt": per_prompt}
    if exact:
        out["exact"] = mean(exact)
        out["tv_valid_from_exact"] = fallback
    return out


def evaluate_policy(
    policy,
    tokenizer,
    reward_fn: RewardFn,
    prompts: Sequence[str],
    n_samples: int = 64,
    max_new_tokens: int = 16,
    ref=None,
    world=None,
    seed: int = 0,
    pmd_pairs: int | None = None,
    pmd_top_p: float = 0.9,
) -> dict[str, Any]:
    """All metrics for one policy; ``world`` adds the enumerable-answer metrics.

    Distribution metrics use plain samples from π. PMD follows the paper's protocol: its pairs
    are drawn separately with nucleus sampling (``pmd_top_p``, 0.9 in the paper), while the
    log-probs in it are full-softmax sums. ``pmd_pairs`` pairs per prompt (default n_samples/2).
    """
    from pmrlhf.rl.rewards import CallableReward

    reward_fn = CallableReward(reward_fn)  # plain functions may return lists of floats
    torch.manual_seed(seed)
    samples = sample_and_score(
        policy, tokenizer, reward_fn, prompts, n_samples, max_new_tokens, ref=ref
    )
    metrics: dict[str, Any] = general_metrics(samples)
    if world is not None:
        metrics.update(world_metrics(samples, world, reward_fn, policy, tokenizer))
    n_pmd = 2 * (pmd_pairs if pmd_pairs is not None else max(1, n_samples // 2))
    pmd_samples = sample_and_score(
        policy, tokenizer, reward_fn, prompts, n_pmd, max_new_tokens, top_p=pmd_top_p
    )
    metrics["pmd"] = pmd_from_samples(pmd_samples)
    metrics["pmd_top_p"] = pmd_top_p
    # The same divergence over the plain samples, where rare invalid responses weigh heavily.
    metrics["pmd_untruncated"] = pmd_from_samples(samples)
    metrics["pairs"] = pair_preferences(pmd_samples)
    metrics["examples"] = {s["prompt"]: s["texts"][:8] for s in samples}
    return metrics


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--policy", required=True, help="policy to evaluate: folder, hub id or .gguf file"
    )
    parser.add_argument(
        "--reward", required=True, help="reward-model folder or 'module:function' callable"
    )
    parser.add_argument(
        "--prompts", required=True, help="prompt data file or hub dataset (a 'prompt' column)"
    )
    parser.add_argument("--ref", default=None, help="reference model for KL(π‖π_ref) (optional)")
    parser.add_argument(
        "--world",
        default=None,
        choices=["default"],
        help="prompts come from the built-in preference world: adds TV, minority mass and invalid rate",
    )
    parser.add_argument(
        "--samples", type=int, default=64, help="responses sampled per prompt (default: 64)"
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=32, help="maximum response length (default: 32)"
    )
    parser.add_argument(
        "--max-prompts", type=int, default=None, help="evaluate only the first N prompts"
    )
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    parser.add_argument(
        "--out", type=Path, default=None, help="write the metrics as JSON to this file"
    )


def run(args: argparse.Namespace) -> int:
    from pmrlhf.data import load_prompts
    from pmrlhf.models import load_causal_lm, load_tokenizer
    from pmrlhf.rl.rewards import load_reward
    from pmrlhf.runtime import resolve_dtype
    from pmrlhf.score import check_output_file

    # every option is checked before any model is loaded
    if args.samples < 2:
        raise ValueError(
            f"--samples must be at least 2 (PMD compares pairs of samples), got {args.samples}"
        )
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.max_prompts is not None and args.max_prompts < 1:
        raise ValueError(f"--max-prompts must be at least 1, got {args.max_prompts}")
    if args.out is not None:
        check_output_file(args.out)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype("auto", device)
    tokenizer = load_tokenizer(args.policy, option_name="--policy")
    policy = load_causal_lm(args.policy, dtype=dtype, device=device, option_name="--policy")
    ref = (
        load_causal_lm(args.ref, dtype=dtype, device=device, option_name="--ref")
        if args.ref
        else None
    )
    reward_fn = load_reward(args.reward, device, dtype)
    prompts = [r.prompt for r in load_prompts(args.prompts, tokenizer)]
    if args.max_prompts is not None:
        prompts = prompts[: args.max_prompts]
    world = None
    if args.world == "default":
        from pmrlhf.world import default_world

        world = default_world()
    metrics = evaluate_policy(
        policy,
        tokenizer,
        reward_fn,
        prompts,
        args.samples,
        args.max_new_tokens,
        ref=ref,
        world=world,
        seed=args.seed,
    )
    summary = {k: v for k, v in metrics.items() if k not in ("per_prompt", "examples", "pairs")}
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(metrics, indent=2))
    return 0
