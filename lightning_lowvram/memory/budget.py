"""``memory_budget``: run code as if the device had only so many bytes.

On CPU the budget is emulated: a tracker follows every live tensor storage created inside the block (and the
parameters, buffers and gradients of every module that runs a forward in it) and raises the real
``torch.OutOfMemoryError`` when the live bytes pass the limit, from the operation that allocated them, as the CUDA
caching allocator would. Code that recovers from a CUDA OOM recovers from this one on the same code path.

On a CUDA device the budget maps to the real allocator through ``torch.cuda.set_per_process_memory_fraction``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch

from lightning_lowvram.memory.profiles import GPUProfile, format_bytes, gpu_profile
from lightning_lowvram.memory.tracker import CATEGORIES, LiveTensorTracker


class _BudgetTracker(LiveTensorTracker):
    """One per process while any CPU budget is active; nested budgets push tighter limits onto it."""

    def __init__(self) -> None:
        super().__init__()
        self.limits: list[tuple[int, str]] = []

    def _after_update(self, requested: int = 0) -> None:
        limit, label = min(self.limits)
        live = self.live_bytes()
        if live > limit:
            raise torch.OutOfMemoryError(self._message(requested, live, limit, label))
        super()._after_update(requested)

    def _message(self, requested: int, live: int, limit: int, label: str) -> str:
        snap: dict[str, int] = {}
        for dev_snap in self._curr_mem_snap.values():
            for key, value in dev_snap.items():
                if key in CATEGORIES and value:
                    snap[CATEGORIES[key]] = snap.get(CATEGORIES[key], 0) + value
        parts = ", ".join(f"{name} {format_bytes(value)}" for name, value in snap.items())
        free = max(limit - (live - requested), 0)
        return (
            # the CUDA wording, so code that recognises a CUDA OOM by its message (Lightning's BatchSizeFinder,
            # accelerate) reacts to the emulated one as it would on the GPU
            f"CUDA out of memory (emulated on CPU). Tried to allocate {format_bytes(requested)}. "
            f"Budget{label} has a total capacity of {format_bytes(limit)} of which {format_bytes(free)} is free. "
            f"Live tensors: {parts}. (raised by lightning_lowvram.memory_budget)"
        )


_ACTIVE: _BudgetTracker | None = None


def _resolve_limit(limit: int | float | str | GPUProfile) -> tuple[int, str]:
    if isinstance(limit, bool) or not isinstance(limit, int | float | str | GPUProfile):
        raise TypeError(f"memory_budget(limit=...) takes bytes, a GPU profile or its name, got {type(limit).__name__}")
    if isinstance(limit, str | GPUProfile):
        profile = gpu_profile(limit)
        usable = profile.usable_bytes
        if usable is None:
            raise ValueError(f"memory_budget(limit={profile.name!r}): this profile has no memory limit")
        return usable, f" of {profile.name}"
    if not math.isfinite(limit) or limit < 1 or limit != int(limit):
        raise ValueError(f"memory_budget(limit={limit!r}): the limit must be a whole number of bytes >= 1")
    return int(limit), ""


def active_budget() -> int | None:
    """The tightest CPU budget in force now, in bytes, or ``None``."""
    return min(_ACTIVE.limits)[0] if _ACTIVE is not None else None


@contextmanager
def memory_budget(
    limit: int | float | str | GPUProfile,
    device: Literal["auto", "cpu", "cuda"] | str = "auto",
) -> Iterator[int]:
    """Limit live tensor memory to ``limit`` bytes; past it, ``torch.OutOfMemoryError`` is raised.

    Args:
        limit: Bytes, a :class:`GPUProfile`, or a profile name (its usable bytes: memory minus the CUDA context).
        device: ``"cpu"`` emulates the budget with a tracker; ``"cuda"`` (or ``"cuda:1"``) caps the real caching
            allocator; ``"auto"`` picks CUDA when it is available.

    Yields:
        The limit in bytes.

    Raises:
        ValueError: If ``limit`` is not positive or names a profile without a limit.

    Example:
        >>> with memory_budget(1024):
        ...     small = torch.zeros(64)  # 256 bytes: fine
        ...     try:
        ...         big = torch.zeros(1024)  # 4096 bytes: over budget
        ...     except torch.OutOfMemoryError:
        ...         print("OOM")
        OOM

    """
    global _ACTIVE
    nbytes, label = _resolve_limit(limit)
    dev = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else "cpu" if device == "auto" else device
    )
    if dev.type == "cuda":
        yield from _cuda_budget(nbytes, dev)
        return
    if dev.type != "cpu":
        raise ValueError(f"memory_budget(device={device!r}): allowed values are 'auto', 'cpu', 'cuda[:N]'")
    created = _ACTIVE is None
    tracker = _BudgetTracker() if created else _ACTIVE
    tracker.limits.append((nbytes, label))
    if created:
        tracker.__enter__()
        _ACTIVE = tracker
    try:
        yield nbytes
    finally:
        tracker.limits.remove((nbytes, label))
        if created:
            _ACTIVE = None
            tracker.__exit__(None, None, None)


_CUDA_LIMITS: dict[int, list[float]] = {}


def _cuda_budget(nbytes: int, dev: torch.device) -> Iterator[int]:
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    stack = _CUDA_LIMITS.setdefault(index, [])
    stack.append(min(nbytes / total, 1.0))
    torch.cuda.set_per_process_memory_fraction(min(stack), index)
    try:
        yield nbytes
    finally:
        stack.remove(min(nbytes / total, 1.0))
        torch.cuda.set_per_process_memory_fraction(min(stack) if stack else 1.0, index)
