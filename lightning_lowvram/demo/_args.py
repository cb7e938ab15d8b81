"""Argument checks for the demo models and data: one ``ValueError`` naming the argument and its value."""

from __future__ import annotations

import math
from typing import Any


def positive_int(**values: Any) -> None:
    """Each value must be an integer >= 1 (not a bool).

    Example:
        >>> positive_int(hidden=0)
        Traceback (most recent call last):
        ...
        ValueError: hidden must be an integer >= 1, got 0

    """
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def positive_number(**values: Any) -> None:
    """Each value must be a finite number > 0 (not a bool)."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a number > 0, got {value!r}")


def fraction(**values: Any) -> None:
    """Each value must be a number in [0, 1)."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
            raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
