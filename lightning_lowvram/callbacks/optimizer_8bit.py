"""EightBitOptimizerCallback: the module's Adam/AdamW keeps its moments in 8 bits (torchao)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning_utilities.core.apply_func import apply_to_collection
from typing_extensions import override

from lightning_lowvram._patching import patch
from lightning_lowvram.cores.optimizer_8bit import to_8bit


class EightBitOptimizerCallback(Callback):
    """Build the module's Adam/AdamW as torchao ``AdamW8bit``/``Adam8bit`` (state 0.51x of parameters, not 2.0x).

    ``configure_optimizers`` is wrapped, so the optimizer is 8-bit from its creation: a resumed run loads its saved
    8-bit state into an 8-bit optimizer, and LR schedulers are re-pointed at the new optimizer. Meant for GPUs (on CPU
    the first step compiles for seconds and steps are slower).

    The one trap: optimizers other than Adam/AdamW (and AMSGrad) are refused when ``fit`` builds them, before any step.

    Example:
        >>> callback = EightBitOptimizerCallback()  # L.Trainer(callbacks=[callback]).fit(model)

    """

    def __init__(self) -> None:
        self._undo: Callable[[], None] | None = None  # puts back the module's own configure_optimizers

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or self._undo is not None:
            return

        def configure_optimizers(original: Callable[[], Any]) -> Any:
            configured = original()
            found: list[torch.optim.Optimizer] = []
            apply_to_collection(configured, torch.optim.Optimizer, found.append)
            mapping = {id(opt): to_8bit(opt) for opt in found}
            return _replace(configured, mapping)

        self._undo = patch(pl_module, "configure_optimizers", configure_optimizers, wrap=True)

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and self._undo is not None:
            self._undo()
            self._undo = None


def _replace(obj: Any, mapping: dict[int, torch.optim.Optimizer]) -> Any:
    if isinstance(obj, torch.optim.Optimizer):
        return mapping[id(obj)]
    if isinstance(obj, dict):
        return {k: _replace(v, mapping) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_replace(v, mapping) for v in obj)
    if id(getattr(obj, "optimizer", None)) in mapping:  # an LR scheduler built on the original optimizer
        obj.optimizer = mapping[id(obj.optimizer)]
    return obj
