"""Put torchmetrics states back after steps that must not count (a retried micro-batch, a timing run)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torchmetrics import Metric


def snapshot_metrics(module: torch.nn.Module) -> Callable[[], None]:
    """Capture every torchmetrics state in `module`; return the function that puts them back.

    Tensor states are copied (they are small: sums, counts, confusion matrices); list states (concatenated
    predictions) only grow by ``append`` during ``update``, so their length is enough: O(1) per batch, not O(epoch).
    """
    saved = []
    for metric in module.modules():
        if isinstance(metric, Metric):
            states: dict[str, Any] = {}
            for name in metric._defaults:
                value = getattr(metric, name)
                states[name] = value.detach().clone() if isinstance(value, torch.Tensor) else (value, len(value))
            saved.append((metric, states, metric._update_count, metric._computed))

    def restore() -> None:
        for metric, states, update_count, computed in saved:
            for name, value in states.items():
                if isinstance(value, torch.Tensor):
                    setattr(metric, name, value.clone())
                else:
                    items, length = value
                    del items[length:]
                    setattr(metric, name, items)
            metric._update_count, metric._computed = update_count, computed

    return restore
