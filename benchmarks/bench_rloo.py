#!/usr/bin/env python
"""RLOO step throughput: pmrlhf's RL engine against TRL's ``RLOOTrainer``, in one process.

    .venv/bin/python benchmarks/bench_rloo.py                               # CPU, ~3M-param Llama
    .venv/bin/python benchmarks/bench_rloo.py --device cuda --preset gpu-1b # GPU, ~1B-param Llama

Both sides train the same random-weight Llama folder (written once by this script) with the same
word tokenizer, prompt pool, reward function, batch (prompts × samples per prompt), generation
length (EOS disabled, so every completion has exactly ``new_tokens`` tokens), learning rate,
gradient clip, KL coefficient β and one optimisation pass per batch.

TRL drives the loop: ``RLOOTrainer.train()`` runs ``warmup + steps`` steps, and a callback runs one
pmrlhf ``kl`` step and one pmrlhf ``pm`` step (alternating their order) at every TRL step
boundary, so the three sides are measured in lock-step on the same machine state. A TRL step is
timed from the end of that callback to the start of the next one, which is everything TRL does for
a step (data fetch, generation, old/ref log-probs, reward, loss, backward, clip, optimizer,
scheduler, callbacks). A pmrlhf step is one ``RLTrainer.train_step()``. The first ``warmup`` steps
of every side are dropped; set-up (model building, loading, trainer construction) is never timed.

Prints one JSON object (also written to ``--json`` if given). Every pmrlhf side reports where its
step time goes (generate, reward, reference, policy forward, backward, optimizer), read from the
``time_*`` metrics that ``RLTrainer.train_step()`` records itself. ``--profile`` adds that breakdown
for the kl side under ``profile`` and prints a cProfile of one more step to stderr. ``--dry-run``
checks the arguments, prints the resolved plan (with the exact parameter count) and exits.

Every pmrlhf side is also measured against its compute floor (``benchmarks/flops.py``): the
matmul FLOPs of its step, counted from the model's shape and the batch, divided by the peak
``torch.mm`` rate of this machine, timed in the same process with the same threads, device and
dtype (before and after the steps; the higher rate counts). Each side reports
``flops_per_step`` (per phase), ``floor_seconds``, ``step_over_floor`` (its median step time ÷
its floor) and, per phase, ``phase_floor_seconds`` and ``phase_over_floor``; ``floor`` holds
the peak rate and ``trl_over_floor``, TRL's step time ÷ each side's floor: the highest speed-up
over TRL that arithmetic allows. A short human-readable summary goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import os
import platform
import pstats
import random
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("WANDB_DISABLED", "true")

ROOT = Path(__file__).resolve().parents[1]
if (ROOT / "src" / "pmrlhf").is_dir() and str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from flops import ModelShape, measure_peak_matmul, peak_shapes, rl_step_flops  # noqa: E402

REWARD_WORD = "good"
SPECIAL_TOKENS = 4  # <pad> <s> </s> <unk>, first in every pmrlhf word tokenizer

# Model shapes and batch of each preset. intermediate == 2 * hidden and kv_heads == heads is what
# pmrlhf.models.build_tiny_model writes; other shapes go through tiny_llama_config overrides.
PRESETS: dict[str, dict[str, Any]] = {
    "cpu-3m": dict(
        device="cpu",
        dtype="fp32",
        hidden=256,
        layers=4,
        heads=4,
        kv_heads=4,
        intermediate=512,
        vocab=2048,
        prompts_per_step=8,
        samples_per_prompt=4,
        prompt_tokens=16,
        new_tokens=32,
        warmup=2,
        steps=16,
        goal_ratio=1.5,
        goal_floor=1.2,
        goal_seconds=None,
    ),
    "cpu-tiny": dict(
        device="cpu",
        dtype="fp32",
        hidden=64,
        layers=2,
        heads=4,
        kv_heads=4,
        intermediate=128,
        vocab=2048,
        prompts_per_step=8,
        samples_per_prompt=4,
        prompt_tokens=16,
        new_tokens=32,
        warmup=2,
        steps=16,
        goal_ratio=1.5,
        goal_floor=1.2,
        goal_seconds=None,
    ),
    # Llama-3.2-1B's body (hidden 2048, 16 layers, 32 heads, 8 KV heads, MLP 8192) with a 32k
    # vocabulary and tied embeddings: 1.04B parameters.
    "gpu-1b": dict(
        device="cuda",
        dtype="bf16",
        hidden=2048,
        layers=16,
        heads=32,
        kv_heads=8,
        intermediate=8192,
        vocab=32000,
        prompts_per_step=16,
        samples_per_prompt=4,
        prompt_tokens=16,
        new_tokens=128,
        warmup=3,
        steps=8,
        goal_ratio=None,
        goal_floor=None,
        goal_seconds=1.0,
    ),
}
#: a preset's goals: pmrlhf-kl / TRL at least, pmrlhf-kl step / its compute floor at most, and
#: pmrlhf-kl seconds per step at most
GOAL_KEYS = ("goal_ratio", "goal_floor", "goal_seconds")
SHAPE_KEYS = ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab")
TRL_REFERENCE = {
    "gpu-1b": "TRL 1.16 RLOOTrainer, 1.07B model, 64 completions x 128 tokens, H100: 5.3 s/step"
}


def count_word(prompts, completions, **kwargs):
    """The reward of both sides: how often the word ``good`` occurs in the completion."""
    return [float(text.split().count(REWARD_WORD)) for text in completions]


# ---------------------------------------------------------------------------------- arguments
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu-3m")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: the preset's device")
    p.add_argument("--dtype", choices=["fp32", "bf16"], help="default: the preset's dtype")
    p.add_argument("--steps", type=int, help="timed steps per side (default: preset)")
    p.add_argument("--warmup", type=int, help="untimed warm-up steps per side (default: preset)")
    p.add_argument("--prompts-per-step", type=int)
    p.add_argument("--samples-per-prompt", type=int)
    p.add_argument("--prompt-tokens", type=int, help="words per prompt (all prompts equally long)")
    p.add_argument("--new-tokens", type=int, help="exact completion length (EOS disabled)")
    for key in SHAPE_KEYS:
        p.add_argument(f"--{key.replace('_', '-')}", type=int, help="override the preset's model")
    p.add_argument("--lr", type=float, default=1e-5, help="learning rate of both sides")
    p.add_argument("--beta", type=float, default=0.05, help="KL β (TRL beta = pmrlhf kl/pm beta)")
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--num-prompts", type=int, default=64, help="size of the prompt pool")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument(
        "--sides",
        default="trl,kl,pm",
        help="comma list of trl, kl, pm (trl drives the loop; without it a plain loop is used)",
    )
    p.add_argument(
        "--penalty-estimator",
        choices=["sampled", "full", "both"],
        default="sampled",
        help="pmrlhf's penalty estimator (docs/method.md §8); 'both' runs every pmrlhf side "
        "twice, sampled and full (the '_full' sides), in lock-step, and reports their ratio",
    )
    p.add_argument(
        "--trl-gradient-checkpointing",
        action="store_true",
        help="keep TRL's default gradient checkpointing (off by default: pmrlhf does not checkpoint)",
    )
    p.add_argument("--model-dir", type=Path, help="reuse/write the model folder here")
    p.add_argument("--json", type=Path, help="also write the result JSON to this file")
    p.add_argument(
        "--profile",
        action="store_true",
        help="phase breakdown of the pmrlhf kl side, and a cProfile of one more step",
    )
    p.add_argument("--dry-run", action="store_true", help="check arguments, print the plan, exit")
    args = p.parse_args(argv)

    preset = PRESETS[args.preset]
    overridden = [k for k in SHAPE_KEYS if getattr(args, k) is not None]
    for key, value in preset.items():
        if getattr(args, key, None) is None and key not in GOAL_KEYS:
            setattr(args, key, value)
    for key in GOAL_KEYS:
        setattr(args, key, preset[key])
    args.sides = [s.strip() for s in args.sides.split(",") if s.strip()]

    bad = [s for s in args.sides if s not in ("trl", "kl", "pm")]
    if bad or not args.sides:
        p.error(f"--sides: unknown side(s) {bad}; choose from trl, kl, pm")
    for name in (
        "steps",
        "prompts_per_step",
        "prompt_tokens",
        "new_tokens",
        "num_prompts",
        *SHAPE_KEYS,
    ):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 1:
        p.error("--warmup must be >= 1 (the first step of every side pays one-off costs)")
    if args.samples_per_prompt < 2:
        p.error("--samples-per-prompt must be >= 2 (RLOO needs a leave-one-out baseline)")
    if args.num_prompts < args.prompts_per_step:
        p.error("--num-prompts must be >= --prompts-per-step")
    if args.hidden % args.heads or args.heads % args.kv_heads:
        p.error("--hidden must be divisible by --heads, and --heads by --kv-heads")
    if args.vocab < SPECIAL_TOKENS + 2:
        p.error(f"--vocab must be >= {SPECIAL_TOKENS + 2}")
    if args.beta <= 0:
        p.error("--beta must be > 0 (TRL skips the reference model at beta = 0)")
    if args.lr <= 0:
        p.error("--lr must be > 0")
    if args.preset == "gpu-1b" and args.device == "cpu" and not overridden:
        p.error(
            "--preset gpu-1b is a ~1B-parameter model; run it with --device cuda "
            "(or shrink it with --hidden/--layers/... for a CPU smoke test)"
        )
    if args.dtype == "bf16" and args.device == "cpu" and args.preset != "gpu-1b":
        warnings.warn("bf16 on CPU is slow and not what the CPU presets measure", stacklevel=1)
    if not args.dry_run:
        import torch

        if args.device == "cuda" and not torch.cuda.is_available():
            p.error(
                "--device cuda: no CUDA device is visible to torch (use --dry-run to check args)"
            )
        if args.dtype == "bf16" and args.device == "cuda" and not torch.cuda.is_bf16_supported():
            p.error("--dtype bf16: this GPU does not support bf16")
    return args


# ---------------------------------------------------------------------------------- the model
def vocabulary(vocab: int) -> list[str]:
    """The non-special words: the reward word plus fillers, so the tokenizer has ``vocab`` ids."""
    n = vocab - SPECIAL_TOKENS - 1
    width = len(str(max(n - 1, 0)))
    return [REWARD_WORD] + [f"w{i:0{width}d}" for i in range(n)]


def make_prompts(args: argparse.Namespace) -> list[str]:
    rng = random.Random(args.seed)
    words = vocabulary(args.vocab)
    return [" ".join(rng.choices(words, k=args.prompt_tokens)) for _ in range(args.num_prompts)]


def uses_build_tiny_model(args: argparse.Namespace) -> bool:
    return args.intermediate == 2 * args.hidden and args.kv_heads == args.heads


def llama_config(args: argparse.Namespace):
    from pmrlhf.models import tiny_llama_config

    return tiny_llama_config(
        args.vocab,
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=args.heads,
        max_positions=max(256, args.prompt_tokens + args.new_tokens),
        intermediate_size=args.intermediate,
        num_key_value_heads=args.kv_heads,
    )


def parameter_count(args: argparse.Namespace) -> int:
    """Exact parameter count, from a model built on the meta device (no memory, no init)."""
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config(args))
    return sum(p.numel() for p in model.parameters())


def build_model(args: argparse.Namespace, out: Path) -> Path:
    """Write the random-weight Llama + word tokenizer both sides load (pmrlhf.models builders)."""
    import torch

    from pmrlhf.models import build_tiny_model, build_word_tokenizer

    words = vocabulary(args.vocab)
    if uses_build_tiny_model(args) and args.prompt_tokens + args.new_tokens <= 256:
        build_tiny_model(
            out,
            [REWARD_WORD],
            seed=args.seed,
            hidden_size=args.hidden,
            num_layers=args.layers,
            num_heads=args.heads,
            extra_tokens=words[1:],
        )
    else:
        from transformers import LlamaForCausalLM

        tokenizer = build_word_tokenizer([REWARD_WORD], words[1:])
        assert len(tokenizer) == args.vocab, (len(tokenizer), args.vocab)
        torch.manual_seed(args.seed)
        init_device = "cuda" if args.device == "cuda" else "cpu"
        with torch.device(init_device):
            model = LlamaForCausalLM(llama_config(args))
        model.to(torch_dtype(args.dtype))
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.bos_token_id = tokenizer.bos_token_id
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        del model
        if args.device == "cuda":
            torch.cuda.empty_cache()
    return out


def check_model_dir(args: argparse.Namespace, model_dir: Path) -> None:
    """A reused --model-dir must hold the model the arguments describe."""
    saved = json.loads((model_dir / "config.json").read_text())
    expected = {
        "hidden_size": args.hidden,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads,
        "intermediate_size": args.intermediate,
        "vocab_size": args.vocab,
    }
    wrong = {k: (saved.get(k), v) for k, v in expected.items() if saved.get(k) != v}
    if wrong:
        raise SystemExit(f"--model-dir {model_dir} holds another model (saved, wanted): {wrong}")


def torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


# ---------------------------------------------------------------------------------- timing
def synchronize(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def now(device: str) -> float:
    synchronize(device)
    return time.perf_counter()


def make_pmrlhf(
    args: argparse.Namespace,
    model_dir: Path,
    regularizer: str,
    out: Path,
    penalty_estimator: str = "sampled",
):
    from accelerate import Accelerator

    from pmrlhf.rl.config import RLConfig
    from pmrlhf.rl.trainer import RLTrainer

    config = RLConfig(
        policy=str(model_dir),
        algo="rloo",
        regularizer=regularizer,
        beta=args.beta,
        penalty_estimator=penalty_estimator,
        max_steps=10**9,  # the constant schedule ignores it; train_step() is driven from here
        prompts_per_step=args.prompts_per_step,
        samples_per_prompt=args.samples_per_prompt,
        ppo_epochs=1,
        minibatches=1,
        max_new_tokens=args.new_tokens,
        min_new_tokens=args.new_tokens,
        lr=args.lr,
        max_grad_norm=args.max_grad_norm,
        lr_schedule="constant",
        dtype=args.dtype,
        seed=args.seed,
        output_dir=str(out),
        quiet=True,
    )
    from pmrlhf.optim import mixed_precision

    # the same precision as the config asks for: an Accelerator built without it runs fp32
    accelerator = Accelerator(cpu=args.device == "cpu", mixed_precision=mixed_precision(args.dtype))
    return RLTrainer(
        config, reward_fn=count_word, prompts=make_prompts(args), accelerator=accelerator
    )


class PmrlhfSide:
    """One pmrlhf RLTrainer plus its per-step times, phase times and a length check."""

    def __init__(self, name: str, trainer, args: argparse.Namespace):
        self.name = name
        self.trainer = trainer
        self.args = args
        self.times: list[float] = []
        self.lengths: list[float] = []
        self.phases: list[dict[str, float]] = []

    def step(self) -> None:
        device = self.args.device
        start = now(device)
        metrics = self.trainer.train_step()
        self.times.append(now(device) - start)
        # mean length == new_tokens with every length <= new_tokens means all are exactly it
        self.lengths.append(metrics["response_length"])
        # the trainer times its own phases (synchronising CUDA) and logs them as time_<phase>
        phases = {k[len("time_") :]: v for k, v in metrics.items() if k.startswith("time_")}
        phases["total"] = metrics["step_seconds"]
        self.phases.append(phases)


def make_trl(args: argparse.Namespace, model_dir: Path, out: Path, callbacks: list):
    import torch
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import RLOOConfig, RLOOTrainer

    from pmrlhf.models import load_tokenizer

    bf16 = args.dtype == "bf16"
    config = RLOOConfig(
        output_dir=str(out),
        report_to="none",
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        use_cpu=args.device == "cpu",
        bf16=bf16,
        fp16=False,
        gradient_checkpointing=args.trl_gradient_checkpointing,
        model_init_kwargs={"dtype": torch.bfloat16 if bf16 else torch.float32},
        per_device_train_batch_size=args.prompts_per_step * args.samples_per_prompt,
        gradient_accumulation_steps=1,
        num_generations=args.samples_per_prompt,
        num_iterations=1,
        max_completion_length=args.new_tokens,
        generation_kwargs={"min_new_tokens": args.new_tokens},  # EOS can never end a completion
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=args.max_grad_norm,
        beta=args.beta,
        max_steps=args.warmup + args.steps,
        seed=args.seed,
        dataloader_num_workers=0,
    )
    tokenizer = load_tokenizer(str(model_dir), padding_side="left")
    dataset = Dataset.from_dict({"prompt": make_prompts(args)})
    trainer = RLOOTrainer(
        model=str(model_dir),
        reward_funcs=count_word,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    # disable_tqdm swaps the progress bar for a printer of the final log; keep stdout JSON-only
    trainer.remove_callback(PrinterCallback)
    return trainer


def lockstep_callback(args: argparse.Namespace, pm_sides: list[PmrlhfSide]):
    from transformers import TrainerCallback

    class LockStep(TrainerCallback):
        """Times TRL's steps and runs one step of every pmrlhf side between them."""

        def __init__(self) -> None:
            self.trl_times: list[float] = []
            self.lengths: list[tuple[float, float]] = []
            self.mark: float | None = None
            self.trainer: Any = None  # set once the RLOOTrainer exists

        def on_train_begin(self, *a, **k):
            self.mark = now(args.device)

        def on_step_end(self, *a, **k):
            t = now(args.device)
            assert self.mark is not None
            self.trl_times.append(t - self.mark)
            metrics = self.trainer._metrics["train"]
            self.lengths.append(
                (metrics["completions/min_length"][-1], metrics["completions/max_length"][-1])
            )
            order = pm_sides if len(self.trl_times) % 2 else pm_sides[::-1]
            for side in order:
                side.step()
            self.mark = now(args.device)

    return LockStep()


# ---------------------------------------------------------------------------------- reporting
def summarize(times: list[float], args: argparse.Namespace) -> dict[str, Any]:
    timed = times[args.warmup :]
    n = args.prompts_per_step * args.samples_per_prompt
    median = statistics.median(timed)
    return {
        "seconds_per_step": round(median, 4),
        "samples_per_second": round(n / median, 2),
        "seconds_per_step_mean": round(statistics.fmean(timed), 4),
        "seconds_per_step_min": round(min(timed), 4),
        "seconds_per_step_max": round(max(timed), 4),
        "timed_steps": len(timed),
        "slow_steps_over_1.5x_median": sum(t > 1.5 * median for t in timed),  # machine noise
        "warmup_seconds": [round(t, 3) for t in times[: args.warmup]],
    }


def paired_ratio(num: list[float], den: list[float], args: argparse.Namespace) -> float:
    ratios = [a / b for a, b in zip(num[args.warmup :], den[args.warmup :])]
    return round(statistics.median(ratios), 3)


def versions() -> dict[str, str]:
    import accelerate
    import torch
    import transformers

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
    }
    with contextlib.suppress(ImportError):
        import trl

        out["trl"] = trl.__version__
    return out


def machine(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "device": args.device,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if args.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def plan(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "preset": args.preset,
        "dtype": args.dtype,
        "model": {
            "parameters": parameter_count(args),
            "hidden": args.hidden,
            "layers": args.layers,
            "heads": args.heads,
            "kv_heads": args.kv_heads,
            "intermediate": args.intermediate,
            "vocab": args.vocab,
            "tied_embeddings": True,
            "builder": (
                "pmrlhf.models.build_tiny_model"
                if uses_build_tiny_model(args) and args.prompt_tokens + args.new_tokens <= 256
                else "pmrlhf.models.tiny_llama_config + build_word_tokenizer"
            ),
        },
        "batch": {
            "prompts_per_step": args.prompts_per_step,
            "samples_per_prompt": args.samples_per_prompt,
            "completions_per_step": args.prompts_per_step * args.samples_per_prompt,
            "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens,
        },
        "lr": args.lr,
        "beta": args.beta,
        "max_grad_norm": args.max_grad_norm,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "sides": args.sides,
        "penalty_estimator": args.penalty_estimator,
        "trl_gradient_checkpointing": args.trl_gradient_checkpointing,
    }


# ---------------------------------------------------------------------------------- the floor
FLOOR_PHASES = ("generate", "reference", "policy_forward", "backward")


def measure_peak(args: argparse.Namespace) -> dict[str, Any]:
    """This machine's peak ``torch.mm`` rate in the run's device, dtype and thread count."""
    tokens = (
        args.prompts_per_step * args.samples_per_prompt * (args.prompt_tokens + args.new_tokens)
    )
    shapes = peak_shapes(args.device, tokens, args.hidden, args.intermediate)
    return measure_peak_matmul(args.device, torch_dtype(args.dtype), shapes)


def side_flops(
    side: PmrlhfSide, args: argparse.Namespace, prompts: int | None = None, attention: bool = True
) -> dict[str, int]:
    """Matmul FLOPs per phase of one step of ``side``, from its policy's own config.

    Every prompt is ``prompt_tokens`` words, one token each (the word tokenizer adds no special
    tokens), and every completion exactly ``new_tokens`` tokens (EOS is disabled). The lean
    decoder (the CPU default) prefills each distinct prompt once: ``prompts`` distinct prompts
    (default ``prompts_per_step``, which a step's draw with replacement can only lower).
    """
    trainer = side.trainer
    config = trainer.accelerator.unwrap_model(trainer.policy).config
    return rl_step_flops(
        ModelShape.from_config(config),
        completions=args.prompts_per_step * args.samples_per_prompt,
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
        reference=trainer.ref is not None,
        attention=attention,
        prompts=(prompts or args.prompts_per_step) if trainer.decoder == "lean" else None,
    )


def significant(x: float, digits: int = 5) -> float:
    """``x`` rounded to ``digits`` significant digits (floors of tiny models are microseconds)."""
    return float(f"{x:.{digits}g}")


def add_floor(
    args: argparse.Namespace,
    pm_sides: list[PmrlhfSide],
    sides: dict[str, dict[str, Any]],
    peaks: list[dict[str, Any]],
) -> dict[str, Any]:
    """Add each pmrlhf side's FLOPs, floor and step-over-floor to ``sides``; return the
    ``floor`` block (peak rate, and TRL's step time over each side's floor).

    ``peaks`` are the measurements before and after the steps; the faster one is the peak.
    ``step_over_floor`` is the median step time over the floor; ``phase_over_floor`` the mean
    phase time (``phase_seconds``) over that phase's floor.
    """
    import torch

    best = max(peaks, key=lambda p: p["peak_gflops"])
    rate = best["peak_gflops"] * 1e9  # FLOP/s
    block: dict[str, Any] = {
        "peak_matmul_gflops": round(best["peak_gflops"], 2),
        "peak_matmul_shape": best["peak_shape"],
        "peak_matmul_dtype": args.dtype,
        "peak_matmul_threads": torch.get_num_threads(),
        "matmul_gflops_by_shape": [p["gflops_by_shape"] for p in peaks],
        "counted": "matmul FLOPs only (linear layers, LM head, q·kᵀ and p·v); benchmarks/flops.py",
    }
    trl_over: dict[str, float] = {}
    for side in pm_sides:
        summary = sides[side.name]
        flops = side_flops(side, args)
        floor = flops["total"] / rate
        summary["flops_per_step"] = flops
        summary["floor_seconds"] = significant(floor)
        summary["step_over_floor"] = round(summary["seconds_per_step"] / floor, 3)
        phase_floor = {k: flops[k] / rate for k in FLOOR_PHASES if k in flops}
        phase_time = summary.get("phase_seconds", {})
        summary["phase_floor_seconds"] = {k: significant(v) for k, v in phase_floor.items()}
        summary["phase_over_floor"] = {
            k: round(phase_time[k] / v, 3) for k, v in phase_floor.items() if k in phase_time
        }
        if "trl" in sides:
            trl_over[side.name] = round(sides["trl"]["seconds_per_step"] / floor, 3)
    if trl_over:
        block["trl_over_floor"] = trl_over
    return block


def summary_lines(result: dict[str, Any]) -> list[str]:
    """The human-readable summary: step times, floors and ratios (printed to stderr)."""
    lines = []
    floor = result.get("floor")
    if floor:
        shape = "x".join(str(n) for n in floor["peak_matmul_shape"] or [])
        lines.append(
            f"peak matmul {floor['peak_matmul_gflops']:.1f} GFLOP/s "
            f"({floor['peak_matmul_dtype']}, {floor['peak_matmul_threads']} thread(s), "
            f"mm {shape} on {result['machine']['device']})"
        )
    if "trl" in result:
        lines.append(f"trl: {result['trl']['seconds_per_step']:.4f} s/step")
    for name, side in result.items():
        if not name.startswith("pmrlhf_") or not isinstance(side, dict):
            continue
        line = f"{name}: {side['seconds_per_step']:.4f} s/step"
        if "floor_seconds" in side:
            phases = ", ".join(f"{k} {v:.2f}x" for k, v in side["phase_over_floor"].items())
            line += (
                f" = {side['step_over_floor']:.2f}x its floor {side['floor_seconds']:.4g} s"
                f" ({side['flops_per_step']['total'] / 1e9:.4g} GFLOP); per phase: {phases}"
            )
        lines.append(line)
    for name, value in (floor or {}).get("trl_over_floor", {}).items():
        lines.append(f"trl / {name} floor = {value:.2f}x (the best ratio over TRL by arithmetic)")
    for key in ("ratio_pmrlhf_over_trl", "ratio_pmrlhf_pm_over_trl", "ratio_pm_over_kl_step_time"):
        if key in result:
            lines.append(f"{key}: {result[key]}")
    return lines


# ---------------------------------------------------------------------------------- profiling
def phase_breakdown(side: PmrlhfSide, args: argparse.Namespace) -> dict[str, Any]:
    """Mean seconds per phase over the side's timed steps, from the trainer's own metrics.

    ``other`` is the rest of ``step_seconds`` (prompt choice, shaping, advantages, metrics).
    """
    runs = side.phases[args.warmup :]
    keys = sorted({k for r in runs for k in r}, key=lambda k: -sum(r.get(k, 0.0) for r in runs))
    seconds = {k: statistics.fmean(r.get(k, 0.0) for r in runs) for k in keys}
    seconds["other"] = seconds["total"] - sum(v for k, v in seconds.items() if k != "total")
    total = seconds["total"]
    share = {k: round(v / total, 3) for k, v in seconds.items() if k != "total"}
    rounded = {k: round(v, 4) for k, v in seconds.items()}
    return {"side": side.name, "steps": len(runs), "mean_seconds": rounded, "share": share}


def cprofile_step(side: PmrlhfSide) -> None:
    """Run one more step of ``side`` under cProfile; print the top functions to stderr."""
    profiler = cProfile.Profile()
    profiler.enable()
    side.trainer.train_step()
    profiler.disable()
    stream = io.StringIO()
    pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(20)
    print(f"[bench] cProfile of one {side.name} step, by own time:", file=sys.stderr)
    print(stream.getvalue(), file=sys.stderr)


def cuda_profile_step(side: PmrlhfSide, top: int = 25) -> list[dict[str, Any]]:
    """Run one more step of ``side`` under the torch profiler; the operators that take the most
    GPU time, with their share of it (also printed to stderr)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        side.trainer.train_step()
    events = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    events.sort(key=lambda e: -e.self_device_time_total)
    total = sum(e.self_device_time_total for e in events) or 1.0
    rows = [
        {
            "op": e.key[:80],
            "calls": e.count,
            "gpu_ms": round(e.self_device_time_total / 1000, 2),
            "share": round(e.self_device_time_total / total, 3),
        }
        for e in events[:top]
    ]
    print(f"[bench] GPU time of one {side.name} step: {total / 1000:.1f} ms", file=sys.stderr)
    for row in rows:
        print(f"[bench]   {row['gpu_ms']:9.2f} ms {row['share']:6.1%} x{row['calls']:<6} {row['op']}",
              file=sys.stderr)  # fmt: skip
    return rows


# ---------------------------------------------------------------------------------- main
def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    result: dict[str, Any] = {"benchmark": "rloo", **plan(args)}
    result["machine"] = machine(args)
    result["versions"] = versions()
    if args.goal_seconds is not None:
        result["reference"] = TRL_REFERENCE.get(args.preset)

    with tempfile.TemporaryDirectory(prefix="bench_rloo_") as tmp:
        tmp_path = Path(tmp)
        model_dir = args.model_dir or tmp_path / "model"
        if (model_dir / "config.json").is_file():
            check_model_dir(args, model_dir)
        else:
            start = time.perf_counter()
            build_model(args, model_dir)
            print(f"[bench] built model in {time.perf_counter() - start:.1f}s", file=sys.stderr)

        # pmrlhf first: TRL's TrainingArguments resets accelerate's shared state and would
        # otherwise lend its mixed-precision setting to pmrlhf's Accelerator.
        both = args.penalty_estimator == "both"
        estimators = ["sampled", "full"] if both else [args.penalty_estimator]
        pm_sides = [
            PmrlhfSide(
                f"pmrlhf_{reg}{'_full' if both and est == 'full' else ''}",
                make_pmrlhf(args, model_dir, reg, tmp_path / f"{reg}-{est}", est),
                args,
            )
            for reg in ("kl", "pm")
            if reg in args.sides
            for est in estimators
        ]
        total = args.warmup + args.steps
        peaks = [measure_peak(args)] if pm_sides else []
        print(f"[bench] {len(args.sides)} sides x {total} steps ...", file=sys.stderr)
        if "trl" in args.sides:
            callback = lockstep_callback(args, pm_sides)
            trl = make_trl(args, model_dir, tmp_path / "trl", [callback])
            callback.trainer = trl
            trl.train()
            trl_lengths = (
                min(lo for lo, _ in callback.lengths),
                max(hi for _, hi in callback.lengths),
            )
            trl_times = callback.trl_times
            if len(trl_times) != total:
                raise RuntimeError(f"TRL ran {len(trl_times)} steps, expected {total}")
        else:
            trl_times, trl_lengths = [], None
            for _ in range(total):
                for side in pm_sides:
                    side.step()

        if pm_sides:
            peaks.append(measure_peak(args))  # the machine as the steps left it

        sides: dict[str, dict[str, Any]] = {}
        if trl_times and trl_lengths is not None:
            sides["trl"] = summarize(trl_times, args)
            sides["trl"]["completion_tokens_min_max"] = list(trl_lengths)
        for side in pm_sides:
            sides[side.name] = summarize(side.times, args)
            sides[side.name]["completion_tokens_mean"] = round(statistics.fmean(side.lengths), 3)
            sides[side.name]["phase_seconds"] = phase_breakdown(side, args)["mean_seconds"]
        if pm_sides:
            result["floor"] = add_floor(args, pm_sides, sides, peaks)
        result.update(sides)

        lengths_ok = all(abs(x - args.new_tokens) < 1e-6 for s in pm_sides for x in s.lengths)
        if trl_lengths is not None:
            lengths_ok = lengths_ok and trl_lengths == (args.new_tokens, args.new_tokens)
        result["all_completions_exactly_new_tokens"] = lengths_ok

        by_name = {s.name: s for s in pm_sides}
        if trl_times and "pmrlhf_kl" in by_name:
            kl = by_name["pmrlhf_kl"]
            result["ratio_pmrlhf_over_trl"] = round(
                sides["trl"]["seconds_per_step"] / sides["pmrlhf_kl"]["seconds_per_step"], 3
            )
            result["ratio_pmrlhf_over_trl_paired_median"] = paired_ratio(trl_times, kl.times, args)
        if trl_times and "pmrlhf_pm" in by_name:
            result["ratio_pmrlhf_pm_over_trl"] = round(
                sides["trl"]["seconds_per_step"] / sides["pmrlhf_pm"]["seconds_per_step"], 3
            )
        if "pmrlhf_kl" in by_name and "pmrlhf_pm" in by_name:
            result["ratio_pm_over_kl_step_time"] = round(
                sides["pmrlhf_pm"]["seconds_per_step"] / sides["pmrlhf_kl"]["seconds_per_step"], 3
            )
            result["ratio_pm_over_kl_step_time_paired_median"] = paired_ratio(
                by_name["pmrlhf_pm"].times, by_name["pmrlhf_kl"].times, args
            )
        for reg in ("kl", "pm"):
            full_name = f"pmrlhf_{reg}_full"
            if f"pmrlhf_{reg}" in by_name and full_name in by_name:
                result[f"ratio_full_over_sampled_{reg}"] = round(
                    sides[full_name]["seconds_per_step"]
                    / sides[f"pmrlhf_{reg}"]["seconds_per_step"],
                    3,
                )
                result[f"ratio_full_over_sampled_{reg}_paired_median"] = paired_ratio(
                    by_name[full_name].times, by_name[f"pmrlhf_{reg}"].times, args
                )
        goal: dict[str, Any] = {}
        checks: list[bool] = []
        if args.goal_ratio is not None and "ratio_pmrlhf_over_trl" in result:
            goal["pmrlhf_over_trl_at_least"] = args.goal_ratio
            checks.append(result["ratio_pmrlhf_over_trl"] >= args.goal_ratio)
        if args.goal_floor is not None and "step_over_floor" in sides.get("pmrlhf_kl", {}):
            goal["pmrlhf_step_over_floor_at_most"] = args.goal_floor
            checks.append(sides["pmrlhf_kl"]["step_over_floor"] <= args.goal_floor)
        if args.goal_seconds is not None and "pmrlhf_kl" in sides:
            goal["pmrlhf_seconds_per_step_at_most"] = args.goal_seconds
            checks.append(sides["pmrlhf_kl"]["seconds_per_step"] <= args.goal_seconds)
        if goal:
            goal["met"] = all(checks)
            result["goal"] = goal
        if args.profile and pm_sides:
            target = by_name.get("pmrlhf_kl", pm_sides[0])
            result["profile"] = phase_breakdown(target, args)
            cprofile_step(target)
            if args.device == "cuda":
                result["profile"]["cuda_kernels"] = cuda_profile_step(target)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        result = {"benchmark": "rloo", "dry_run": True, **plan(args), "device": args.device}
        print(json.dumps(result, indent=2))
        return 0
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    result = run(args)
    text = json.dumps(result, indent=2)
    print(text)
    for line in summary_lines(result):
        print(f"[bench] {line}", file=sys.stderr)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    if not result.get("all_completions_exactly_new_tokens", True):
        print(
            "[bench] WARNING: some completions were not exactly --new-tokens long", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
