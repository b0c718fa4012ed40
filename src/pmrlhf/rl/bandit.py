"""A one-step bandit trained by the RL engine, checked against its closed-form optimum.

Each prompt is answered by one token out of K. A tiny causal LM is first fitted so that its
next-token distribution equals ``--ref`` (the reference model), then trained from there by the
same RL trainer that fine-tunes real models, with rewards looked up in ``--rewards``. At the end
the learned distribution is compared with the regulariser's own closed-form optimum
(``Regularizer.optimal_policy``), for example:

    pm   softmax(r/β)
    kl   π_ref · exp(r/β) / Z
    cpm  exp(r/β) · π_ref^[π_ref ≤ α] / Z     (docs/method.md §4, one-token responses)

Any registered regulariser can be trained and checked (``--regularizer NAME``).

Rows of ``--rewards`` and ``--ref`` are separated by ';' (one row per prompt).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pmrlhf.metrics import total_variation
from pmrlhf.regularizers import PENALTY_ESTIMATORS, REGULARIZERS, make_regularizer
from pmrlhf.rl.advantages import ADVANTAGE_ESTIMATORS
from pmrlhf.rl.config import RLConfig

# Budgets found to converge to TV ≤ 0.03 for every algorithm × regulariser (see tests).
DEFAULT_STEPS = 300
DEFAULT_LR = 3e-3


@dataclass
class BanditProblem:
    rewards: torch.Tensor  # (M, K)
    ref: torch.Tensor  # (M, K), rows sum to 1

    @property
    def prompts(self) -> list[str]:
        return [f"question{i}" for i in range(self.rewards.shape[0])]

    @property
    def answers(self) -> list[str]:
        return [f"answer{k}" for k in range(self.rewards.shape[1])]

    def reward_fn(self, prompts: list[str], completions: list[str]) -> list[float]:
        rows = {p: i for i, p in enumerate(self.prompts)}
        cols = {a: k for k, a in enumerate(self.answers)}
        return [
            float(self.rewards[rows[p], cols[c.strip()]])
            for p, c in zip(prompts, completions, strict=True)
        ]


@dataclass
class BanditResult:
    learned: torch.Tensor
    optimum: torch.Tensor
    reference: torch.Tensor
    tv: torch.Tensor
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "learned": self.learned.tolist(),
            "optimum": self.optimum.tolist(),
            "reference": self.reference.tolist(),
            "tv_per_prompt": self.tv.tolist(),
            "tv_max": float(self.tv.max()),
            **self.extra,
        }


def parse_table(text: str, what: str) -> torch.Tensor:
    try:
        rows = [
            [float(v) for v in row.split(",") if v.strip()]
            for row in text.split(";")
            if row.strip()
        ]
    except ValueError:
        raise ValueError(
            f"{what}: expected numbers separated by ',' (and rows by ';'), got {text!r}"
        ) from None
    if not rows or len({len(r) for r in rows}) != 1:
        raise ValueError(f"{what}: every row needs the same number of values, got {text!r}")
    return torch.tensor(rows, dtype=torch.float64)


def make_problem(rewards: str, ref: str | None) -> BanditProblem:
    reward_table = parse_table(rewards, "--rewards")
    if reward_table.shape[1] < 2:
        raise ValueError("--rewards needs at least two answers per prompt")
    if ref is None:
        ref_table = torch.full_like(reward_table, 1.0 / reward_table.shape[1])
    else:
        ref_table = parse_table(ref, "--ref")
        if ref_table.shape[0] == 1:
            ref_table = ref_table.expand(reward_table.shape[0], -1).clone()
        if ref_table.shape != reward_table.shape:
            raise ValueError(
                f"--ref has shape {tuple(ref_table.shape)} but --rewards has {tuple(reward_table.shape)}"
            )
        if (ref_table <= 0).any():
            raise ValueError("--ref probabilities must all be > 0")
        ref_table = ref_table / ref_table.sum(-1, keepdim=True)
    return BanditProblem(reward_table, ref_table)


def _answer_ids(tokenizer, problem: BanditProblem) -> list[int]:
    ids = tokenizer.convert_tokens_to_ids(problem.answers)
    assert tokenizer.unk_token_id not in ids
    return ids


@torch.no_grad()
def answer_distribution(model, tokenizer, problem: BanditProblem) -> torch.Tensor:
    """The model's exact next-token distribution over the K answers, one row per prompt."""
    from pmrlhf.rl.rollout import restrict_logits

    ids = _answer_ids(tokenizer, problem)
    encoded = tokenizer(problem.prompts, return_tensors="pt", padding=True).to(
        next(model.parameters()).device
    )
    logits = model(**encoded).logits[:, -1].float()
    logits = restrict_logits(logits, torch.tensor(ids, device=logits.device))
    return torch.softmax(logits, -1)[:, ids].double().cpu()


def fit_reference(folder: Path, problem: BanditProblem, steps: int = 400, seed: int = 0) -> float:
    """Fit the tiny LM in ``folder`` so its answer distribution equals ``problem.ref``; save it."""
    from pmrlhf.models import load_causal_lm, load_tokenizer
    from pmrlhf.rl.rollout import restrict_logits

    torch.manual_seed(seed)
    tokenizer = load_tokenizer(str(folder))
    model = load_causal_lm(str(folder))
    ids = torch.tensor(_answer_ids(tokenizer, problem))
    encoded = tokenizer(problem.prompts, return_tensors="pt", padding=True)
    target = problem.ref.float()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        logits = restrict_logits(model(**encoded).logits[:, -1], ids)[:, ids]
        loss = torch.nn.functional.kl_div(
            torch.log_softmax(logits, -1), target, reduction="batchmean"
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(folder)
    return float(loss.detach())


def closed_form(
    problem: BanditProblem, reference: torch.Tensor, regularizer: str, beta: float, alpha: float
) -> torch.Tensor:
    """The registered regulariser's optimum for one-token responses with ``reference`` as π_ref."""
    return make_regularizer(regularizer, beta, alpha).optimal_policy(
        problem.rewards, reference.unsqueeze(-1)
    )


def run_bandit(
    problem: BanditProblem,
    regularizer: str = "pm",
    algo: str = "rloo",
    beta: float = 1.0,
    alpha: float = 0.3,
    max_steps: int = DEFAULT_STEPS,
    lr: float = DEFAULT_LR,
    samples_per_prompt: int = 16,
    seed: int = 0,
    work_dir: str | Path | None = None,
    quiet: bool = True,
    penalty_estimator: str = "sampled",
    tv_threshold: float | None = None,
) -> BanditResult:
    """Build, fit and train the bandit; return the learned vs closed-form distributions.

    With ``tv_threshold``, the max TV to the optimum is measured after every step, and
    ``extra["steps_to_tv"]`` is the first step at which it is ≤ the threshold (None if never),
    ``extra["tv_history"]`` the whole curve.
    """
    from pmrlhf.models import build_tiny_model, load_tokenizer
    from pmrlhf.rl.trainer import RLTrainer

    own_dir = work_dir is None
    base = Path(tempfile.mkdtemp(prefix="pmrlhf-bandit-")) if own_dir else Path(work_dir)  # type: ignore[arg-type]
    model_dir = build_tiny_model(
        base / "reference",
        problem.prompts + problem.answers,
        seed=seed,
        hidden_size=32,
        num_layers=1,
        num_heads=2,
    )
    fit_reference(model_dir, problem, seed=seed)
    config = RLConfig(
        policy=str(model_dir),
        algo=algo,
        regularizer=regularizer,
        beta=beta,
        alpha=alpha,
        max_steps=max_steps,
        prompts_per_step=len(problem.prompts) * 2,
        samples_per_prompt=samples_per_prompt,
        max_new_tokens=1,
        lr=lr,
        critic_lr=lr * 3,
        lr_schedule="linear",
        max_grad_norm=0.0,
        seed=seed,
        output_dir=str(base / "run"),
        quiet=quiet,
        critic_init="policy",
        penalty_estimator=penalty_estimator,
    )
    answer_ids = _answer_ids(load_tokenizer(str(model_dir)), problem)
    trainer = RLTrainer(
        config, reward_fn=problem.reward_fn, prompts=problem.prompts, allowed_token_ids=answer_ids
    )
    reference = answer_distribution(
        trainer.accelerator.unwrap_model(trainer.policy), trainer.tokenizer, problem
    )
    tv_history: list[float] = []
    on_step = None
    if tv_threshold is not None:
        optimum_now = closed_form(problem, reference, regularizer, beta, alpha)

        def on_step(trainer: RLTrainer, metrics: dict[str, float]) -> None:
            model = trainer.accelerator.unwrap_model(trainer.policy)
            now = answer_distribution(model, trainer.tokenizer, problem)
            tv_history.append(float(total_variation(now, optimum_now).max()))

    summary = trainer.train(on_step=on_step)
    learned = answer_distribution(
        trainer.accelerator.unwrap_model(trainer.policy), trainer.tokenizer, problem
    )
    optimum = closed_form(problem, reference, regularizer, beta, alpha)
    tv = total_variation(learned, optimum)
    extra = {
        "regularizer": regularizer,
        "algo": algo,
        "beta": beta,
        "alpha": getattr(trainer.regularizer, "alpha", None),
        "max_steps": max_steps,
        "penalty_estimator": penalty_estimator,
        "seconds": summary["seconds"],
    }
    if tv_threshold is not None:
        hits = [i + 1 for i, tv_now in enumerate(tv_history) if tv_now <= tv_threshold]
        extra["tv_threshold"] = tv_threshold
        extra["steps_to_tv"] = hits[0] if hits else None
        extra["tv_history"] = tv_history
    if own_dir:
        import shutil

        shutil.rmtree(base, ignore_errors=True)
    return BanditResult(learned, optimum, reference, tv, extra)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--rewards",
        default="1,0.5,0",
        help="reward table: answers by ',', prompts by ';' (default: 1,0.5,0)",
    )
    parser.add_argument(
        "--ref", default=None, help="reference distribution(s), same layout (default: uniform)"
    )
    parser.add_argument(
        "--regularizer", default="pm", choices=REGULARIZERS, help="regulariser (default: pm)"
    )
    parser.add_argument(
        "--algo", default="rloo", choices=ADVANTAGE_ESTIMATORS, help="algorithm (default: rloo)"
    )
    parser.add_argument(
        "--beta", type=float, default=1.0, help="regularisation strength β (default: 1)"
    )
    parser.add_argument("--alpha", type=float, default=0.3, help="cpm threshold α (default: 0.3)")
    parser.add_argument(
        "--max-steps",
        "--steps",
        dest="max_steps",
        type=int,
        default=DEFAULT_STEPS,
        help=f"RL steps (default: {DEFAULT_STEPS})",
    )
    parser.add_argument(
        "--lr", type=float, default=DEFAULT_LR, help=f"learning rate (default: {DEFAULT_LR})"
    )
    parser.add_argument(
        "--samples-per-prompt",
        type=int,
        default=16,
        help="samples per prompt and step (default: 16)",
    )
    parser.add_argument(
        "--penalty-estimator",
        default="sampled",
        choices=PENALTY_ESTIMATORS,
        help="sampled (the paper's) or full (exact per-state expectation, docs/method.md §8)",
    )
    parser.add_argument(
        "--tv-threshold",
        type=float,
        default=None,
        help="also report the first step at which the max TV to the optimum is ≤ this",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument(
        "--out", type=Path, default=None, help="keep the models and metrics in this folder"
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--progress", action="store_true", help="show the training progress bar")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default: 1, fastest for tiny models)",
    )


def run(args: argparse.Namespace) -> int:
    from pmrlhf.training import quiet_transformers

    problem = make_problem(args.rewards, args.ref)
    torch.set_num_threads(args.threads)
    with quiet_transformers(not args.progress):
        result = _run(args, problem)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
        return 0
    _print_result(args, problem, result)
    return 0


def _run(args: argparse.Namespace, problem: BanditProblem) -> BanditResult:
    return run_bandit(
        problem,
        regularizer=args.regularizer,
        algo=args.algo,
        beta=args.beta,
        alpha=args.alpha,
        max_steps=args.max_steps,
        lr=args.lr,
        samples_per_prompt=args.samples_per_prompt,
        seed=args.seed,
        work_dir=args.out,
        quiet=not args.progress,
        penalty_estimator=args.penalty_estimator,
        tv_threshold=args.tv_threshold,
    )


def _print_result(args: argparse.Namespace, problem: BanditProblem, result: BanditResult) -> None:
    print(
        f"{args.algo} / {args.regularizer}  β={args.beta}"
        + (f"  α={args.alpha}" if result.extra["alpha"] is not None else "")
    )

    def fmt(table: torch.Tensor, row: int) -> str:
        return " ".join(f"{v:.3f}" for v in table[row].tolist())

    for i in range(problem.rewards.shape[0]):
        print(f"prompt {i}: reward    {fmt(problem.rewards, i)}")
        print(f"          reference {fmt(result.reference, i)}")
        print(f"          optimum   {fmt(result.optimum, i)}")
        print(f"          learned   {fmt(result.learned, i)}   TV {float(result.tv[i]):.4f}")
    print(
        f"max TV to the closed-form optimum: {float(result.tv.max()):.4f}  ({result.extra['seconds']:.1f} s)"
    )
    if "steps_to_tv" in result.extra:
        print(f"first step with max TV ≤ {args.tv_threshold}: {result.extra['steps_to_tv']}")
