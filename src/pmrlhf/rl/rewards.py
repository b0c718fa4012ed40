"""Sequence rewards for RL: a reward-model folder or a plain Python callable.

Whatever a reward returns is checked before it reaches training: one finite number per
completion, or a :class:`RewardError` (a ValueError) that names the reward and what was wrong.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "CallableReward",
    "ModelReward",
    "RewardError",
    "RewardFn",
    "check_finite_rewards",
    "is_model_reward",
    "load_callable",
    "load_reward",
]

RewardFn = Callable[[Sequence[str], Sequence[str]], Tensor]


class RewardError(ValueError):
    """A reward function or reward model gave something that cannot be trained on."""


def _private_module_name(path: Path) -> str:
    # A file's module gets a name no library uses, so ``datasets.py:fn`` cannot replace the
    # ``datasets`` package in ``sys.modules``; the same file always gets the same name.
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    stem = "".join(c if c.isalnum() else "_" for c in path.stem)
    return f"_pmrlhf_reward_{stem}_{digest}"


def _user_code_error(
    name: str, err: BaseException, action: str = "", filename: str | None = None
) -> RewardError:
    """One line for an exception raised in the user's reward code, with the line it came from.

    The line shown is the innermost one in ``filename`` (the user's file) when given, else the
    innermost of the traceback.
    """
    if isinstance(err, SyntaxError):
        message, file, line = err.msg, err.filename, err.lineno
    else:
        message = " ".join(str(err).split())
        frames = traceback.extract_tb(err.__traceback__)
        own = [f for f in frames if filename is not None and f.filename == filename]
        chosen = own or list(frames)
        file, line = (chosen[-1].filename, chosen[-1].lineno) if chosen else (None, None)
    where = f" ({Path(file).name}, line {line})" if file else ""
    doing = f": {action}" if action else ""
    return RewardError(f"{name}{doing} raised {type(err).__name__}: {message}{where}")


def load_callable(spec: str) -> Callable:
    """``package.module:function`` or ``path/to/file.py:function``."""
    if ":" not in spec:
        raise ValueError(f"reward callable must look like 'module:function', got {spec!r}")
    module_name, function_name = spec.rsplit(":", 1)
    if not module_name or not function_name:
        raise ValueError(f"reward callable must look like 'module:function', got {spec!r}")
    if module_name.endswith(".py"):
        path = Path(module_name).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"reward module file not found: {path}")
        private = _private_module_name(path)
        module_spec = importlib.util.spec_from_file_location(private, path)
        assert module_spec is not None and module_spec.loader is not None
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[private] = module  # dataclasses and pickle look a module up by name
        try:
            module_spec.loader.exec_module(module)
        except Exception as err:
            del sys.modules[private]
            raise _user_code_error(
                f"reward {spec}", err, f"importing {path.name}", str(path)
            ) from None
    else:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name == module_name or module_name.startswith(f"{err.name}."):
                raise ValueError(
                    f"reward callable {spec!r}: no module named {module_name!r} (give an "
                    "importable module or a path/to/file.py)"
                ) from None
            raise _user_code_error(f"reward {spec}", err, f"importing {module_name}") from None
        except Exception as err:
            raise _user_code_error(f"reward {spec}", err, f"importing {module_name}") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ValueError(
            f"reward callable {spec!r}: {module_name!r} has no callable named {function_name!r}"
        )
    return function


def is_model_reward(spec: str) -> bool:
    return Path(spec).is_dir() or (":" not in spec and not spec.endswith(".py"))


def check_finite_rewards(
    rewards: Tensor, source: str, completions: Sequence[str] | None = None
) -> Tensor:
    """Return ``rewards`` if every value is finite, else raise RewardError naming ``source``.

    The message counts the NaN and infinite values and shows the first one (with its
    completion when ``completions`` is given), so a diverged reward model or a reward function
    that divides by zero stops the run instead of training on NaN.
    """
    bad = ~torch.isfinite(rewards.detach())
    if not bool(bad.any()):
        return rewards
    flat = rewards.detach().flatten()
    first = int(bad.flatten().nonzero()[0])
    nans = int(torch.isnan(flat).sum())
    infs = int(bad.sum()) - nans
    shown = f", for completion {completions[first]!r}" if completions is not None else ""
    raise RewardError(
        f"{source} returned non-finite rewards ({nans} NaN, {infs} infinite of {flat.numel()}); "
        f"the first is {flat[first].item()} at position {first}{shown}"
    )


def _describe(value: Any) -> str:
    if value is None:
        return "None"
    if isinstance(value, Mapping):
        return f"a {type(value).__name__} (keys {list(value)[:3]})"
    if isinstance(value, str):
        return f"the string {value[:40]!r}"
    return f"a {type(value).__name__}"


def _as_rewards(values: Any, n: int, name: str) -> Tensor:
    """``values`` as a float32 vector of length ``n``, or a RewardError that says why not."""
    expected = f"it must return one number per completion ({n}), as a list, array or tensor"
    if isinstance(values, Tensor):
        out = values.detach().to("cpu", torch.float32)
    else:
        if hasattr(values, "__array__") and not isinstance(values, (str, bytes)):
            import numpy as np

            values = np.asarray(values)
            if values.dtype.kind not in "biuf":
                raise RewardError(
                    f"{name} returned an array of {values.dtype} values; {expected}"
                ) from None
            return _as_rewards(torch.from_numpy(values.astype("float32")), n, name)
        if not isinstance(values, (list, tuple)):
            raise RewardError(f"{name} returned {_describe(values)}; {expected}")
        numbers = []
        for i, value in enumerate(values):
            if isinstance(value, (list, tuple)) and len(value) == 1:
                value = value[0]  # a (N, 1) column as nested lists
            if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
                value = value.item()  # numpy or torch scalars
            if not isinstance(value, (int, float)):
                raise RewardError(f"{name} returned {_describe(value)} at position {i}; {expected}")
            numbers.append(float(value))
        out = torch.tensor(numbers, dtype=torch.float32)
    if out.dim() == 0:
        raise RewardError(f"{name} returned a single number (a 0-d tensor); {expected}")
    if out.dim() == 2 and out.shape[-1] == 1:
        out = out[:, 0]  # a (N, 1) column, as a one-label model head gives
    if out.dim() != 1 or out.numel() != n:
        raise RewardError(
            f"{name} returned {out.numel()} rewards of shape {tuple(out.shape)} for {n} "
            f"completions; {expected}"
        )
    return out


class CallableReward:
    """Wraps ``fn(prompts, completions) -> floats`` and checks what it returns.

    A value that is not one number per completion (None, a dict, a generator, strings, the
    wrong length) and NaN or infinite rewards raise :class:`RewardError` naming the reward
    function. With ``wrap_errors`` (how ``--reward module:function`` is loaded), an exception
    raised inside ``fn`` also becomes a one-line RewardError that names the function and the
    line it came from; without it (a callable passed in from Python) the exception propagates
    unchanged, with its traceback.
    """

    def __init__(self, fn: Callable, name: str | None = None, wrap_errors: bool = False):
        self.fn = fn
        if name is None:
            name = f"reward function {getattr(fn, '__qualname__', type(fn).__name__)}"
        self.name = name
        self.wrap_errors = wrap_errors

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> Tensor:
        if isinstance(self.fn, (CallableReward, ModelReward)):
            values = self.fn(prompts, completions)  # already checked
        else:
            try:
                values = self.fn(list(prompts), list(completions))
            except RewardError:
                raise
            except Exception as err:
                if not self.wrap_errors:
                    raise
                code = getattr(self.fn, "__code__", None)
                raise _user_code_error(
                    self.name, err, filename=getattr(code, "co_filename", None)
                ) from None
        out = _as_rewards(values, len(completions), self.name)
        return check_finite_rewards(out, self.name, completions)


class ModelReward:
    """A scalar reward model (``AutoModelForSequenceClassification``, one label), no grad."""

    def __init__(self, path: str, device: torch.device, dtype: torch.dtype, batch_size: int = 64):
        from pmrlhf.lora import load_scoring_model
        from pmrlhf.models import load_tokenizer

        self.model = load_scoring_model(path, dtype=dtype, device=device).eval()
        self.model.requires_grad_(False)
        self.tokenizer = load_tokenizer(path, padding_side="right")
        self.batch_size = batch_size
        self.name = f"reward model {path}"

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> Tensor:
        """One reward per completion; each distinct (prompt, completion) is scored once."""
        from pmrlhf.score import score_texts

        # each pair's position among the distinct pairs, in order of first appearance
        position: dict[tuple[str, str], int] = {}
        rows = [position.setdefault(pair, len(position))
                for pair in zip(prompts, completions, strict=True)]  # fmt: skip
        rewards = (
            score_texts(
                self.model,
                self.tokenizer,
                [prompt for prompt, _ in position],
                [completion for _, completion in position],
                batch_size=self.batch_size,
            )
            .float()
            .cpu()
        )
        rewards = rewards[torch.tensor(rows, dtype=torch.long)]
        return check_finite_rewards(rewards, self.name, completions)


def load_reward(spec: str, device: torch.device, dtype: torch.dtype) -> RewardFn:
    """A reward from ``--reward``: a reward-model folder (or hub id), or ``module:function``.

    A spec without a colon that looks like a local path (see
    :func:`pmrlhf.models.resolve_model_location`) must be an existing folder.
    """
    if is_model_reward(spec):
        from pmrlhf.models import resolve_model_location

        if not Path(spec).expanduser().is_dir():
            try:
                resolve_model_location(spec, "--reward")
            except (FileNotFoundError, ValueError):
                raise FileNotFoundError(
                    f"--reward {spec!r}: no such reward-model folder, and not a callable "
                    "('module:function' or 'path/to/file.py:function')"
                ) from None
        return ModelReward(spec, device, dtype)
    return CallableReward(load_callable(spec), name=f"reward function {spec}", wrap_errors=True)
