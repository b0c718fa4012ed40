"""Evaluate a policy: PMD (the paper's metric), reward, KL to a reference, entropy, diversity.

For each prompt, N responses are sampled from the policy. Consecutive samples form the
independent pairs of the PMD protocol (docs/method.md §6):

    PMD = mean [(r(y1) − r(y2)) − (log π(y1) − log π(y2))]²

with unclipped reward-model scores and full-softmax sequence log-probs. Where the prompts come
from an enumerable world (``--world default``, the demo's, or a world file), every sample is
also mapped to an answer or to "invalid", and the distribution-matching metrics are reported:
TV to the reward model's target and to the ground truth, TV over valid answers only, minority
mass and invalid rate. On real data those are omitted. :func:`alpha_evidence` checks, in such a
world, where cpm's threshold α sits between a reference's valid answers and its slips.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from pmrlhf.metrics import pmd, total_variation
from pmrlhf.rl.rewards import RewardFn
from pmrlhf.rl.rollout import generate, token_logprobs

if TYPE_CHECKING:
    from pmrlhf.world import World


@dataclass
class PromptSamples:
    """Responses sampled for one prompt and their scores, aligned response by response.

    ``logp`` and ``ref_logp`` are whole-response log-probabilities under the policy and the
    reference; ``entropy`` is each response's mean token entropy.
    """

    prompt: str
    responses: list[str]
    rewards: Tensor
    logp: Tensor
    entropy: Tensor
    ref_logp: Tensor | None = None


@dataclass
class AnswerDistribution:
    """One prompt of an enumerable world: distributions over its answers, "invalid" last.

    ``distribution`` is the sampled one, ``target`` the reward model's softmax(r) and
    ``truth`` the hidden shares; ``exact_distribution`` the policy's teacher-forced one.
    """

    prompt: str
    family: str
    answers: list[str]
    distribution: list[float]
    target: list[float]
    truth: list[float]
    exact_distribution: list[float] | None = None

    def to_dict(self) -> dict[str, Any]:
        row = asdict(self)
        if self.exact_distribution is None:
            del row["exact_distribution"]
        return row


@dataclass
class WorldMetrics:
    """Distribution-matching metrics of one policy in an enumerable world.

    ``means``: the sampled metrics averaged over prompts. ``exact``: the same from the exact
    answer probabilities. ``tv_valid_from_exact``: prompts whose ``tv_valid`` came from the
    exact probabilities because no sample was valid.
    """

    means: dict[str, float]
    per_prompt: list[AnswerDistribution]
    exact: dict[str, float] | None = None
    tv_valid_from_exact: int | None = None


@dataclass
class Evaluation:
    """Everything :func:`evaluate_policy` measures for one policy.

    ``metrics``: the flat numbers (reward, entropy, KL, diversity, PMD and, with a world, the
    mean distribution metrics). ``world``: the distribution details where there is a world.
    ``pairs``: the PMD pairs' preferences; ``examples``: a few responses per prompt.
    """

    metrics: dict[str, float]
    pairs: dict[str, list[float]]
    examples: dict[str, list[str]]
    world: WorldMetrics | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON layout of ``pmrlhf eval --out``."""
        out: dict[str, Any] = dict(self.metrics)
        if self.world is not None:
            out["per_prompt"] = [row.to_dict() for row in self.world.per_prompt]
            if self.world.exact is not None:
                out["exact"] = self.world.exact
                out["tv_valid_from_exact"] = self.world.tv_valid_from_exact
        out["pairs"] = self.pairs
        out["examples"] = self.examples
        return out


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
) -> list[PromptSamples]:
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
    return [
        PromptSamples(
            prompt=prompt,
            responses=texts[i * n_samples : (i + 1) * n_samples],
            rewards=all_rewards[i * n_samples : (i + 1) * n_samples],
            logp=all_logps[i * n_samples : (i + 1) * n_samples],
            entropy=all_entropy[i * n_samples : (i + 1) * n_samples],
            ref_logp=all_ref[i * n_samples : (i + 1) * n_samples] if all_ref is not None else None,
        )
        for i, prompt in enumerate(prompts)
    ]


def _pairs(samples: list[PromptSamples]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Independent pairs: samples (0,1), (2,3), … of every prompt → (r1, r2, logp1, logp2)."""
    r1, r2, l1, l2 = [], [], [], []
    for s in samples:
        n = len(s.responses) // 2 * 2
        r1.append(s.rewards[0:n:2])
        r2.append(s.rewards[1:n:2])
        l1.append(s.logp[0:n:2])
        l2.append(s.logp[1:n:2])
    return torch.cat(r1), torch.cat(r2), torch.cat(l1), torch.cat(l2)


def pmd_from_samples(samples: list[PromptSamples]) -> float:
    return float(pmd(*_pairs(samples)))


def pair_preferences(samples: list[PromptSamples]) -> dict[str, list[float]]:
    """For each sampled pair: the policy's σ(log π1 − log π2) and the reward model's σ(r1 − r2)."""
    r1, r2, l1, l2 = _pairs(samples)
    return {"policy": torch.sigmoid(l1 - l2).tolist(), "rm": torch.sigmoid(r1 - r2).tolist()}


def general_metrics(samples: list[PromptSamples]) -> dict[str, float]:
    texts = [t for s in samples for t in s.responses]
    metrics = {
        "mean_reward": float(torch.cat([s.rewards for s in samples]).mean()),
        "entropy": float(torch.cat([s.entropy for s in samples]).mean()),
        "neg_logp": float(-torch.cat([s.logp for s in samples]).mean()),
        "response_words": sum(len(t.split()) for t in texts) / max(1, len(texts)),
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
    }
    log_ratios = [s.logp - s.ref_logp for s in samples if s.ref_logp is not None]
    if samples and len(log_ratios) == len(samples):
        # Monte-Carlo estimate of KL(π ‖ π_ref) over whole responses.
        metrics["kl_to_ref"] = float(torch.cat(log_ratios).mean())
    return metrics


@torch.no_grad()
def valid_sequence_logprobs(policy, tokenizer, world: World, prompt: str) -> tuple[Tensor, Tensor]:
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


def exact_answer_distribution(policy, tokenizer, world: World, prompt: str) -> Tensor:
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
    dist: Tensor, target_valid: Tensor, truth_valid: Tensor
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


def _mean_rows(rows: list[dict[str, float]]) -> dict[str, float]:
    return {key: sum(r[key] for r in rows) / len(rows) for key in rows[0]}


def _rewards_by_validity(samples: list[PromptSamples], world: World) -> dict[str, float]:
    """Mean reward of the valid and of the invalid samples, pooled over prompts (NaN: none).

    An invalid mean near the valid one says the reward model does not tell off-world text
    (paraphrases the world does not list, slips) from the world's answers.
    """
    pooled: dict[bool, list[float]] = {True: [], False: []}
    for s in samples:
        for text, reward in zip(s.responses, s.rewards.tolist(), strict=True):
            pooled[world.classify(s.prompt, text) is not None].append(reward)
    return {
        f"mean_reward_{'valid' if valid else 'invalid'}": (
            sum(values) / len(values) if values else math.nan
        )
        for valid, values in pooled.items()
    }


def world_metrics(
    samples: list[PromptSamples], world: World, reward_fn: RewardFn, policy=None, tokenizer=None
) -> WorldMetrics:
    """Distribution-matching metrics over enumerable answers (+ an "invalid" category).

    The main numbers come from the samples. With ``policy`` and ``tokenizer`` the same metrics
    are also computed from the exact answer probabilities (``exact``); where a prompt has no
    valid sample at all, its ``tv_valid`` is taken from those exact probabilities, since the
    samples then say nothing about it (``tv_valid_from_exact`` counts such prompts).
    """
    sampled, exact, per_prompt = [], [], []
    fallback = 0
    for s in samples:
        prompt = s.prompt
        dist = torch.tensor(world.distribution(prompt, s.responses), dtype=torch.float64)
        valid = world.valid_sequences(prompt)
        scores = reward_fn([prompt] * len(valid), [text for _, text in valid]).double()
        target_valid = torch.tensor(
            world.answer_target(prompt, scores.tolist()), dtype=torch.float64
        )
        truth_valid = torch.tensor(world.truth_shares(prompt), dtype=torch.float64)
        row = _distribution_metrics(dist, target_valid, truth_valid)
        record = AnswerDistribution(
            prompt=prompt,
            family=world.family_of(prompt),
            answers=world.answers(prompt),
            distribution=dist.tolist(),
            target=[*target_valid.tolist(), 0.0],
            truth=[*truth_valid.tolist(), 0.0],
        )
        if policy is not None:
            exact_dist = exact_answer_distribution(policy, tokenizer, world, prompt)
            exact_row = _distribution_metrics(exact_dist, target_valid, truth_valid)
            exact.append(exact_row)
            record.exact_distribution = exact_dist.tolist()
            if math.isnan(row["tv_valid"]):  # no valid sample for this prompt
                row["tv_valid"] = exact_row["tv_valid"]
                row["minority_share_valid"] = exact_row["minority_share_valid"]
                fallback += 1
        sampled.append(row)
        per_prompt.append(record)
    result = WorldMetrics(
        means={**_mean_rows(sampled), **_rewards_by_validity(samples, world)},
        per_prompt=per_prompt,
    )
    if exact:
        result.exact = _mean_rows(exact)
        result.tv_valid_from_exact = fallback
    return result


def evaluate_policy(
    policy,
    tokenizer,
    reward_fn: RewardFn,
    prompts: Sequence[str],
    n_samples: int = 64,
    max_new_tokens: int = 16,
    ref=None,
    world: World | None = None,
    seed: int = 0,
    pmd_pairs: int | None = None,
    pmd_top_p: float = 0.9,
) -> Evaluation:
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
    metrics = general_metrics(samples)
    in_world = None
    if world is not None:
        in_world = world_metrics(samples, world, reward_fn, policy, tokenizer)
        metrics.update(in_world.means)
    n_pmd = 2 * (pmd_pairs if pmd_pairs is not None else max(1, n_samples // 2))
    pmd_samples = sample_and_score(
        policy, tokenizer, reward_fn, prompts, n_pmd, max_new_tokens, top_p=pmd_top_p
    )
    metrics["pmd"] = pmd_from_samples(pmd_samples)
    metrics["pmd_top_p"] = pmd_top_p
    # The same divergence over the plain samples, where rare invalid responses weigh heavily.
    metrics["pmd_untruncated"] = pmd_from_samples(samples)
    return Evaluation(
        metrics=metrics,
        pairs=pair_preferences(pmd_samples),
        examples={s.prompt: s.responses[:8] for s in samples},
        world=in_world,
    )


@dataclass(frozen=True)
class AlphaEvidence:
    """Where cpm's α sits between the reference's valid-answer tokens and its slips.

    ``lowest_valid_token_probability``: the lowest reference probability of any token of any
    valid answer (teacher forcing). ``invalid_slip_probability_q90``: over the reference's
    invalid samples, the 90% quantile of each sample's least likely token. ``separated``: α
    lies strictly between the two.
    """

    alpha: float
    lowest_valid_token_probability: float
    invalid_samples: int
    invalid_slip_probability_q90: float
    separated: bool

    @property
    def summary(self) -> str:
        return (
            f"cpm α={self.alpha}: lowest SFT probability of a valid-answer token "
            f"{self.lowest_valid_token_probability:.3f}; 90% of the SFT model's invalid samples "
            f"have a token below {self.invalid_slip_probability_q90:.4f}"
            + (" (α separates them)" if self.separated else " (α does NOT separate them)")
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "summary": self.summary}


@torch.no_grad()
def alpha_evidence(
    ref,
    tokenizer,
    world: World,
    prompts: list[str],
    alpha: float,
    max_new_tokens: int,
    samples: int = 200,
) -> AlphaEvidence:
    """Where α sits between the reference's probabilities of valid-answer tokens and of its slips.

    cpm treats a token as meaningful when π_ref > α. The threshold does its job when every token
    of every valid answer is above it and the tokens where the reference leaves the valid
    answers are below it. Both are measured on ``prompts``: the lowest reference probability of
    any valid-answer token (teacher forcing), and for each invalid sample of the reference
    (about ``samples`` in all) the probability of its least likely token.
    """
    lowest_valid = 1.0
    for prompt in prompts:
        logp, mask = valid_sequence_logprobs(ref, tokenizer, world, prompt)
        lowest_valid = min(lowest_valid, float(logp.exp()[mask.bool()].min()))
    jobs = [p for p in prompts for _ in range(samples // len(prompts) + 1)]
    rollout = generate(ref, tokenizer, jobs, max_new_tokens)
    logp, _ = token_logprobs(ref, rollout.sequences, rollout.attention_mask, rollout.prompt_length)
    slips = sorted(
        float(logp[i][rollout.response_mask[i].bool()].exp().min())
        for i, (p, t) in enumerate(zip(rollout.prompts, rollout.responses, strict=True))
        if world.classify(p, t) is None
    )
    slip_q90 = slips[int(0.9 * (len(slips) - 1))] if slips else float("nan")
    return AlphaEvidence(
        alpha=alpha,
        lowest_valid_token_probability=lowest_valid,
        invalid_samples=len(slips),
        invalid_slip_probability_q90=slip_q90,
        separated=bool(slips) and slip_q90 < alpha < lowest_valid,
    )


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
        help="the prompts' preference world: 'default' (the demo's) or a world file such as a "
        "demo's data/world.json; adds TV, minority mass and invalid rate",
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


def check_world_prompts(world: Any, prompts: Sequence[str], option: str, source: str) -> None:
    """Refuse prompts that are no wording of the world's families: the world's metrics (answer
    distributions, minority mass, invalid rate) mean nothing for them."""
    foreign = [prompt for prompt in prompts if not world.knows(prompt)]
    if foreign:
        raise ValueError(
            f"{option}: {len(foreign)} of the {len(prompts)} prompts in {source} are not "
            f"wordings of that world's families (the first: {foreign[0]!r}); evaluate them "
            "without --world, or pass the world file the prompts were written from"
        )


def run(args: argparse.Namespace) -> int:
    from pmrlhf.data import load_prompts
    from pmrlhf.models import load_causal_lm, load_tokenizer
    from pmrlhf.optim import compute_dtype
    from pmrlhf.rl.rewards import load_reward
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
    dtype = compute_dtype("auto", device)
    tokenizer = load_tokenizer(args.policy, option_name="--policy")
    prompts = [r.prompt for r in load_prompts(args.prompts, tokenizer)]
    if args.max_prompts is not None:
        prompts = prompts[: args.max_prompts]
    world = None
    if args.world is not None:
        from pmrlhf.world import default_world, load_world

        world = default_world() if args.world == "default" else load_world(args.world)
        check_world_prompts(world, prompts, f"--world {args.world}", args.prompts)
    policy = load_causal_lm(args.policy, dtype=dtype, device=device, option_name="--policy")
    ref = (
        load_causal_lm(args.ref, dtype=dtype, device=device, option_name="--ref")
        if args.ref
        else None
    )
    reward_fn = load_reward(args.reward, device, dtype)
    evaluation = evaluate_policy(
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
    result = evaluation.to_dict()
    summary = {k: v for k, v in result.items() if k not in ("per_prompt", "examples", "pairs")}
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return 0
