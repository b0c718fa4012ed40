"""Framework-independent pieces shared by the integrations."""

from __future__ import annotations

from pmrlhf.regularizers import REGULARIZERS, Regularizer, make_regularizer


def build_regularizer(
    regularizer: str | Regularizer, beta: float, alpha: float | None
) -> Regularizer:
    """A regulariser object from a registered name (or an already built one, returned as is)."""
    if isinstance(regularizer, Regularizer):
        return regularizer
    if regularizer not in REGULARIZERS:
        raise ValueError(
            f"unknown regularizer {regularizer!r}; choose one of {sorted(REGULARIZERS)} "
            "(or register your own in pmrlhf.regularizers)"
        )
    return make_regularizer(regularizer, beta=beta, alpha=alpha)


def parse_penalty_type(spec: str) -> tuple[str, float | None]:
    """``"pm"`` → ("pm", None); ``"cpm:0.1"`` → ("cpm", 0.1). Names come from the registry."""
    name, sep, value = spec.partition(":")
    alpha: float | None = None
    if sep:
        try:
            alpha = float(value)
        except ValueError:
            raise ValueError(
                f"kl_penalty {spec!r}: expected '<regularizer>:<alpha>' with a number after ':'"
            ) from None
    if name not in REGULARIZERS:
        raise ValueError(
            f"kl_penalty {spec!r}: unknown regularizer {name!r}; registered: {sorted(REGULARIZERS)}"
        )
    return name, alpha
