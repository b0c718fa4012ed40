"""Preference collapse versus preference matching, end to end on a laptop CPU.

A synthetic preference world (question families with a majority answer and minority answers,
drawn from a hidden Bradley–Terry–Luce reward) is written as ordinary dataset files. Then the
usual pipeline runs on them: a tiny Llama is built locally, supervised-fine-tuned, a reward
model is trained on the annotators' rankings, and RL is run three times with the same budget
and seed — kl (β=0.1, the paper's baseline), pm (β=1) and cpm (β=1, threshold α). Each policy
is evaluated on held-out prompts, as are two offline policies trained by `pmrlhf dpo` on the
reward model's rankings from the SFT model, dpo (β=0.1) and cpm-dpo (β=1, with an SFT term):
answer distribution against the reward model's target softmax(r), minority mass, invalid rate,
mean reward and the paper's PMD.

Writes metrics.json, plots and report.md to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pmrlhf.config import add_config_arguments, config_from_args, option, to_dict
from pmrlhf.regularizers import PENALTY_ESTIMATORS
from pmrlhf.rl.advantages import ADVANTAGE_ESTIMATORS

if TYPE_CHECKING:
    from pmrlhf.evaluate import AlphaEvidence, Evaluation
    from pmrlhf.rl.rewards import RewardFn

METHODS = ("sft", "kl", "pm", "cpm", "dpo", "pm-dpo", "cpm-dpo")
DEFAULT_METHODS = ("sft", "kl", "pm", "cpm", "dpo", "cpm-dpo")
# offline rows: demo method -> the loss of `pmrlhf dpo` it trains with
OFFLINE_METHODS = {"dpo": "dpo", "pm-dpo": "pm", "cpm-dpo": "cpm"}


@dataclass
class DemoConfig:
    out: str = option(
        "runs/demo", help="output folder: data/, models, metrics.json, plots, report.md"
    )
    seed: int = option(0, help="seed for the world's data, model initialisation and sampling")
    # data
    n_sft: int = option(2000, help="SFT demonstrations (valid answers, near-uniform)")
    n_rankings: int = option(
        6000,
        help="annotator rankings drawn from the hidden Plackett–Luce model (fewer leave the reward "
        "model's softmax(r) less consistent across a question's wordings, docs/method.md §8)",
    )
    ranking_size: int = option(3, help="responses per ranking (K); 2 gives pairwise comparisons")
    # model and stages
    hidden_size: int = option(64, help="hidden size of the tiny Llama")
    num_layers: int = option(2, help="layers of the tiny Llama")
    sft_steps: int = option(
        300, help="SFT optimizer steps (short on purpose: the SFT model keeps some invalid outputs)"
    )
    sft_lr: float = option(3e-3, help="SFT learning rate")
    rm_steps: int = option(300, help="reward-model optimizer steps")
    rm_lr: float = option(2e-3, help="reward-model learning rate")
    # RL
    rl_algo: str = option(
        "rloo",
        help="RL algorithm for all three runs",
        choices=ADVANTAGE_ESTIMATORS,
    )
    rl_steps: int = option(300, help="RL steps per method (same budget for kl, pm and cpm)")
    penalty_estimator: str = option(
        "sampled",
        help="how the RL runs estimate the penalty's gradient: sampled or full (docs/method.md §8)",
        choices=list(PENALTY_ESTIMATORS),
    )
    rl_lr: float = option(1e-3, help="RL learning rate")
    prompts_per_step: int = option(8, help="prompts per RL step")
    samples_per_prompt: int = option(8, help="responses per prompt per RL step")
    kl_beta: float = option(0.1, help="β of the kl baseline (the paper's value)")
    pm_beta: float = option(1.0, help="β of pm (1 = exact preference matching)")
    cpm_beta: float = option(1.0, help="β of cpm")
    cpm_alpha: float = option(
        0.05,
        help="cpm threshold α: below the SFT model's probability of every valid-answer token, above that of its typical slips",
    )
    max_new_tokens: int = option(12, help="maximum response length")
    # offline (`pmrlhf dpo` on the reward model's rankings, from the SFT model)
    offline_steps: int = option(300, help="optimizer steps of each offline run (dpo, cpm-dpo)")
    offline_lr: float = option(1e-3, help="learning rate of the offline runs")
    dpo_beta: float = option(0.1, help="β of the offline dpo row")
    pm_dpo_beta: float = option(1.0, help="β of the offline pm-dpo row (1: preference matching)")
    cpm_dpo_beta: float = option(1.0, help="β of the offline cpm-dpo row (1: preference matching)")
    offline_sft_weight: float = option(
        0.5,
        help="sft_weight of the preference-matching offline rows (pm-dpo, cpm-dpo): NLL on each "
        "ranking's best response, which holds the probability of invalid text at the SFT level; "
        "the dpo row is plain DPO",
    )
    # evaluation
    eval_samples: int = option(1000, help="responses sampled per held-out prompt for evaluation")
    methods: list[str] = option(
        list(DEFAULT_METHODS),
        help="comma-separated methods to run (sft,kl,pm,cpm,dpo,cpm-dpo; also pm-dpo)",
    )
    threads: int = option(1, help="torch CPU threads (tiny models run fastest on one)")
    device: str = option(
        "auto",
        help="where every stage runs: auto (CUDA when a GPU is visible, else the CPU), cpu or "
        "cuda; all stages compute in fp32, so the numbers do not depend on a GPU's bf16",
    )
    quiet: bool = option(False, help="no progress bars")


def _log(message: str, quiet: bool) -> None:
    if not quiet:
        print(f"[demo] {message}", flush=True)


def run_demo(config: DemoConfig) -> dict[str, Any]:
    from pmrlhf.evaluate import alpha_evidence, evaluate_policy
    from pmrlhf.models import build_tiny_model, check_device, load_causal_lm, load_tokenizer
    from pmrlhf.rl.rewards import ModelReward
    from pmrlhf.runtime import read_jsonl, set_seed
    from pmrlhf.world import default_world

    device = torch.device(check_device(config.device))
    if device.type == "cpu":
        # the training stages place themselves through accelerate, which otherwise takes a GPU
        os.environ["ACCELERATE_USE_CPU"] = "true"
    for method in config.methods:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose from {list(METHODS)}")
    start = time.perf_counter()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    set_seed(config.seed)
    # Models this small run fastest on one thread, and do not slow down when the cores are shared.
    torch.set_num_threads(config.threads)

    world = default_world()
    files = world.write_files(
        out / "data",
        n_pairs=0,
        n_rankings=config.n_rankings,
        n_sft=config.n_sft,
        seed=config.seed,
        ranking_size=config.ranking_size,
    )
    _log(
        f"world: {len(world.train_prompts())} training and {len(world.eval_prompts())} held-out prompts",
        config.quiet,
    )

    base = build_tiny_model(
        out / "base",
        world.vocabulary(),
        seed=config.seed,
        hidden_size=config.hidden_size,
        num_layers=config.num_layers,
    )
    sft_dir = _train_sft(config, base, files["sft"], out / "sft")
    _log(f"SFT done ({time.perf_counter() - start:.0f} s)", config.quiet)
    rm_dir, rm_eval = _train_rm(config, sft_dir, files["rankings"], out / "rm")
    _log(
        f"reward model done: pairwise accuracy {rm_eval.get('pairwise_accuracy', float('nan')):.3f} "
        f"({time.perf_counter() - start:.0f} s)",
        config.quiet,
    )

    reward_fn = ModelReward(str(rm_dir), device, torch.float32, batch_size=256)
    tokenizer = load_tokenizer(str(sft_dir))
    ref = load_causal_lm(str(sft_dir), device=device).eval()
    eval_prompts = world.eval_prompts()
    alpha_check = alpha_evidence(
        ref, tokenizer, world, world.train_prompts(), config.cpm_alpha, config.max_new_tokens
    )
    _log(alpha_check.summary, config.quiet)
    policies = {"sft": sft_dir}
    histories: dict[str, list[dict[str, float]]] = {}
    for method in ("kl", "pm", "cpm"):
        if method not in config.methods:
            continue
        policies[method] = _train_rl(
            config, method, sft_dir, rm_dir, files["prompts_train"], out / method, reward_fn
        )
        histories[method] = read_jsonl(out / method / "metrics.jsonl")
        _log(f"RL {method} done ({time.perf_counter() - start:.0f} s)", config.quiet)
    for method in OFFLINE_METHODS:
        if method not in config.methods:
            continue
        policies[method] = _train_offline(config, method, sft_dir, files["rankings"], out / method)
        _log(f"offline {method} done ({time.perf_counter() - start:.0f} s)", config.quiet)

    results: dict[str, Evaluation] = {}
    for method, path in policies.items():
        if method not in config.methods:
            continue
        policy = load_causal_lm(str(path), device=device).eval()
        results[method] = evaluate_policy(
            policy,
            tokenizer,
            reward_fn,
            eval_prompts,
            n_samples=config.eval_samples,
            max_new_tokens=config.max_new_tokens,
            ref=ref,
            world=world,
            seed=config.seed + 1,
        )
    seconds = time.perf_counter() - start
    summary = _write_outputs(config, out, results, histories, rm_eval, seconds, alpha_check)
    _log(f"done in {seconds:.0f} s; report: {out / 'report.md'}", config.quiet)
    return summary


def _stage_settings(config: DemoConfig, out: Path) -> dict[str, Any]:
    """Settings the demo's SFT and reward-model stages share: small batches, silent, fp32; the
    demo owns its output folder, so a rerun replaces the stage's earlier run."""
    return dict(output_dir=str(out), batch_size=32, max_length=64, seed=config.seed,
                eval_before=False, quiet=True, dtype="fp32", overwrite=True)  # fmt: skip


def _train_sft(config: DemoConfig, base: Path, data: Path, out: Path) -> Path:
    from pmrlhf.sft import SFTConfig, train_sft

    result = train_sft(
        SFTConfig(
            model=str(base), data=str(data), max_steps=config.sft_steps, lr=config.sft_lr,
            lr_schedule="constant", eval_fraction=0.05, **_stage_settings(config, out),
        )
    )  # fmt: skip
    return Path(result["model_dir"])


def _train_rm(
    config: DemoConfig, sft_dir: Path, data: Path, out: Path
) -> tuple[Path, dict[str, Any]]:
    from pmrlhf.reward import RMConfig, train_reward_model

    result = train_reward_model(
        RMConfig(
            model=str(sft_dir), data=str(data), max_steps=config.rm_steps, lr=config.rm_lr,
            lr_schedule="linear", eval_fraction=0.1, **_stage_settings(config, out),
        )
    )  # fmt: skip
    return Path(result["model_dir"]), result.get("eval", {})


def _train_offline(config: DemoConfig, method: str, sft_dir: Path, data: Path, out: Path) -> Path:
    """An offline row: `pmrlhf dpo` from the SFT model on the reward model's rankings (the same
    rows and hold-out as the reward model)."""
    from pmrlhf.offline import OfflineConfig, train_offline

    betas = {"dpo": config.dpo_beta, "pm-dpo": config.pm_dpo_beta, "cpm-dpo": config.cpm_dpo_beta}
    beta = betas[method]
    sft_weight = 0.0 if method == "dpo" else config.offline_sft_weight
    result = train_offline(
        OfflineConfig(
            model=str(sft_dir), data=str(data), loss=OFFLINE_METHODS[method], beta=beta,
            alpha=config.cpm_alpha, sft_weight=sft_weight,
            max_steps=config.offline_steps, lr=config.offline_lr, lr_schedule="linear",
            eval_fraction=0.1, **_stage_settings(config, out),
        )
    )  # fmt: skip
    return Path(result["model_dir"])


def _train_rl(
    config: DemoConfig,
    method: str,
    sft_dir: Path,
    rm_dir: Path,
    prompts: Path,
    out: Path,
    reward_fn: RewardFn,
) -> Path:
    from pmrlhf.data import load_prompts
    from pmrlhf.rl.config import RLConfig
    from pmrlhf.rl.trainer import RLTrainer

    beta = {"kl": config.kl_beta, "pm": config.pm_beta, "cpm": config.cpm_beta}[method]
    rl_config = RLConfig(
        policy=str(sft_dir),
        reward=str(rm_dir),
        prompts=str(prompts),
        algo=config.rl_algo,
        regularizer=method,
        beta=beta,
        alpha=config.cpm_alpha,
        max_steps=config.rl_steps,
        penalty_estimator=config.penalty_estimator,
        prompts_per_step=config.prompts_per_step,
        samples_per_prompt=config.samples_per_prompt,
        max_new_tokens=config.max_new_tokens,
        lr=config.rl_lr,
        critic_lr=config.rl_lr,
        lr_schedule="linear",
        seed=config.seed,
        output_dir=str(out),
        overwrite=True,
        quiet=config.quiet,
        dtype="fp32",
    )
    prompt_texts = [r.prompt for r in load_prompts(str(prompts))]
    RLTrainer(rl_config, reward_fn=reward_fn, prompts=prompt_texts).train(print_summary=False)
    return out / "policy"


def _write_outputs(
    config: DemoConfig,
    out: Path,
    results: dict[str, Evaluation],
    histories: dict[str, list[dict[str, float]]],
    rm_eval: dict[str, Any],
    seconds: float,
    alpha_check: AlphaEvidence,
) -> dict[str, Any]:
    from pmrlhf import __version__
    from pmrlhf.metrics import pmd_improvement
    from pmrlhf.report import DemoResults, write_report

    keys = (
        "tv_to_target",
        "tv_to_truth",
        "tv_valid",
        "minority_mass",
        "minority_share_valid",
        "target_minority_mass",
        "invalid_rate",
        "pmd",
        "mean_reward",
        "kl_to_ref",
        "entropy",
        "distinct_1",
        "distinct_2",
    )
    methods: dict[str, dict[str, Any]] = {}
    for m, r in results.items():
        methods[m] = {k: float(r.metrics[k]) for k in keys if k in r.metrics}
        methods[m]["pmd_untruncated"] = float(r.metrics["pmd_untruncated"])
        if r.world is not None and r.world.exact is not None:
            methods[m]["exact"] = r.world.exact
            methods[m]["tv_valid_from_exact"] = r.world.tv_valid_from_exact
    improvement = {}
    if "kl" in methods:
        for m in ("pm", "cpm"):
            if m in methods:
                improvement[m] = pmd_improvement(methods["kl"]["pmd"], methods[m]["pmd"])
    if "dpo" in methods:
        for m in OFFLINE_METHODS:
            if m != "dpo" and m in methods:
                improvement[f"{m} over dpo"] = pmd_improvement(
                    methods["dpo"]["pmd"], methods[m]["pmd"]
                )
    per_prompt = {m: r.world.per_prompt for m, r in results.items() if r.world is not None}
    summary = {
        "methods": methods,
        "pmd_improvement": improvement,
        "seconds": seconds,
        "version": __version__,
        "config": to_dict(config),
        "cpm_alpha_check": alpha_check.to_dict(),
        "reward_model_eval": {k: v for k, v in rm_eval.items() if not isinstance(v, (list, dict))},
        "per_prompt": {m: [row.to_dict() for row in rows] for m, rows in per_prompt.items()},
        "examples": {m: r.examples for m, r in results.items()},
    }
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    report = DemoResults(
        methods=methods,
        pmd_improvement=improvement,
        seconds=seconds,
        version=__version__,
        alpha_summary=alpha_check.summary,
        seed=config.seed,
        rl_algo=config.rl_algo,
        rl_steps=config.rl_steps,
        prompts_per_step=config.prompts_per_step,
        samples_per_prompt=config.samples_per_prompt,
        eval_samples=config.eval_samples,
        kl_beta=config.kl_beta,
        pm_beta=config.pm_beta,
        cpm_beta=config.cpm_beta,
        cpm_alpha=config.cpm_alpha,
        dpo_beta=config.dpo_beta,
        offline_beta=config.cpm_dpo_beta if "cpm-dpo" in methods else config.pm_dpo_beta,
        offline_steps=config.offline_steps,
        offline_sft_weight=config.offline_sft_weight,
    )
    table = write_report(report, per_prompt, histories, out)
    if not config.quiet:
        print(table)
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, DemoConfig)


def run(args: argparse.Namespace) -> int:
    import logging

    from pmrlhf.training import quiet_transformers

    config = config_from_args(DemoConfig, args)
    # The demo saves and reloads many tiny checkpoints: keep the console to the demo's own lines.
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    with quiet_transformers(True):
        run_demo(config)
    return 0
