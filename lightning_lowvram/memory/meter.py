"""``MemoryMeter``: the peak bytes of a region, by category, on CPU and CUDA."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from lightning_lowvram.memory.profiles import format_bytes
from lightning_lowvram.memory.tracker import _TOTAL_KEY, CATEGORIES, LiveTensorTracker


@dataclasses.dataclass(frozen=True)
class MemoryStats:
    """Bytes at one moment (the peak, or now), split by category.

    Attributes:
        total: Bytes of all live tracked tensors.
        by_category: ``parameters``, ``buffers``, ``gradients``, ``optimizer``, ``activations``, ``temporaries``,
            ``other`` (tensors registered with the meter that fit none of these).
        cuda_allocated: Peak of ``torch.cuda.max_memory_allocated`` over the region (CUDA only).
        cuda_reserved: Peak of ``torch.cuda.max_memory_reserved`` over the region (CUDA only).

    """

    total: int
    by_category: dict[str, int]
    cuda_allocated: int | None = None
    cuda_reserved: int | None = None

    def __getitem__(self, category: str) -> int:
        return self.by_category[category]

    def as_metrics(self, prefix: str) -> dict[str, float]:
        """Flat ``{prefix/category_mib: value}`` for loggers."""
        out = {f"{prefix}/{name}_mib": value / 2**20 for name, value in self.by_category.items()}
        out[f"{prefix}/total_mib"] = self.total / 2**20
        if self.cuda_reserved is not None:
            out[f"{prefix}/cuda_reserved_mib"] = self.cuda_reserved / 2**20
        if self.cuda_allocated is not None:
            out[f"{prefix}/cuda_allocated_mib"] = self.cuda_allocated / 2**20
        return out

    def __str__(self) -> str:
        parts = ", ".join(f"{k} {format_bytes(v)}" for k, v in self.by_category.items() if v)
        return f"{format_bytes(self.total)} ({parts or 'nothing tracked'})"


def _stats(snapshot: dict[torch.device, dict[str, int]]) -> tuple[int, dict[str, int]]:
    by_category = dict.fromkeys(CATEGORIES.values(), 0)
    total = 0
    for dev_snap in snapshot.values():
        total += dev_snap.get(_TOTAL_KEY, 0)
        for key, value in dev_snap.items():
            if key in CATEGORIES:
                by_category[CATEGORIES[key]] += value
    return total, by_category


class MemoryMeter:
    """Measure the peak tensor bytes of a region, split by category.

    Tensors created inside the region are tracked automatically; the parameters, buffers and gradients of any module
    that runs a forward inside are recognised as such. Pass modules, optimizers or tensors that exist before the
    region to count them from the start. On CUDA the meter also reads the allocator's peak allocated/reserved bytes.

    Args:
        *track: Modules, optimizers and tensors created before the region that count toward it.

    Example:
        >>> layer = nn.Linear(4, 2)
        >>> with MemoryMeter(layer) as meter:
        ...     layer(torch.ones(8, 4)).sum().backward()
        >>> meter.current["parameters"], meter.current["gradients"]  # live at exit: 8 weights + 2 biases, float32
        (40, 40)

    """

    def __init__(self, *track: nn.Module | torch.optim.Optimizer | torch.Tensor) -> None:
        self._track = track
        self._tracker: LiveTensorTracker | None = None
        self._cuda = torch.cuda.is_available()
        self._final: tuple[MemoryStats, MemoryStats] | None = None

    def __enter__(self) -> MemoryMeter:
        self._tracker = LiveTensorTracker()
        self._tracker.track_external(*self._track)
        self._final = None
        if self._cuda:
            torch.cuda.reset_peak_memory_stats()
        self._tracker.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._tracker is not None
        self._tracker.__exit__(*exc)
        self._final = (self._read("peak"), self._read("current"))
        self._tracker = None

    @property
    def active(self) -> bool:
        """Whether the region is open."""
        return self._tracker is not None

    def _read(self, kind: str) -> MemoryStats:
        assert self._tracker is not None
        total, by_category = _stats(self._tracker.get_tracker_snapshot(kind))
        alloc = reserved = None
        if self._cuda:
            alloc = torch.cuda.max_memory_allocated() if kind == "peak" else torch.cuda.memory_allocated()
            reserved = torch.cuda.max_memory_reserved() if kind == "peak" else torch.cuda.memory_reserved()
        return MemoryStats(total, by_category, alloc, reserved)

    @property
    def peak(self) -> MemoryStats:
        """Peak of the region (so far, while it is open)."""
        if self._final is not None:
            return self._final[0]
        if self._tracker is None:
            raise RuntimeError("MemoryMeter.peak: the meter has not been entered")
        return self._read("peak")

    @property
    def current(self) -> MemoryStats:
        """Live bytes now (at exit, once the region is closed)."""
        if self._final is not None:
            return self._final[1]
        if self._tracker is None:
            raise RuntimeError("MemoryMeter.current: the meter has not been entered")
        return self._read("current")

    def reset_peak(self) -> None:
        """Start a new peak from the bytes live now."""
        if self._tracker is None:
            raise RuntimeError("MemoryMeter.reset_peak: the meter has not been entered")
        self._tracker.reset_peak()
        if self._cuda:
            torch.cuda.reset_peak_memory_stats()


def memory_table(reports: dict[str, MemoryStats]) -> str:
    """One column per stage, one row per category: the peak bytes.

    Example:
        >>> print(memory_table({"fit": MemoryStats(2048, {"parameters": 1024, "gradients": 1024})}))
        category         fit
        parameters  1.00 KiB
        gradients   1.00 KiB
        peak total  2.00 KiB

    """
    stages = list(reports)
    rows = [c for c in CATEGORIES.values() if any(r.by_category.get(c, 0) for r in reports.values())]
    lines = [["category", *stages]]
    lines += [[c, *(format_bytes(reports[s].by_category.get(c, 0)) for s in stages)] for c in rows]
    lines.append(["peak total", *(format_bytes(reports[s].total) for s in stages)])
    if any(r.cuda_reserved is not None for r in reports.values()):
        lines.append(["cuda reserved", *(format_bytes(reports[s].cuda_reserved or 0) for s in stages)])
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join(
        "  ".join([line[0].ljust(widths[0]), *(cell.rjust(w) for cell, w in zip(line[1:], widths[1:], strict=True))])
        for line in lines
    )
