"""Turn a plan into the callbacks that run it (the planner itself never imports the callbacks)."""

from __future__ import annotations

from typing import Any

from lightning_lowvram.callbacks.activation_checkpointing import ActivationCheckpointingCallback
from lightning_lowvram.callbacks.auto_micro_batch import AutoMicroBatchCallback
from lightning_lowvram.callbacks.chunked_cross_entropy import ChunkedCrossEntropyCallback
from lightning_lowvram.callbacks.low_bit_base import LowBitBaseCallback
from lightning_lowvram.callbacks.optimizer_8bit import EightBitOptimizerCallback
from lightning_lowvram.planner.search import Plan


def plan_callbacks(plan: Plan) -> list[Any]:
    """Callbacks of the plan's chosen setting (micro-batching keeps the effective batch); none if nothing fits.

    Example:
        >>> import torch
        >>> from lightning_lowvram.demo import DigitsMLP
        >>> from lightning_lowvram.planner import plan
        >>> p = plan(DigitsMLP(), (torch.zeros(64, 64), torch.zeros(64, dtype=torch.long)), "rtx3060_12gb")
        >>> plan_callbacks(p)
        []

    """
    if plan.chosen is None:
        return []
    out: list[Any] = []
    if plan.chosen.micro_batch_size < plan.batch_size:
        out.append(AutoMicroBatchCallback(micro_batch_size=plan.chosen.micro_batch_size))
    if plan.chosen.activation_checkpointing:
        chosen = plan.chosen
        out.append(ActivationCheckpointingCallback(offload=chosen.offload_activations, tile_mlp=chosen.tiled_mlp))
    if plan.chosen.optimizer_8bit:
        out.append(EightBitOptimizerCallback())
    if plan.chosen.base_bits:
        out.append(LowBitBaseCallback(bits=plan.chosen.base_bits))
    if plan.chosen.chunked_ce:
        out.append(ChunkedCrossEntropyCallback())
    return out
