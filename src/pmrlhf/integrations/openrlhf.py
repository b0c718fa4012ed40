"""PM and cPM through OpenRLHF's k1 in-reward penalty.

OpenRLHF shapes the token-level reward as ``−kl_coef · compute_approx_kl(log π, log π_ref)``
(plus the sequence reward at the last token), where ``compute_approx_kl`` is the name bound in
``openrlhf.trainer.ppo_utils.experience_maker``. Its command line only accepts the estimators
``k1``, ``k2`` and ``k3``, so :func:`install` rebinds that one name: with
``--algo.kl.estimator k1`` and the KL in the reward (not ``--algo.kl.use_loss``), the in-reward
term becomes ``−β · p_t`` of the chosen pmrlhf regulariser, with ``β = --algo.kl.init_coef``.
The KL *loss* path (``ppo_actor``) is left alone.

The regulariser comes from :func:`install`'s argument or, in a Ray worker started with
``worker_process_setup_hook=pmrlhf.integrations.openrlhf.install``, from the environment
variable ``PMRLHF_PENALTY`` (``pm`` or ``cpm:<alpha>``; set it in the Ray runtime env).

OpenRLHF needs flash-attn and a GPU to install with its dependencies; on a machine without
them, install it with ``pip install --no-deps`` and load its modules by file path, as its own
tests do (:func:`load_module`).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pmrlhf.integrations._common import build_regularizer, parse_penalty_type

__all__ = ["ENV_VAR", "install", "load_module", "make_compute_approx_kl"]

ENV_VAR = "PMRLHF_PENALTY"
_EXPERIENCE_MAKER = "openrlhf.trainer.ppo_utils.experience_maker"
_MARK = "_pmrlhf_penalty"


def make_compute_approx_kl(
    spec: str, original: Callable[..., Tensor] | None = None
) -> Callable[..., Tensor]:
    """A drop-in ``compute_approx_kl`` whose ``k1`` estimator is the pmrlhf penalty ``spec``.

    Other estimators go to ``original`` (OpenRLHF's function). Unlike OpenRLHF's k1, the
    penalty is not clamped to [−10, 10]: ``log π`` of a rare token is a real PM penalty.
    """
    name, alpha = parse_penalty_type(spec)
    regularizer = build_regularizer(name, 1.0, alpha)  # OpenRLHF applies its own kl_coef

    def compute_approx_kl(
        log_probs: Tensor,
        log_probs_base: Tensor,
        log_probs_old: Tensor | None = None,
        kl_estimator: str = "k1",
        **kwargs: Any,
    ) -> Tensor:
        if kl_estimator != "k1":
            if original is None:
                raise ValueError(
                    f"pmrlhf's compute_approx_kl handles only k1, got {kl_estimator!r}"
                )
            return original(
                log_probs, log_probs_base, log_probs_old, kl_estimator=kl_estimator, **kwargs
            )
        logp = log_probs.float()
        mask = torch.ones_like(logp, dtype=torch.bool)
        return regularizer.penalty(logp, log_probs_base.float(), mask)

    setattr(compute_approx_kl, _MARK, spec)
    return compute_approx_kl


def install(spec: str | None = None, module: types.ModuleType | None = None) -> None:
    """Rebind ``compute_approx_kl`` in OpenRLHF's experience maker (or in ``module``).

    ``spec`` defaults to ``$PMRLHF_PENALTY``; without either, nothing is installed (so the hook
    is harmless in workers of a run that does not ask for it).
    """
    spec = spec or os.environ.get(ENV_VAR)
    if not spec:
        return
    if module is None:
        module = importlib.import_module(_EXPERIENCE_MAKER)
    current = getattr(module, "compute_approx_kl", None)
    if current is None:
        raise ImportError(f"{module.__name__} has no compute_approx_kl to replace")
    original = (
        getattr(current, "__wrapped__", current) if getattr(current, _MARK, None) else current
    )
    replacement = make_compute_approx_kl(spec, original)
    functools.update_wrapper(replacement, original)
    setattr(replacement, _MARK, spec)
    module.compute_approx_kl = replacement  # type: ignore[attr-defined]


def load_module(path: str | Path, name: str) -> types.ModuleType:
    """Load one OpenRLHF source file as module ``name`` without importing the package."""
    spec = importlib.util.spec_from_file_location(name, str(path))
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
