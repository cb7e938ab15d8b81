"""Split any batch into micro-batches and merge outputs back: the functional core of micro-batching.

A batch is a tensor, or a (nested) tuple, list, dict, namedtuple or dataclass of them. Every tensor whose first
dimension is the batch size is sliced along it; sequences of per-sample items (a list of strings, say) with the batch's
length are sliced alongside; anything else (a scalar, a config, a tensor of another length) is passed unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection

SliceFn = Callable[[Any, int, int], Any]


def tensors_in(value: Any) -> list[torch.Tensor]:
    """Every tensor in a nested batch or output (mappings, sequences, namedtuples, dataclasses), in order.

    The project's one walker over nested containers: Lightning's ``apply_to_collection``.

    Example:
        >>> [t.shape[0] for t in tensors_in({"x": torch.zeros(8, 3), "meta": ["a", torch.zeros(2)]})]
        [8, 2]

    """
    found: list[torch.Tensor] = []
    apply_to_collection(value, torch.Tensor, found.append)
    return found


def batch_size_of(batch: Any) -> int:
    """Number of samples: the first dimension of the first tensor with one, else ``len(batch)``.

    Raises:
        ValueError: If the batch holds no tensor with a batch dimension and has no length.

    Example:
        >>> batch_size_of({"x": torch.zeros(8, 3), "y": torch.zeros(8)})
        8

    """
    for tensor in tensors_in(batch):
        if tensor.dim() > 0:
            return int(tensor.shape[0])
    if hasattr(batch, "__len__") and not isinstance(batch, str | bytes):
        return len(batch)  # e.g. a user's batch object that a slice_fn knows how to cut
    raise ValueError(
        f"cannot find the batch size of a {type(batch).__name__}: it holds no tensor with a batch dimension and "
        "has no len()"
    )


def slice_batch(batch: Any, start: int, end: int, size: int | None = None) -> Any:
    """Samples ``start:end`` of ``batch`` (views where possible), keeping its structure.

    Example:
        >>> x, names = slice_batch((torch.arange(4), ["a", "b", "c", "d"]), 1, 3)
        >>> x.tolist(), names
        ([1, 2], ['b', 'c'])

    """
    size = batch_size_of(batch) if size is None else size
    if isinstance(batch, torch.Tensor):
        return batch[start:end] if batch.dim() > 0 and batch.shape[0] == size else batch
    if isinstance(batch, Mapping):
        return type(batch)({k: slice_batch(v, start, end, size) for k, v in batch.items()})
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        changes = {
            f.name: slice_batch(getattr(batch, f.name), start, end, size) for f in dataclasses.fields(batch) if f.init
        }
        return dataclasses.replace(batch, **changes)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(slice_batch(v, start, end, size) for v in batch))
    if isinstance(batch, list | tuple):
        if len(batch) == size and not tensors_in(batch):  # per-sample items: strings, ids, ...
            return type(batch)(batch[start:end])
        return type(batch)(slice_batch(v, start, end, size) for v in batch)
    return batch


def _labels(batch: Any, preset: str) -> torch.Tensor:
    labels = batch.get("labels") if isinstance(batch, Mapping) else None
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"count_fn={preset!r} needs a dict batch with a 'labels' tensor, got a {type(batch).__name__}")
    return labels


def causal_lm_tokens(batch: Mapping[str, Any]) -> int:
    """Loss units of a Hugging Face causal LM: shifted labels that are not -100 (``ForCausalLMLoss``'s mean).

    Example:
        >>> causal_lm_tokens({"labels": torch.tensor([[5, 6, -100], [7, -100, -100]])})
        1

    """
    return int((_labels(batch, "causal_lm_tokens")[..., 1:] != -100).sum())


def label_tokens(batch: Mapping[str, Any]) -> int:
    """Loss units of a Hugging Face masked-LM or token-classification loss: labels that are not -100.

    Example:
        >>> label_tokens({"labels": torch.tensor([[5, -100, 6]])})
        2

    """
    return int((_labels(batch, "label_tokens") != -100).sum())


COUNTS: dict[str, Callable[[Any], int]] = {"causal_lm_tokens": causal_lm_tokens, "label_tokens": label_tokens}
"""Named ``count_fn`` presets. Sequence classification (a mean over samples) needs none: the default counts samples."""


def has_ignored_labels(batch: Any) -> bool:
    """A dict batch whose ``labels`` hold -100 (ignored positions): a per-sample split of it is not exact."""
    labels = batch.get("labels") if isinstance(batch, Mapping) else None
    return isinstance(labels, torch.Tensor) and bool((labels == -100).any())


def micro_batch_bounds(size: int, micro_batch_size: int) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` covering ``size`` samples in chunks of at most ``micro_batch_size``.

    Example:
        >>> micro_batch_bounds(10, 4)
        [(0, 4), (4, 8), (8, 10)]

    """
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    return [(start, min(start + micro_batch_size, size)) for start in range(0, size, micro_batch_size)]


def split_batch(batch: Any, micro_batch_size: int, slice_fn: SliceFn | None = None) -> list[Any]:
    """Split ``batch`` into micro-batches of at most ``micro_batch_size`` samples (the last may be smaller).

    Args:
        batch: The batch, as the dataloader yields it.
        micro_batch_size: Samples per micro-batch.
        slice_fn: ``slice_fn(batch, start, end)`` for batch types this module does not know.

    Example:
        >>> [m.tolist() for m in split_batch(torch.arange(5), 2)]
        [[0, 1], [2, 3], [4]]

    """
    size = batch_size_of(batch)
    slicer = slice_fn or (lambda b, s, e: slice_batch(b, s, e, size))
    return [slicer(batch, start, end) for start, end in micro_batch_bounds(size, micro_batch_size)]


def merge_outputs(outputs: Sequence[Any]) -> Any:
    """Concatenate per-micro-batch outputs back into one batch's output, in order.

    Tensors with a batch dimension are concatenated along it; structures are merged element-wise; lists are chained;
    anything else is taken from the first micro-batch.

    Example:
        >>> merge_outputs([{"p": torch.tensor([1, 2])}, {"p": torch.tensor([3])}])["p"].tolist()
        [1, 2, 3]

    """
    first = outputs[0]
    if len(outputs) == 1:
        return first
    if isinstance(first, torch.Tensor):
        return torch.cat(outputs) if first.dim() > 0 else first
    if isinstance(first, Mapping):
        return type(first)({k: merge_outputs([o[k] for o in outputs]) for k in first})
    if isinstance(first, tuple) and hasattr(first, "_fields"):
        return type(first)(*(merge_outputs(parts) for parts in zip(*outputs, strict=True)))
    if isinstance(first, tuple):
        return tuple(merge_outputs(parts) for parts in zip(*outputs, strict=True))
    if isinstance(first, list):
        return [item for o in outputs for item in o]
    return first
