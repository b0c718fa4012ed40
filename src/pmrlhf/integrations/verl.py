"""PM and cPM as ``kl_penalty`` types of verl's in-reward penalty.

verl shapes the token-level reward as ``score_t − kl_coef · kl_penalty(old_log_prob_t,
ref_log_prob_t) · mask_t`` when ``algorithm.use_kl_in_reward=True``. :func:`install` teaches
``verl.trainer.ppo.core_algos`` the types

* ``pm``           — ``p_t = log π``
* ``cpm:<alpha>``  — ``p_t = log π`` where ``π_ref > α``, else ``log π − log π_ref``
* any other regulariser registered in :data:`pmrlhf.regularizers.REGULARIZERS`, as
  ``<name>`` or ``<name>:<alpha>`` (a name verl already knows, such as ``kl``, keeps verl's meaning)

so that ``algorithm.kl_penalty=cpm:0.1`` and ``algorithm.kl_ctrl.kl_coef=β`` give the cPM-shaped
reward ``score_t − β · p_t``. verl computes rewards inside Ray actors, so the types must be
installed in every Ray worker: pass this module's :func:`install` as Ray's
``worker_process_setup_hook``::

    python -m verl.trainer.main_ppo ... \\
        algorithm.use_kl_in_reward=True algorithm.kl_penalty=cpm:0.1 \\
        algorithm.kl_ctrl.type=fixed algorithm.kl_ctrl.kl_coef=1.0 \\
        +ray_kwargs.ray_init.runtime_env.worker_process_setup_hook=pmrlhf.integrations.verl.install

(see ``examples/verl_pm.sh`` and ``docs/integrations.md``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from pmrlhf.integrations._common import build_regularizer, parse_penalty_type

__all__ = ["VERL_NATIVE_TYPES", "install", "installed", "penalty_forward"]

# kl_penalty types verl 0.9 implements itself; these are always left to verl.
VERL_NATIVE_TYPES = frozenset({"kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3", "full"})

_MARK = "_pmrlhf_penalty"


@functools.lru_cache(maxsize=64)
def _regularizer(spec: str) -> Any:
    name, alpha = parse_penalty_type(spec)
    # verl multiplies by its own kl_coef, so the regulariser's β is 1 and only ``penalty`` is used.
    return build_regularizer(name, 1.0, alpha)


def penalty_forward(logprob: Tensor, ref_logprob: Tensor, kl_penalty: str) -> Tensor:
    """The per-token ``p_t`` of a pmrlhf ``kl_penalty`` type, for every position.

    verl multiplies the result by the response mask itself, so every position counts here.
    """
    regularizer = _regularizer(kl_penalty)
    mask = torch.ones_like(logprob, dtype=torch.bool)
    return regularizer.penalty(logprob, ref_logprob, mask)


def _is_pmrlhf_type(kl_penalty: Any) -> bool:
    if not isinstance(kl_penalty, str) or kl_penalty in VERL_NATIVE_TYPES:
        return False
    try:
        parse_penalty_type(kl_penalty)
    except ValueError:
        return False
    return True


def _wrap(original: Callable[..., Tensor]) -> Callable[..., Tensor]:
    @functools.wraps(original)
    def kl_penalty_forward(logprob: Tensor, ref_logprob: Tensor, kl_penalty: str) -> Tensor:
        if _is_pmrlhf_type(kl_penalty):
            return penalty_forward(logprob, ref_logprob, kl_penalty)
        return original(logprob, ref_logprob, kl_penalty)

    setattr(kl_penalty_forward, _MARK, True)
    return kl_penalty_forward


def installed() -> bool:
    """Whether this process's verl knows the pmrlhf ``kl_penalty`` types."""
    from verl.trainer.ppo import core_algos

    return bool(getattr(core_algos.kl_penalty_forward, _MARK, False))


def install() -> None:
    """Add the pmrlhf ``kl_penalty`` types to verl in this process (idempotent).

    Usable as Ray's ``worker_process_setup_hook`` (``pmrlhf.integrations.verl.install``).
    """
    from verl.trainer.ppo import core_algos

    if not hasattr(core_algos, "kl_penalty_forward"):
        raise ImportError(
            "verl.trainer.ppo.core_algos has no kl_penalty_forward: this verl version is not "
            "supported by pmrlhf.integrations.verl (tested: 0.9.1)"
        )
    if not installed():
        core_algos.kl_penalty_forward = _wrap(core_algos.kl_penalty_forward)
