"""Divergence guards for the training loops: stop on a non-finite loss, logit, score or gradient norm.

A NaN/inf that reaches ``optimizer.step()`` silently poisons every weight; the loops call :func:`require_finite`
before each step, so the stage stops with the last good checkpoint intact and its previous outputs untouched.
"""

from __future__ import annotations

import math

import torch


class NonFiniteError(RuntimeError):
    """Training produced NaN/inf; the message names the stage, step, quantity and a fix."""

    def __init__(self, stage: str, step: int, quantity: str, value: float, hint: str) -> None:
        self.stage, self.step, self.quantity, self.value = stage, step, quantity, value
        super().__init__(
            f"{stage}: non-finite {quantity} ({value}) at step {step}; training stopped before the optimiser step, "
            f"final outputs not written. Hint: {hint}"
        )


def first_non_finite(**quantities: torch.Tensor | float) -> tuple[str, float] | None:
    """The first quantity (in argument order) holding NaN or ±inf, with one offending value; None if all finite.

    Tensors of any shape are checked elementwise, e.g. ``first_non_finite(loss=loss, logits=logits)``.
    """
    for name, value in quantities.items():
        if isinstance(value, torch.Tensor):
            bad = ~torch.isfinite(value.detach())
            if bool(bad.any()):
                return name, float(value.detach()[bad].flatten()[0])
        elif not math.isfinite(float(value)):
            return name, float(value)
    return None


def require_finite(stage: str, step: int, hint: str, **quantities: torch.Tensor | float) -> None:
    """Raise :class:`NonFiniteError` if any of ``quantities`` is not finite (``step``: 1-based step being taken)."""
    found = first_non_finite(**quantities)
    if found is not None:
        raise NonFiniteError(stage, step, found[0], found[1], hint)
