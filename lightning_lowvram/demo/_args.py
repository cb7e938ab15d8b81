"""Argument checks for the demo models and data (one ``ValueError`` naming the argument), and their shuffling."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch


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


class EpochShuffle(torch.utils.data.Sampler[int]):
    """Shuffle with a permutation fixed by ``(seed, epoch)``: a resumed run sees the batches an uninterrupted one does.

    Lightning calls ``set_epoch`` at the start of every epoch (as for ``DistributedSampler``); a plain
    ``shuffle=True`` draws from the global random state, which a checkpoint does not restore.

    Example:
        >>> sampler = EpochShuffle(4, seed=0)
        >>> sampler.set_epoch(1)
        >>> sorted(sampler)
        [0, 1, 2, 3]

    """

    def __init__(self, size: int, seed: int = 0) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size
