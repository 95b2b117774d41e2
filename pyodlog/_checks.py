"""The one numeric argument check that every layer uses (configs, intervals, timeouts)."""

from __future__ import annotations

import numbers

__all__ = ["check_number"]


def check_number(value: object, name: str, *, allow_zero: bool = False) -> None:
    """Accepts a real number (not a bool, not NaN) above zero, or at least zero with ``allow_zero``.

    Args:
        value: what the user passed.
        name: how the error names it, e.g. ``"WriterConfig.queue_size"``.
        allow_zero: accept 0 too.

    Raises:
        ValueError: naming ``name``, the rule and what was given.
    """
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        number = float(value)
        if number == number and (number >= 0 if allow_zero else number > 0):
            return
    rule = "a number >= 0" if allow_zero else "a positive number"
    raise ValueError(f"{name} must be {rule}, got {value!r}")
