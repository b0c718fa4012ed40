"""Distributed training: the shipped accelerate configs, and multi-process runs that must match
single-process runs on the same global batch.

What "the same global batch" means here (docs/distributed.md, "What is tested, and where"):

* ``sft`` and ``rm``: accelerate shards the shuffled data loader by whole batches, so 2 processes
  with ``batch_size`` b see, at each step, exactly the 2b examples that 1 process with
  ``batch_size`` 2b sees. DDP averages the two ranks' gradients, which equals the gradient of the
  global mean loss only when each rank's loss is a mean over an equal share of the global
  denominator: for SFT (a mean over completion tokens) the data are built so that every
  completion has the same number of tokens; for RM (a mean over pairs) equal batch sizes are
  enough.
* ``rl``: a step's prompts are a function of (seed, step, rank) and the sampling generator is
  seeded alike on every rank, so with a single training prompt both ranks draw the same prompt
  and sample the same responses. The 2-process global batch is then two copies of the 1-process
  batch, whose mean loss (and gradient) is the 1-process one.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).parents[1]
CONFIGS = ROOT / "configs" / "accelerate"
SCRIPTS = Path(__file__).parent / "scripts"
CONFIG_FILES = {
    name: CONFIGS / f"{name}.yaml" for name in ("ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3")
}
# the paper's recipes (configs/paper/) launch with their own 8-GPU ZeRO-2 file
CONFIG_FILES["deepspeed_zero2_paper"] = ROOT / "configs" / "paper" / "accelerate_8gpu_zero2.yaml"
ACCELERATE_CONFIGS = list(CONFIG_FILES)
DEEPSPEED_CONFIGS = ["deepspeed_zero2", "deepspeed_zero3", "deepspeed_zero2_paper"]

# Largest |difference| allowed between a weight trained on 2 processes and on 1 (fp32, 2-3
# AdamW steps). The runs differ only in summation order (an all-reduce, batched vs. split
# matmuls), which leaves differences of order 1e-6 or less; a real mismatch (a sum instead of a mean
# over ranks, a different batch) moves weights by about the learning rate, 1e-3.
WEIGHT_ATOL = 2e-5
# ... and the least a weight must have moved in those steps, so that the comparison means something.
MOVED = 5e-4


# --------------------------------------------------------------------------- accelerate configs
def _launch_args(name: str):
    """The launch arguments accelerate derives from one config file, as `accelerate launch` does."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    parser = launch_command_parser()
    argv = ["--config_file", str(CONFIG_FILES[name]), "-m", "pmrlhf", "rl"]
    args, defaults, _ = _validate_launch_command(parser.parse_args(argv))
    known = set(vars(parser.parse_args(["-m", "pmrlhf"])))
    return args, defaults, known


def _launch_env(name: str) -> dict[str, str]:
    """The environment `accelerate launch` would give each worker for one config file."""
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args, defaults, _ = _launch_args(name)
    args.main_process_port = 0  # a free port, so that the check never falls back to standalone
    if args.use_deepspeed:
        # set by `accelerate launch` itself right before it builds the DeepSpeed environment
        args.deepspeed_fields_from_accelerate_config = list(defaults.deepspeed_config)
        return prepare_deepspeed_cmd_env(args)[1]
    return prepare_multi_gpu_env(args)


def _with_env(monkeypatch, env: dict[str, str]) -> None:
    for key, value in env.items():
        if key.startswith(("ACCELERATE_", "FSDP_")):
            monkeypatch.setenv(key, value)


@pytest.mark.parametrize("name", ACCELERATE_CONFIGS)
def test_accelerate_config_loads_through_accelerates_own_loader(name):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.utils import DistributedType

    config = load_config_from_file(str(CONFIG_FILES[name]))  # rejects unknown top-level keys
    assert isinstance(config, ClusterConfig)
    expected = {
        "ddp": DistributedType.MULTI_GPU,
        "fsdp": DistributedType.FSDP,
        "deepspeed_zero2": DistributedType.DEEPSPEED,
        "deepspeed_zero3": DistributedType.DEEPSPEED,
        "deepspeed_zero2_paper": DistributedType.DEEPSPEED,
    }[name]
    assert config.distributed_type == expected
    assert (config.num_processes, config.num_machines, config.mixed_precision) == (8, 1, "bf16")
    assert not config.use_cpu

    # The nested plugin keys are copied onto launch arguments without a check of their names,
    # so a misspelt key would be dropped silently: every one must be an argument accelerate has.
    args, _, known = _launch_args(name)
    nested = {**config.fsdp_config, **config.deepspeed_config}
    unknown = sorted(key for key in nested if key not in known)
    assert not unknown, f"{name}.yaml: keys accelerate launch does not know: {unknown}"
    for key, value in nested.items():
        assert str(getattr(args, key)).lower() == str(value).lower(), key
    assert args.num_processes == 8 and args.mixed_precision == "bf16"
    assert (args.multi_gpu, args.use_fsdp, args.use_deepspeed) == (
        name == "ddp",
        name == "fsdp",
        name.startswith("deepspeed"),
    )


def test_fsdp_config_builds_the_fsdp2_plugin(monkeypatch, tiny_model_dir):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from pmrlhf.models import load_causal_lm

    env = _launch_env("fsdp")
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    _with_env(monkeypatch, env)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    assert plugin.reshard_after_forward is True  # FULL_SHARD: weights sharded between layers
    assert plugin.state_dict_type.name == "SHARDED_STATE_DICT"
    assert plugin.cpu_ram_efficient_loading is False  # frozen ref/reward models load whole
    plugin.set_mixed_precision("bf16")
    policy = plugin.mixed_precision_policy
    assert isinstance(policy, MixedPrecisionPolicy)
    assert policy.param_dtype == torch.bfloat16 and policy.reduce_dtype == torch.bfloat16
    # transformer-based wrapping resolves to the model's own decoder layer class
    plugin.set_auto_wrap_policy(load_causal_lm(str(tiny_model_dir)))
    assert plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]


@pytest.mark.parametrize("name", DEEPSPEED_CONFIGS)
def test_deepspeed_config_builds_accelerates_plugin(monkeypatch, name):
    """What needs no deepspeed package: accelerate's plugin and the DeepSpeed JSON it writes."""
    from accelerate.utils import DeepSpeedPlugin

    env = _launch_env(name)
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true"
    _with_env(monkeypatch, env)
    plugin = DeepSpeedPlugin()
    plugin.set_mixed_precision("bf16")
    ds = plugin.deepspeed_config
    stage = 3 if name.endswith("zero3") else 2
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "none"
    assert ds["bf16"]["enabled"] is True and not ds.get("fp16", {}).get("enabled", False)
    assert ds["gradient_clipping"] == 1.0
    # batch sizes and accumulation are filled from the pmrlhf run at prepare() time
    assert ds["train_micro_batch_size_per_gpu"] == "auto"
    assert ds["gradient_accumulation_steps"] == "auto"
    if stage == 3:
        assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
        assert plugin.zero3_init_flag is False


@pytest.mark.parametrize("name", DEEPSPEED_CONFIGS)
def test_deepspeed_accepts_the_configs(monkeypatch, name):
    """What needs the deepspeed package: its own config parser, and ZeRO-3 seen by transformers.

    deepspeed.initialize runs in test_deepspeed_sft_on_one_cpu_process_matches_a_plain_run.
    """
    pytest.importorskip(
        "deepspeed",
        reason="deepspeed is not installed: could not check that DeepSpeed's own config parser "
        "(deepspeed.runtime.config.DeepSpeedConfig) accepts the ZeRO configs accelerate writes, "
        "nor that transformers sees ZeRO-3 (is_deepspeed_zero3_enabled). "
        "accelerate's side of the configs is checked by test_deepspeed_config_builds_accelerates_plugin",
    )
    from accelerate.utils import DeepSpeedPlugin
    from deepspeed.runtime.config import DeepSpeedConfig
    from transformers.integrations import is_deepspeed_zero3_enabled
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    _with_env(monkeypatch, _launch_env(name))
    plugin = DeepSpeedPlugin()
    plugin.set_mixed_precision("bf16")
    # fill the "auto" values as accelerate does at prepare() (no process group here: 1 rank)
    config = json.loads(json.dumps(plugin.deepspeed_config))
    config.update(train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=2)
    del config["train_batch_size"]
    parsed = DeepSpeedConfig(config)
    stage = 3 if name.endswith("zero3") else 2
    assert parsed.zero_optimization_stage == stage
    assert parsed.bfloat16_config.enabled and not parsed.float16_config.enabled
    assert parsed.zero_config.gather_16bit_weights_on_model_save is (stage == 3)
    assert parsed.gradient_clipping == 1.0
    assert parsed.train_batch_size == 8  # DeepSpeed derived it: 4 x 2 accumulation x 1 rank
    plugin.set_deepspeed_weakref()
    try:
        assert is_deepspeed_zero3_enabled() is (stage == 3)
    finally:  # a ZeRO-3 weakref left set would make later from_pretrained calls partition
        unset_hf_deepspeed_config()


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("name", DEEPSPEED_CONFIGS)
def test_deepspeed_sft_on_one_cpu_process_matches_a_plain_run(name, tiny_model_dir, tmp_path):
    """DeepSpeed's engine and ZeRO optimizer for real, on one CPU process.

    accelerate runs DeepSpeed on CPU only with one process (deepspeed.initialize then uses
    DeepSpeed's CPU accelerator); with two, its state and DeepSpeed's disagree on the world
    size (docs/distributed.md, "Known limits").
    """
    pytest.importorskip(
        "deepspeed",
        reason="deepspeed is not installed: could not run sft under DeepSpeed ZeRO-2/3 "
        "(deepspeed.initialize on one CPU process)",
    )
    data = _write_jsonl(tmp_path / "data.jsonl", SFT_ROWS * 2)
    zero, one = tmp_path / "zero", tmp_path / "one"
    report = tmp_path / "report"
    report.mkdir()
    launcher = str(Path(sys.executable).with_name("accelerate"))
    command = [
        launcher, "launch", "--config_file", str(CONFIG_FILES[name]),
        "--num_processes", "1", "--mixed_precision", "no", str(SCRIPTS / "run_and_report.py"),
        *_train_args("sft", tiny_model_dir, data, zero, batch_size=4),
    ]  # fmt: skip
    env = dict(_single_env(), RUN_REPORT=str(report))
    env.pop("ACCELERATE_USE_CPU", None)  # with it, accelerate would not take the DeepSpeed path
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    stage = 3 if name.endswith("zero3") else 2
    ran = json.loads((report / "rank0.json").read_text())
    assert ran == {"distributed_type": "DEEPSPEED", "num_processes": 1, "zero_stage": stage}
    _run_in_process(*_train_args("sft", tiny_model_dir, data, one, batch_size=4))

    weights = "model/model.safetensors"
    difference = _max_weight_difference(zero / weights, one / weights, shared_only=True)
    print(f"deepspeed {name} sft: max |diff| against a plain run {difference:.3g}")
    assert _moved(tiny_model_dir / "model.safetensors", one / weights) > MOVED
    assert difference < WEIGHT_ATOL
    assert [r["lr"] for r in _metrics(zero)] == pytest.approx([r["lr"] for r in _metrics(one)])


# --------------------------------------------------------------------------- FSDP on a CPU
@pytest.mark.multiprocess
def test_fsdp_config_on_cpu_runs_ddp_not_fsdp(tmp_path):
    """accelerate 1.15 enables FSDP only for accelerator devices; on CPU it falls back to DDP.

    The shipped fsdp.yaml, launched on 2 CPU processes, gives each process a full replica under
    DistributedDataParallel. If a later accelerate shards on CPU, this fails: then the FSDP
    equivalence and resume tests can run here (docs/distributed.md, "FSDP on CPU").
    """
    from conftest import two_process_launch

    command, env = two_process_launch(str(SCRIPTS / "distributed_probe.py"), str(tmp_path))
    launch = command.index("launch") + 1
    # the FSDP config file in place of --multi_gpu, with its 8 processes and bf16 overridden
    command[launch : launch + 1] = ["--config_file", str(CONFIGS / "fsdp.yaml")]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank, report in enumerate(reports):
        assert report["process_index"] == rank and report["num_processes"] == 2
        assert report["distributed_type"] == "MULTI_CPU"
        assert report["prepared_class"] == "DistributedDataParallel"
        assert report["local_parameter_elements"] == 4 * 8 + 8 + 8 + 1  # a full replica


# --------------------------------------------------------------------------- DDP equivalence
def _run_in_process(*argv: str) -> None:
    """One `pmrlhf` command in a fresh single-process interpreter."""
    done = subprocess.run(
        [sys.executable, "-m", "pmrlhf", *argv],
        capture_output=True,
        text=True,
        env=_single_env(),
    )
    assert done.returncode == 0, done.stderr[-3000:]


def _single_env() -> dict[str, str]:
    import os

    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
    return env


def _run_two_processes(
    *argv: str, fsdp_report: Path | None = None, timeout: float | None = None
) -> None:
    """`pmrlhf` on 2 gloo processes: DDP, or with ``fsdp_report`` accelerate's FSDP2 path (where
    an ``argv`` starting with a ``.py`` script runs that script instead, tests/scripts/fsdp_on_cpu.py).
    ``timeout`` turns a hang into a failure."""
    from conftest import two_process_launch

    if fsdp_report is None:
        command, env = two_process_launch("-m", "pmrlhf", *argv)
    else:
        command, env = two_process_launch(str(SCRIPTS / "fsdp_on_cpu.py"), *argv)
        launch = command.index("launch") + 1
        command[launch : launch + 1] = ["--config_file", str(CONFIGS / "fsdp.yaml")]
        fsdp_report.mkdir(parents=True, exist_ok=True)
        env["FSDP_ON_CPU_REPORT"] = str(fsdp_report)
    env["PYTHONPATH"] = _single_env()["PYTHONPATH"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    if fsdp_report is not None:
        for rank in (0, 1):
            report = json.loads((fsdp_report / f"rank{rank}.json").read_text())
            assert report == {"distributed_type": "FSDP", "fsdp_version": 2, "num_processes": 2}


def _max_weight_difference(a: Path, b: Path, shared_only: bool = False) -> float:
    """Largest |difference| of two saved models' tensors.

    ``shared_only``: compare the names both files hold. A model with tied input and output
    embeddings is saved with or without the tied copy (lm_head.weight), depending on whether
    the state dict came gathered from shards; both reload to the same model.
    """
    first, second = load_file(str(a)), load_file(str(b))
    names = first.keys() & second.keys() if shared_only else first.keys()
    if not shared_only:
        assert first.keys() == second.keys()
    assert names
    return max(float((first[k] - second[k]).abs().max()) for k in names)


def _moved(start: Path, trained: Path) -> float:
    before, after = load_file(str(start)), load_file(str(trained))
    return max(float((after[k] - before[k]).abs().max()) for k in before if k in after)


def _metrics(run: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _write_jsonl(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# Completions of one length (4 words + end of sequence), so that every rank's token-mean loss
# averages the same number of tokens.
SFT_ROWS = [
    {"prompt": p, "completion": c}
    for p in ("Which drink do you prefer ?", "Which season do you like best ?")
    for c in ("I prefer tea .", "I prefer coffee .", "I prefer water .", "I like summer .")
]
PAIR_ROWS = [
    {"prompt": "Which drink do you prefer ?", "chosen": f"I prefer {a} .", "rejected": f"I prefer {b} ."}
    for a in ("tea", "coffee", "water")
    for b in ("tea", "coffee", "water")
    if a != b
] + [
    {"prompt": "Which season do you like best ?", "chosen": f"I like {a} best .", "rejected": f"I like {b} best ."}
    for a, b in (("summer", "winter"), ("spring", "winter"))
]  # fmt: skip


def _train_args(kind: str, model: Path, data: Path, out: Path, batch_size: int) -> list[str]:
    return [
        kind, "--model", str(model), "--data", str(data), "--output-dir", str(out),
        "--max-steps", "3", "--batch-size", str(batch_size), "--lr", "1e-3",
        "--eval-fraction", "0", "--eval-before", "false", "--max-grad-norm", "1.0",
        "--seed", "7", "--quiet", "true",
    ]  # fmt: skip


@pytest.mark.multiprocess
@pytest.mark.parametrize("kind", ["sft", "rm", "rm-grouped"])
def test_two_processes_match_one_process_on_the_same_global_batch(kind, tiny_model_dir, tmp_path):
    rows = SFT_ROWS if kind == "sft" else PAIR_ROWS
    data = _write_jsonl(tmp_path / "data.jsonl", rows * 2)  # 16 rows: 4 steps of 4
    two, one = tmp_path / "two", tmp_path / "one"
    # rm-grouped: the grouped order is drawn alike on both ranks, which take alternate batches
    command, extra = ("rm", ["--group-by-prompt", "true"]) if kind == "rm-grouped" else (kind, [])
    _run_two_processes(*_train_args(command, tiny_model_dir, data, two, batch_size=2), *extra)
    _run_in_process(*_train_args(command, tiny_model_dir, data, one, batch_size=4), *extra)

    weights = "model/model.safetensors"
    moved = _moved(tiny_model_dir / "model.safetensors", one / weights)
    difference = _max_weight_difference(two / weights, one / weights)
    print(f"{kind}: moved {moved:.3g}, 2-vs-1-process max |diff| {difference:.3g}")
    assert moved > MOVED
    assert difference < WEIGHT_ATOL
    two_rows, one_rows = _metrics(two), _metrics(one)
    assert len(two_rows) == len(one_rows) == 3
    for a, b in zip(two_rows, one_rows, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def _rl_args(policy: Path, prompts: Path, out: Path, algo: str, reg: str, steps: int) -> list[str]:
    from pmrlhf.rl.config import RLConfig

    names = {f.name for f in fields(RLConfig)}
    steps_option = "--max-steps" if "max_steps" in names else "--steps"
    return [
        "rl", "--policy", str(policy), "--reward", f"{SCRIPTS / 'reward_fns.py'}:likes_tea",
        "--prompts", str(prompts), "--algo", algo, "--regularizer", reg,
        "--beta", "0.1", "--alpha", "0.1", steps_option, str(steps), "--prompts-per-step", "1",
        "--samples-per-prompt", "2", "--max-new-tokens", "4", "--lr", "1e-3",
        "--critic-lr", "1e-3", "--seed", "3", "--output-dir", str(out), "--quiet", "true",
    ]  # fmt: skip


@pytest.mark.multiprocess
@pytest.mark.parametrize(("algo", "regularizer"), [("rloo", "cpm"), ("ppo", "kl")])
def test_rl_on_two_processes_with_a_resume_matches_one_process(
    algo, regularizer, tiny_model_dir, tmp_path
):
    """3 steps on 1 process against 2 steps on 2 processes, saved, then resumed for the third."""
    prompts = _write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Which drink do you prefer ?"}])
    two, one = tmp_path / "two", tmp_path / "one"
    _run_two_processes(*_rl_args(tiny_model_dir, prompts, two, algo, regularizer, steps=2))
    _run_two_processes(
        *_rl_args(tiny_model_dir, prompts, two, algo, regularizer, steps=3),
        "--resume", str(two / "checkpoint"),
    )  # fmt: skip
    _run_in_process(*_rl_args(tiny_model_dir, prompts, one, algo, regularizer, steps=3))

    policy = "policy/model.safetensors"
    moved = _moved(tiny_model_dir / "model.safetensors", one / policy)
    difference = _max_weight_difference(two / policy, one / policy)
    print(f"rl {algo}/{regularizer}: moved {moved:.3g}, 2-vs-1-process max |diff| {difference:.3g}")
    assert moved > MOVED
    assert difference < WEIGHT_ATOL
    if algo == "ppo":  # the critic is the second model of the checkpoint
        critic = "checkpoint/model_1.safetensors"
        critic_difference = _max_weight_difference(two / critic, one / critic)
        print(f"rl {algo}/{regularizer}: critic max |diff| {critic_difference:.3g}")
        assert critic_difference < WEIGHT_ATOL
    two_rows, one_rows = _metrics(two), _metrics(one)
    assert [r["step"] for r in two_rows] == [r["step"] for r in one_rows] == [1, 2, 3]
    for a, b in zip(two_rows, one_rows, strict=True):
        for key in ("reward_mean", "policy_loss", "kl_to_ref", "value_loss", "entropy"):
            if key in b:
                assert a[key] == pytest.approx(b[key], abs=1e-5), key


# --------------------------------------------------------------------------- FSDP2 equivalence
# accelerate's own FSDP2 path on 2 CPU processes (tests/scripts/fsdp_on_cpu.py): fully_shard,
# full state dicts gathered for the saved models, sharded (torch.distributed.checkpoint) states.
@pytest.mark.multiprocess
@pytest.mark.parametrize("kind", ["sft", "rm"])
def test_fsdp2_matches_one_process_on_the_same_global_batch(kind, tiny_model_dir, tmp_path):
    rows = SFT_ROWS if kind == "sft" else PAIR_ROWS
    data = _write_jsonl(tmp_path / "data.jsonl", rows * 2)
    sharded, one = tmp_path / "fsdp", tmp_path / "one"
    _run_two_processes(
        *_train_args(kind, tiny_model_dir, data, sharded, batch_size=2),
        fsdp_report=tmp_path / "report",
    )
    _run_in_process(*_train_args(kind, tiny_model_dir, data, one, batch_size=4))

    weights = "model/model.safetensors"
    moved = _moved(tiny_model_dir / "model.safetensors", one / weights)
    difference = _max_weight_difference(sharded / weights, one / weights, shared_only=True)
    print(f"fsdp2 {kind}: moved {moved:.3g}, 2-vs-1-process max |diff| {difference:.3g}")
    assert moved > MOVED
    assert difference < WEIGHT_ATOL
    for a, b in zip(_metrics(sharded), _metrics(one), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    ("algo", "regularizer"),
    [
        ("rloo", "cpm"),
        ("ppo", "kl"),
    ],
)
def test_fsdp2_rl_with_a_sharded_resume_matches_one_process(
    algo, regularizer, tiny_model_dir, tmp_path
):
    """3 steps on 1 process against 2 FSDP2 steps, a sharded checkpoint, and a resumed third."""
    prompts = _write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Which drink do you prefer ?"}])
    sharded, one = tmp_path / "fsdp", tmp_path / "one"
    report = tmp_path / "report"
    _run_two_processes(
        *_rl_args(tiny_model_dir, prompts, sharded, algo, regularizer, steps=2),
        fsdp_report=report,
    )
    # the checkpoint holds torch.distributed.checkpoint folders, one per model and optimizer
    assert (sharded / "checkpoint" / "pytorch_model_fsdp_0").is_dir()
    assert (sharded / "checkpoint" / "optimizer_0").is_dir()
    _run_two_processes(
        *_rl_args(tiny_model_dir, prompts, sharded, algo, regularizer, steps=3),
        "--resume", str(sharded / "checkpoint"),
        fsdp_report=report,
    )  # fmt: skip
    _run_in_process(*_rl_args(tiny_model_dir, prompts, one, algo, regularizer, steps=3))

    policy = "policy/model.safetensors"
    difference = _max_weight_difference(sharded / policy, one / policy, shared_only=True)
    print(f"fsdp2 rl {algo}/{regularizer}: 2-vs-1-process max |diff| {difference:.3g}")
    assert _moved(tiny_model_dir / "model.safetensors", one / policy) > MOVED
    assert difference < WEIGHT_ATOL
    rows = _metrics(sharded)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for a, b in zip(rows, _metrics(one), strict=True):
        for key in ("reward_mean", "policy_loss", "kl_to_ref", "value_loss"):
            if key in b:
                assert a[key] == pytest.approx(b[key], abs=1e-5), key


@pytest.mark.multiprocess
def test_fsdp2_decoding_with_ranks_ending_at_different_steps(tiny_model_dir, tmp_path):
    """A sharded policy's rollouts when one rank's responses end at once and the other's run to
    the limit: both decoders finish on both ranks (a rank leaving the loop early would leave the
    other waiting in an all-gather) and give the unsharded model's greedy responses."""
    _run_two_processes(
        str(SCRIPTS / "sharded_decoding.py"), str(tiny_model_dir), str(tmp_path),
        fsdp_report=tmp_path / "report", timeout=300,  # a hang fails here, not as a stuck suite
    )  # fmt: skip
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for decoder in ("hf", "lean"):
        for rank, report in enumerate(reports):
            sharded, plain = report[decoder]["sharded"], report[decoder]["plain"]
            assert sharded == plain, (decoder, rank)
        assert set(reports[0][decoder]["sharded"]["lengths"]) == {1}
        assert set(reports[1][decoder]["sharded"]["lengths"]) == {6}
