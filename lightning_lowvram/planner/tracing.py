"""What a step needs to run on fake tensors as it runs for real: scalars it logs, weights that never existed.

- ``ScalarPlaceholders``: ``.item()``, ``.tolist()``, ``float()`` and ``int()`` of a fake tensor (a ``training_step``
  that logs ``loss.item()``, as many do) return a zero of the tensor's kind instead of raising, so the step stays on
  fake tensors (with the card's rules) rather than running for real. ``bool()`` is left alone: a branch on a tensor's
  value cannot be traced honestly, and that step still runs for real, announced.
- ``materialize_meta``: parameters and buffers on the ``meta`` device (``with torch.device("meta"):``, accelerate's
  ``init_empty_weights``) become fake CPU tensors of the same shape, dtype and ``requires_grad``, ties kept, so a model
  too big for this machine's memory is traced without its weights ever existing.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensor

_SCALAR_READS = (torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__float__, torch.Tensor.__int__)


def _zero(t: torch.Tensor) -> Any:
    if t.dtype == torch.bool:
        return False
    return 0.0 if t.is_floating_point() or t.is_complex() else 0


def _zeros_list(shape: tuple[int, ...], value: Any) -> Any:
    if not shape:
        return value
    return [_zeros_list(shape[1:], value) for _ in range(shape[0])]


class ScalarPlaceholders(torch.overrides.TorchFunctionMode):
    """Reading a fake tensor's value (``item``, ``tolist``, ``float``, ``int``) gives zeros of its kind.

    Only where the fake tensor does not know its value: constants (Adam's step count) still give theirs.

    What the value is used for (a logged metric) does not change the step's memory; a step whose *shapes* depend on
    the values is not helped (it still raises, and is measured for real).

    Example:
        >>> from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode
        >>> with FakeTensorMode(), ScalarPlaceholders():
        ...     loss = torch.ones(3).sum()
        ...     loss.item(), int(torch.ones(2, dtype=torch.long).sum()), torch.ones(2, 1).tolist()
        (0.0, 0, [[0.0], [0.0]])

    """

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func not in _SCALAR_READS or not args or not isinstance(args[0], FakeTensor):
            return func(*args, **(kwargs or {}))
        try:  # a fake tensor that knows its value (a constant, the optimizer's step count) gives it
            return func(*args, **(kwargs or {}))
        except DataDependentOutputException:
            value = _zero(args[0])
            return _zeros_list(tuple(args[0].shape), value) if func is torch.Tensor.tolist else value


def has_meta_tensors(module: nn.Module) -> bool:
    """Whether any parameter or buffer of ``module`` is on the ``meta`` device (built without its weights)."""
    return any(t.is_meta for t in (*module.parameters(), *module.buffers()))


def materialize_meta(module: nn.Module, mode: Any) -> nn.Module:
    """Replace ``module``'s meta-device parameters and buffers by fake CPU tensors of ``mode``, in place, ties kept.

    Call it on the fake copy (``FakeCopyMode`` keeps meta tensors on ``meta``); the values stay undefined, as they are
    on fake tensors anyway.
    """
    done: dict[int, torch.Tensor] = {}

    def fake_cpu(t: torch.Tensor, parameter: bool) -> torch.Tensor:
        if id(t) not in done:
            with mode:
                empty = torch.empty(t.shape, dtype=t.dtype, device="cpu")
            done[id(t)] = nn.Parameter(empty, requires_grad=t.requires_grad) if parameter else empty
        return done[id(t)]

    for mod in module.modules():
        for name, param in list(mod._parameters.items()):
            if param is not None and param.is_meta:
                mod._parameters[name] = fake_cpu(param, True)  # type: ignore[assignment]
        for name, buffer in list(mod._buffers.items()):
            if buffer is not None and buffer.is_meta:
                mod._buffers[name] = fake_cpu(buffer, False)
    return module
