"""Stand-in values for tensors whose values do not exist (fake or meta tensors): zeros of the tensor's kind."""

from __future__ import annotations

from typing import Any

import torch


def zero_of(t: torch.Tensor) -> Any:
    """The Python zero ``t.item()`` would give for a tensor of ``t``'s dtype (``False`` for bool)."""
    if t.dtype == torch.bool:
        return False
    return 0.0 if t.is_floating_point() or t.is_complex() else 0


def zeros_list(shape: tuple[int, ...], value: Any) -> Any:
    """What ``tolist()`` gives for a tensor of ``shape`` filled with ``value``.

    Example:
        >>> zeros_list((2, 1), 0.0)
        [[0.0], [0.0]]

    """
    if not shape:
        return value
    return [zeros_list(shape[1:], value) for _ in range(shape[0])]
