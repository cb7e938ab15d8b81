"""What a step needs to run on fake tensors as it runs for real: scalars it logs, weights that never existed.

- ``ScalarPlaceholders``: ``.item()``, ``.tolist()``, ``float()`` and ``int()`` of a fake tensor (a ``training_step``
  that logs ``loss.item()``, as many do) return a zero of the tensor's kind instead of raising, so the step stays on
  fake tensors (with the card's rules) rather than running for real. ``bool()`` is left alone: a branch on a tensor's
  value cannot be traced honestly, and that step still runs for real, announced.
- ``materialize_meta``: parameters and buffers on the ``meta`` device (``with torch.device("meta"):``, accelerate's
  ``init_empty_weights``) become fake CPU tensors of the same shape, dtype and ``requires_grad``, ties kept, so a model
  too big for this machine's memory is traced without its weights ever existing.
- ``hf_masks_as_run``: transformers skips an all-ones attention mask and unpacked positions (SDPA then runs with
  ``is_causal=True``, or with no mask for an encoder) only when it can read their values, which a fake tensor has
  not; the real run would skip them, so the trace is told what the example batch holds.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensor

from lightning_lowvram._patching import patched
from lightning_lowvram._values import zero_of, zeros_list

_SCALAR_READS = (torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__float__, torch.Tensor.__int__)


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
            value = zero_of(args[0])
            return zeros_list(tuple(args[0].shape), value) if func is torch.Tensor.tolist else value


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


def _batch_tensors(batch: Any, key: str) -> list[torch.Tensor]:
    """The tensors under ``key`` in ``batch``'s mappings, at any depth (a Hugging Face batch's keys)."""
    if isinstance(batch, Mapping):
        found = [v for k, v in batch.items() if k == key and isinstance(v, torch.Tensor)]
        return found + [t for k, v in batch.items() if k != key for t in _batch_tensors(v, key)]
    if isinstance(batch, list | tuple):
        return [t for value in batch for t in _batch_tensors(value, key)]
    return []


def unpadded(batch: Any) -> bool:
    """Whether ``batch`` has an ``attention_mask`` and every one is all ones (no padding).

    Example:
        >>> unpadded({"input_ids": torch.ones(2, 3), "attention_mask": torch.ones(2, 3)})
        True
        >>> unpadded({"input_ids": torch.ones(2, 3), "attention_mask": torch.tensor([[1, 1, 0], [1, 1, 1]])})
        False

    """
    masks = _batch_tensors(batch, "attention_mask")
    return bool(masks) and all(not m.is_meta and bool(m.all()) for m in masks)


def unpacked(batch: Any) -> bool:
    """Whether ``batch``'s ``position_ids``, if it has any, count up by one along each row (one sequence per row).

    A batch without them is unpacked: the model numbers the positions itself (``arange``).

    Example:
        >>> unpacked({"input_ids": torch.ones(1, 4)}), unpacked({"position_ids": torch.tensor([[0, 1, 0, 1]])})
        (True, False)

    """
    positions = _batch_tensors(batch, "position_ids")
    return all(not p.is_meta and bool((p.diff(dim=-1) == 1).all()) for p in positions)


@contextlib.contextmanager
def hf_masks_as_run(unpadded: bool, unpacked: bool) -> Iterator[None]:
    """Make the mask builder of transformers, on fake tensors, skip the masks the real step would skip.

    transformers leaves SDPA's mask out (``is_causal=True``, or no mask for an encoder; on CUDA the flash kernel
    needs that) only when it can read the values of the 2-D ``attention_mask`` (all ones?) and of the position ids
    (packed sequences?), which a fake tensor has not (its ``is_tracing`` counts FakeTensors): traced, it builds a
    ``[batch, 1, q, kv]`` mask the real step never does. So the answers are read from the real example batch first
    (:func:`unpadded`, :func:`unpacked`; before entering the fake mode) and given to it: a fake padding mask of an
    unpadded batch is passed on as ``None``, which is what all ones mean to those functions, and the packed-sequence
    check of an unpacked batch finds none, as it would. A padded or packed batch keeps the mask, as for real; masks
    not under ``attention_mask`` are kept too (the safe side). Nothing happens where transformers is not imported.
    """
    masking = sys.modules.get("transformers.masking_utils")
    names = ["_ignore_causal_mask_sdpa", "_ignore_bidirectional_mask_sdpa"] if unpadded else []
    names += ["find_packed_sequence_indices"] if unpacked else []
    with contextlib.ExitStack() as stack:
        for name in names:
            if masking is not None and hasattr(masking, name):
                replacement = _no_packing if name == "find_packed_sequence_indices" else _fake_mask_as_none
                stack.enter_context(patched(masking, name, replacement, wrap=True))
        yield


def _fake_mask_as_none(original: Any, padding_mask: Any, *args: Any, **kwargs: Any) -> Any:
    return original(None if isinstance(padding_mask, FakeTensor) else padding_mask, *args, **kwargs)


def _no_packing(original: Any, position_ids: Any, *args: Any, **kwargs: Any) -> Any:
    return None if isinstance(position_ids, FakeTensor) else original(position_ids, *args, **kwargs)
