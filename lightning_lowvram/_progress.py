"""Progress of long jobs: a bar where a terminal shows one, and one line per finished phase for logs.

A bar (tqdm, as Lightning's own progress bar) is drawn on standard error when it is a terminal, or always with
``LOWVRAM_PROGRESS=1`` (never with ``0``); the closing line (``plan for rtx3060_12gb: 14 traces in 12.3 s``) goes
through Lightning's ``rank_zero_info``, so it shows where Lightning's messages show and only on rank 0.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from tqdm import tqdm


class Progress:
    """What a job reports as it goes: :meth:`advance` once per unit of work, with what it was."""

    def __init__(self, bar: tqdm) -> None:
        self.bar, self.count = bar, 0

    def advance(self, note: str = "") -> None:
        """One more unit done (``note``: what it was, shown beside the bar)."""
        self.count += 1
        self.bar.update(1)
        if note:
            self.bar.set_postfix_str(note, refresh=False)


@contextmanager
def progress(desc: str, total: int | None = None, unit: str = "step") -> Iterator[Progress]:
    """A bar while the block runs and one line when it ends (how many units, how long).

    Example:
        >>> with progress("converting", total=2, unit="layer") as p:
        ...     p.advance("layer 0")
        ...     p.advance("layer 1")
        >>> p.count
        2

    """
    forced = {"1": False, "0": True}.get(os.environ.get("LOWVRAM_PROGRESS", ""))
    disable = True if getattr(rank_zero_only, "rank", 0) != 0 else (None if forced is None else forced)
    bar = tqdm(total=total, desc=desc, unit=unit, disable=disable, leave=False, file=sys.stderr, dynamic_ncols=True)
    job, start = Progress(bar), time.perf_counter()
    try:
        yield job
    finally:
        bar.close()
        plural = "" if job.count == 1 else "s"
        rank_zero_info(f"{desc}: {job.count} {unit}{plural} in {time.perf_counter() - start:.1f} s")
