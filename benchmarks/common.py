"""What several benchmarks share: a Trainer without loggers, checkpoints, bars or summaries, on the CPU."""

from __future__ import annotations

from typing import Any

import lightning as L


def quiet_trainer(**kwargs: Any) -> L.Trainer:
    """A one-device CPU Trainer that writes nothing (``kwargs`` override)."""
    defaults: dict[str, Any] = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    return L.Trainer(**{**defaults, **kwargs})
