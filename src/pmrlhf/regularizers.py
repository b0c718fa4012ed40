"""Per-token regularisation penalties ``p_t`` for KL-RLHF, PM and conditional PM (docs/method.md §4).

The shaped per-token reward is ``−β · p_t``, with the sequence reward added at the last response
token. All functions take (..., T) tensors of log-probabilities for the sampled tokens and a mask
of the real response positions; masked positions get a penalty of exactly zero, whatever values
(even ``-inf`` or ``nan``) they hold.

Regularisers are registered by name (:func:`register_regularizer`); each class states its
per-token penalty and its closed-form optimum over a finite response set, which is what
``pmrlhf bandit`` checks training against. A new regulariser is one class::

    @register_regularizer("my-reg")
    @dataclass(frozen=True)
    class MyRegularizer(Regularizer):
        needs_ref = True
        def penalty(self, logp, ref_logp, mask): ...
        def optimal_policy(self, reward, ref_token_probs, token_mask=None): ...

after which ``regularizer: my-reg`` works in ``pmrlhf rl``, ``pmrlhf bandit`` and Python.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from pmrlhf.theory import cpm_optimal_policy, kl_optimal_policy, pm_optimal_policy

__all__ = [
    "PENALTY_ESTIMATORS",
    "REGULARIZERS",
    "CPMRegularizer",
    "KLRegularizer",
    "PMRegularizer",
    "Regularizer",
    "cpm_expected_penalty",
    "cpm_penalty",
    "expected_penalties",
    "kl_expected_penalty",
    "kl_penalty",
    "make_regularizer",
    "meaningful_tokens",
    "pm_expected_penalty",
    "pm_penalty",
    "register_regularizer",
    "sequence_probs",
]


#: How a regulariser's penalty enters the policy gradient: the sampled token's penalty as a
#: reward (docs/method.md §5.1), or its full expectation at each visited state (§8).
PENALTY_ESTIMATORS = ("sampled", "full")


def _check_shapes(**tensors: Tensor | None) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items() if t is not None}
    if len(set(shapes.values())) > 1:
        detail = ", ".join(f"{name}={shape}" for name, shape in shapes.items())
        raise ValueError(f"shape mismatch: {detail} (all must be equal)")


def _check_alpha(alpha: float) -> None:
    if not (isinstance(alpha, (int, float)) and 0.0 < alpha < 1.0):
        raise ValueError(f"alpha must lie strictly between 0 and 1, got {alpha!r}")


def _check_beta(beta: float) -> None:
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0.0):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")


def _masked(values: Tensor, mask: Tensor) -> Tensor:
    return torch.where(
        mask.bool(), values, torch.zeros((), dtype=values.dtype, device=values.device)
    )


def kl_penalty(logp: Tensor, ref_logp: Tensor, mask: Tensor) -> Tensor:
    """``p_t = log π(y_t|s_t) − log π_ref(y_t|s_t)``: the KL-in-reward of standard RLHF."""
    _check_shapes(logp=logp, ref_logp=ref_logp, mask=mask)
    return _masked(logp - ref_logp, mask)


def pm_penalty(logp: Tensor, mask: Tensor) -> Tensor:
    """``p_t = log π(y_t|s_t)``: preference matching, no reference model needed."""
    _check_shapes(logp=logp, mask=mask)
    return _masked(logp, mask)


def meaningful_tokens(ref_logp: Tensor, mask: Tensor, alpha: float) -> Tensor:
    """Positions whose reference probability is strictly above α (and that are real tokens).

    The threshold is compared in log space, with ``log α`` rounded to the input's dtype, so a
    token whose reference log-probability equals ``log α`` in that dtype is *not* meaningful.
    """
    _check_alpha(alpha)
    _check_shapes(ref_logp=ref_logp, mask=mask)
    log_alpha = torch.tensor(math.log(alpha), dtype=torch.float64).to(ref_logp.dtype)
    return mask.bool() & (ref_logp > log_alpha.to(ref_logp.device))


def cpm_penalty(logp: Tensor, ref_logp: Tensor, mask: Tensor, alpha: float) -> Tensor:
    """Conditional PM: ``log π`` where ``π_ref > α``, ``log π − log π_ref`` elsewhere."""
    _check_shapes(logp=logp, ref_logp=ref_logp, mask=mask)
    meaningful = meaningful_tokens(ref_logp, mask, alpha)
    return _masked(torch.where(meaningful, logp, logp - ref_logp), mask)


# --------------------------------------------------------------------------- per-state expectations
# The full-vocabulary estimator (docs/method.md §8) needs each penalty's expectation over the next
# token, ``f(s) = Σ_v π(v|s) p(s, v)``, from the logits at each visited state. The functions take
# (..., V) fp32 logits (``-inf`` on tokens outside an allowed set) and a (...) mask, return (...),
# and are differentiable in the policy's logits. Tokens with ``π(v|s) = 0`` contribute exactly 0.


def _upcast(logits: Tensor) -> Tensor:
    """At least fp32 (bf16/fp16 reference logits are upcast; fp64 stays fp64)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


CostFn = Callable[[Tensor], Tensor]


def _policy_terms(
    logits: Tensor, ref_logits: Tensor | None, cost_fn: CostFn | None
) -> tuple[Tensor, Tensor]:
    """``π(v)`` and ``log π(v) − cost(v)``, the latter 0 wherever ``π(v) = 0``."""
    logp = torch.log_softmax(logits, dim=-1)
    probs = logp.exp()
    inner = logp
    if cost_fn is not None:
        assert ref_logits is not None
        inner = logp - cost_fn(ref_logits)
    # a token with π = 0 contributes 0 (and no gradient), whatever log π or the cost hold there
    zero = torch.zeros((), dtype=inner.dtype, device=inner.device)
    return probs, torch.where(probs > 0, inner, zero)


class _ExpectedLogRatio(torch.autograd.Function):
    """``f = Σ_v π(v) (log π(v) − cost(v))`` over the last dimension, ``π = softmax(logits)``.

    The cost comes from the reference logits and carries no gradient. The gradient is
    ``∂f/∂z_j = π(j) (log π(j) − cost(j) − f)``, computed in one expression; nothing of size
    ``V`` is kept for the backward pass beyond the two inputs, which are recomputed from.
    """

    @staticmethod
    def forward(ctx, logits, ref_logits, cost_fn):
        probs, inner = _policy_terms(logits, ref_logits, cost_fn)
        f = (probs * inner).sum(-1)
        ctx.cost_fn = cost_fn
        ctx.save_for_backward(logits, ref_logits, f)
        return f

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_f):
        logits, ref_logits, f = ctx.saved_tensors
        probs, inner = _policy_terms(logits, ref_logits, ctx.cost_fn)
        grad = probs * (inner - f.unsqueeze(-1)) * grad_f.unsqueeze(-1)
        return grad, None, None


def _expected_log_ratio(
    logits: Tensor, ref_logits: Tensor | None, cost_fn: CostFn | None
) -> Tensor:
    return _ExpectedLogRatio.apply(logits, ref_logits, cost_fn)


def _kl_cost(ref_logits: Tensor) -> Tensor:
    return torch.log_softmax(_upcast(ref_logits), dim=-1)


def _cpm_cost(ref_logits: Tensor, alpha: float) -> Tensor:
    ref_logp = torch.log_softmax(_upcast(ref_logits), dim=-1)
    log_alpha = torch.tensor(math.log(alpha), dtype=torch.float64).to(ref_logp.dtype)
    meaningful = ref_logp > log_alpha.to(ref_logp.device)
    return torch.where(meaningful, torch.zeros((), dtype=ref_logp.dtype), ref_logp)


def pm_expected_penalty(logits: Tensor, mask: Tensor) -> Tensor:
    """``f(s) = Σ_v π(v|s) log π(v|s)``, minus the entropy at each state."""
    _check_shapes(logits=logits[..., 0], mask=mask)
    return _masked(_expected_log_ratio(logits, None, None), mask)


def kl_expected_penalty(logits: Tensor, ref_logits: Tensor, mask: Tensor) -> Tensor:
    """``f(s) = Σ_v π(v|s) [log π(v|s) − log π_ref(v|s)]``, the KL to the reference at each state."""
    _check_shapes(logits=logits, ref_logits=ref_logits)
    _check_shapes(logits=logits[..., 0], mask=mask)
    return _masked(_expected_log_ratio(logits, ref_logits, _kl_cost), mask)


def cpm_expected_penalty(logits: Tensor, ref_logits: Tensor, mask: Tensor, alpha: float) -> Tensor:
    """``f(s) = Σ_v π(v|s) [log π(v|s) − 1{π_ref(v|s) ≤ α} log π_ref(v|s)]``.

    The threshold is the one of :func:`meaningful_tokens` applied to the reference
    log-probabilities (at least fp32, as the trainer computes them): ``log π_ref(v|s) > log α``,
    with ``log α`` rounded to their dtype.
    """
    _check_alpha(alpha)
    _check_shapes(logits=logits, ref_logits=ref_logits)
    _check_shapes(logits=logits[..., 0], mask=mask)
    return _masked(_expected_log_ratio(logits, ref_logits, partial(_cpm_cost, alpha=alpha)), mask)


def expected_penalties(
    regularizer: Regularizer,
    logits: Tensor,
    ref_logits: Tensor | None,
    mask: Tensor,
    max_elements: int = 1 << 24,
) -> Tensor:
    """``f(s_t)`` at every response position of a batch, chunk by chunk over the sequence.

    ``logits``: (B, T, V) policy logits (with their graph when training); ``ref_logits``:
    (B, T, V) reference logits at the same states, in any dtype (upcast per chunk), or None;
    ``mask``: (B, T). Each chunk of positions holds at most ``max_elements`` of ``B × t × V``.
    With gradients on, every chunk is recomputed in the backward pass instead of keeping its
    softmaxes, so no fp32 ``B × T × V`` intermediate of either model lives beyond one chunk.
    """
    B, T, V = logits.shape
    step = max(1, max_elements // max(1, B * V))
    grad = torch.is_grad_enabled() and logits.requires_grad
    parts = []
    for start in range(0, T, step):
        piece = slice(start, start + step)
        ref_piece = None if ref_logits is None else ref_logits[:, piece]
        args = (logits[:, piece], ref_piece, mask[:, piece])
        if grad and step < T:
            parts.append(checkpoint(regularizer.expected_penalty, *args, use_reentrant=False))
        else:
            parts.append(regularizer.expected_penalty(*args))
    return torch.cat(parts, dim=1) if parts else logits.new_zeros(B, 0)


def sequence_probs(token_probs: Tensor, token_mask: Tensor | None = None) -> Tensor:
    """``Π_t p_t`` over each response's real tokens: (..., N, T) -> (..., N)."""
    if token_mask is None:
        return token_probs.prod(-1)
    _check_shapes(token_probs=token_probs, token_mask=token_mask)
    return torch.where(token_mask.bool(), token_probs, torch.ones_like(token_probs)).prod(-1)


@dataclass(frozen=True)
class Regularizer:
    """Base class: a named per-token penalty with strength β that states what it needs.

    Subclasses are frozen dataclasses; their fields (besides ``beta``) are the regulariser's
    parameters, which :func:`make_regularizer` fills by name. A subclass defines
    :meth:`penalty` and, for the bandit check, :meth:`optimal_policy`; to be trained with
    ``penalty_estimator: full`` it also defines :meth:`expected_penalty`.
    """

    beta: float = 1.0
    #: The registry name, set by :func:`register_regularizer`.
    name: ClassVar[str] = "base"
    #: Whether :meth:`penalty` reads reference log-probs (the trainer loads π_ref only then).
    needs_ref: ClassVar[bool] = False
    #: Whether the run aims at the closed form exactly, as preference matching does: settings
    #: that clip the reward or rescale β are then flagged too (see ``RLConfig``), not only the
    #: sampling settings that move every regulariser's optimum.
    exact_target: ClassVar[bool] = True

    def __post_init__(self) -> None:
        _check_beta(self.beta)

    def penalty(self, logp: Tensor, ref_logp: Tensor | None, mask: Tensor) -> Tensor:
        raise NotImplementedError

    def token_rewards(self, logp: Tensor, ref_logp: Tensor | None, mask: Tensor) -> Tensor:
        """The shaped per-token reward ``−β p_t`` (sequence reward not included)."""
        return -self.beta * self.penalty(logp, ref_logp, mask)

    def expected_penalty(self, logits: Tensor, ref_logits: Tensor | None, mask: Tensor) -> Tensor:
        """``f(s) = Σ_v π(v|s) p(s, v)`` at each state, from the full next-token logits.

        ``logits``: (..., V) fp32 policy logits; ``ref_logits``: (..., V) reference logits at the
        same states (None unless :attr:`needs_ref`); ``mask``: (...). Returns (...), zero where
        ``mask`` is 0, differentiable in ``logits``. Defining it lets ``penalty_estimator: full``
        train the regulariser (docs/method.md §8).
        """
        raise NotImplementedError(
            f"the {self.name!r} regulariser defines no expected_penalty, so it cannot be "
            "trained with penalty_estimator 'full'; use 'sampled'"
        )

    @classmethod
    def supports_full_estimator(cls) -> bool:
        """Whether the class defines :meth:`expected_penalty` (``penalty_estimator: full``)."""
        return cls.expected_penalty is not Regularizer.expected_penalty

    def optimal_policy(
        self, reward: Tensor, ref_token_probs: Tensor, token_mask: Tensor | None = None
    ) -> Tensor:
        """The closed-form optimum over a finite set of N responses to one prompt.

        ``reward``: (..., N); ``ref_token_probs``: (..., N, T), the reference probability of each
        response token; ``token_mask``: (..., N, T), the real tokens (default: all). Returns the
        optimal probabilities, (..., N).
        """
        raise NotImplementedError(f"the {self.name!r} regulariser states no closed-form optimum")

    def _require_ref(self, ref_logp: Tensor | None) -> Tensor:
        if ref_logp is None:
            raise ValueError(f"the {self.name!r} regulariser needs reference log-probs (ref_logp)")
        return ref_logp


#: name -> regulariser class. Live: a class registered later shows up in every option's choices.
REGULARIZERS: dict[str, type[Regularizer]] = {}

R = TypeVar("R", bound=type[Regularizer])


def register_regularizer(name: str) -> Callable[[R], R]:
    """Class decorator: make a :class:`Regularizer` subclass available under ``name``."""

    def register(cls: R) -> R:
        if not (isinstance(cls, type) and issubclass(cls, Regularizer)):
            raise TypeError(f"register_regularizer({name!r}) expects a Regularizer subclass")
        if not dataclasses.is_dataclass(cls) or "__dataclass_fields__" not in cls.__dict__:
            raise TypeError(f"{cls.__name__} must be a @dataclass(frozen=True)")
        known = REGULARIZERS.get(name)
        same = known is not None and (known.__module__, known.__qualname__) == (
            cls.__module__,
            cls.__qualname__,
        )
        if known is not None and not same:
            raise ValueError(f"regularizer name {name!r} is already taken by {known.__name__}")
        cls.name = name
        REGULARIZERS[name] = cls
        return cls

    return register


@register_regularizer("kl")
@dataclass(frozen=True)
class KLRegularizer(Regularizer):
    """Standard RLHF: reverse KL to the reference model; optimum ``π_ref · exp(r/β) / Z``."""

    needs_ref = True
    exact_target = False

    def penalty(self, logp: Tensor, ref_logp: Tensor | None, mask: Tensor) -> Tensor:
        return kl_penalty(logp, self._require_ref(ref_logp), mask)

    def expected_penalty(self, logits: Tensor, ref_logits: Tensor | None, mask: Tensor) -> Tensor:
        return kl_expected_penalty(logits, self._require_ref(ref_logits), mask)

    def optimal_policy(
        self, reward: Tensor, ref_token_probs: Tensor, token_mask: Tensor | None = None
    ) -> Tensor:
        return kl_optimal_policy(reward, sequence_probs(ref_token_probs, token_mask), self.beta)


@register_regularizer("pm")
@dataclass(frozen=True)
class PMRegularizer(Regularizer):
    """Preference matching: ``−log π``; its optimum is ``softmax(r/β)``."""

    needs_ref = False

    def penalty(self, logp: Tensor, ref_logp: Tensor | None, mask: Tensor) -> Tensor:
        return pm_penalty(logp, mask)

    def expected_penalty(self, logits: Tensor, ref_logits: Tensor | None, mask: Tensor) -> Tensor:
        return pm_expected_penalty(logits, mask)

    def optimal_policy(
        self, reward: Tensor, ref_token_probs: Tensor, token_mask: Tensor | None = None
    ) -> Tensor:
        return pm_optimal_policy(reward, self.beta)


@register_regularizer("cpm")
@dataclass(frozen=True)
class CPMRegularizer(Regularizer):
    """Conditional PM: the PM term on tokens the reference finds plausible (π_ref > α).

    Its effective optimum is ``exp(r/β) · Π_{t: π_ref ≤ α} π_ref(y_t|s_t) / Z``.
    """

    alpha: float = dataclasses.field(kw_only=True)
    needs_ref = True

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_alpha(self.alpha)

    def penalty(self, logp: Tensor, ref_logp: Tensor | None, mask: Tensor) -> Tensor:
        return cpm_penalty(logp, self._require_ref(ref_logp), mask, self.alpha)

    def expected_penalty(self, logits: Tensor, ref_logits: Tensor | None, mask: Tensor) -> Tensor:
        return cpm_expected_penalty(logits, self._require_ref(ref_logits), mask, self.alpha)

    def optimal_policy(
        self, reward: Tensor, ref_token_probs: Tensor, token_mask: Tensor | None = None
    ) -> Tensor:
        mask = torch.ones_like(ref_token_probs) if token_mask is None else token_mask
        return cpm_optimal_policy(reward, ref_token_probs, mask, self.alpha, self.beta)


def make_regularizer(
    name: str, beta: float, alpha: float | None = None, **params: Any
) -> Regularizer:
    """Build a registered regulariser by name. The name is always explicit, never inferred from α.

    ``beta``, ``alpha`` and ``params`` are passed to the fields the class declares; a value the
    class has no field for is ignored when it is None or α (the CLI always carries an α), and an
    error otherwise. A field without default must be given.
    """
    if name not in REGULARIZERS:
        raise ValueError(f"unknown regularizer {name!r}; choose one of {sorted(REGULARIZERS)}")
    cls = REGULARIZERS[name]
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(k for k, v in params.items() if k not in fields and v is not None)
    if unknown:
        raise ValueError(f"the {name!r} regularizer has no parameter(s) {unknown}")
    given = {"beta": beta, "alpha": alpha, **params}
    kwargs = {k: v for k, v in given.items() if k in fields and v is not None}
    for field_name, field in fields.items():
        required = (
            field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        )
        if required and field_name not in kwargs:
            raise ValueError(f"the {name!r} regularizer needs {field_name}")
    return cls(**kwargs)
