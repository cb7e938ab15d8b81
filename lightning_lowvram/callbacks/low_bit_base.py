"""LowBitBaseCallback: the frozen base in 4 bits (NF4), 8 bits or bfloat16 under trainable adapters (QLoRA-style)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, Literal

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_lowvram._patching import patch
from lightning_lowvram.cores.low_bit_base import (
    BITS,
    LowBitReport,
    check_precision,
    pack_low_bit,
    quantize_frozen_base,
    unpack_low_bit,
)
from lightning_lowvram.memory.profiles import format_bytes
from lightning_lowvram.memory.tracker import host_memory


class LowBitBaseCallback(Callback):
    """Store every frozen Linear / HF ``Conv1D`` weight in ``bits`` bits before the stage runs; adapters stay float.

    For LoRA-style fine-tuning (peft's ``get_peft_model`` freezes the base; so does ``requires_grad_(False)`` on your
    own base): the frozen weights take 4.25 bits (NF4, torchao), 8 bits (int8 weight-only) or 16 (bfloat16) instead of
    32, gradients still reach the adapters through them. The conversion happens once, in ``setup`` (before the optimizer
    exists, and before a checkpoint's weights are loaded, so a checkpoint saved with the callback loads into a fresh
    module with it), in host memory when the module is still on the CPU: the float weights and the conversion's scratch
    never reach the card. Checkpoints keep the base in 4 bits as plain tensors (``pack_low_bit``: weights-only
    loadable), with the adapters and optimizer state. The bytes before and after go to the loggers
    (``lowvram/low_bit_base/bytes`` and ``.../ratio``) and the summary.

    The one trap: with 4 or 8 bits the base's numerics change (NF4 keeps about 9 % relative error per weight on
    random weights); the float weights are not kept, so save the float model first if you need it. 16 bits changes
    nothing under ``precision="bf16-mixed"`` (autocast computes with bfloat16 copies of the weights anyway; the step
    is the same to the bit, and the copies are no longer made) and is refused under any other precision.

    Args:
        bits: 4 (NF4 in QLoRA's blocks of 64 weights and 256 scales, about 0.13x of float32; a layer whose weight
            count is not a multiple of 16384 stays float, with one warning), 8 (int8 weight-only, about 0.26x) or 16
            (bfloat16, 0.5x; ``bf16-mixed`` only; a weight tied to an embedding stays float32).

    Raises:
        ValueError: ``bits`` other than 4, 8 or 16; in ``setup``, a module without a frozen Linear / ``Conv1D``
            layer, or ``bits=16`` under a precision other than ``bf16-mixed``.

    Example:
        >>> callback = LowBitBaseCallback(bits=4)  # L.Trainer(callbacks=[callback]).fit(lora_model)

    """

    def __init__(self, bits: Literal[4, 8, 16] = 4) -> None:
        if isinstance(bits, bool) or bits not in BITS:
            raise ValueError(f"bits must be 4, 8 or 16, got {bits!r}")
        self.bits = bits
        self.report: LowBitReport | None = None
        self._undo: Callable[[], None] | None = None  # puts back the module's own on_load_checkpoint

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._undo is None:  # Lightning loads a checkpoint's weights before callbacks see it: the module's hook

            def on_load_checkpoint(original: Callable[..., None], checkpoint: dict[str, Any]) -> None:
                checkpoint["state_dict"] = unpack_low_bit(checkpoint["state_dict"])
                original(checkpoint)

            self._undo = patch(pl_module, "on_load_checkpoint", on_load_checkpoint, wrap=True)
        if self.report is not None:
            return
        check_precision(self.bits, str(trainer.precision))
        # Lightning moves the module to the device after setup: a module still on the CPU converts in host memory
        on_host = all(p.device.type == "cpu" for p in pl_module.parameters())
        with host_memory() if on_host else contextlib.nullcontext():
            self.report = quantize_frozen_base(pl_module, self.bits)
        if not self.report.converted:
            rank_zero_warn(f"LowBitBaseCallback: changed nothing: {self.summary()}")
        elif self.report.kept:
            rank_zero_warn(
                "LowBitBaseCallback: kept in float: " + "; ".join(f"{n} ({why})" for n, why in self.report.kept.items())
            )
        rank_zero_info(f"LowBitBaseCallback: {self.summary()}")

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.report is not None:
            metrics = {"lowvram/low_bit_base/bytes": float(self.report.bytes_after),
                       "lowvram/low_bit_base/ratio": self.report.ratio}  # fmt: skip
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    @override
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = pack_low_bit(checkpoint["state_dict"])  # plain tensors: loadable anywhere

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._undo is not None:
            self._undo()
            self._undo = None

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"bits": self.bits}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict["bits"] != self.bits:
            raise ValueError(
                f"LowBitBaseCallback: the checkpoint's base is in {state_dict['bits']} bits; this callback has "
                f"bits={self.bits}"
            )

    def summary(self) -> str:
        """One line for the `lowvram` summary."""
        name = "bfloat16" if self.bits == 16 else f"{self.bits} bits"
        if self.report is None:
            return f"{name} base (not applied yet)"
        r = self.report
        if not r.converted:
            return f"no frozen layer stored in {name} ({len(r.kept)} kept: {next(iter(r.kept.values()), '-')})"
        return (
            f"{len(r.converted)} frozen layer(s) in {name}: {format_bytes(r.bytes_before)} -> "
            f"{format_bytes(r.bytes_after)} ({r.ratio:.2f}x)" + (f", {len(r.kept)} kept float" if r.kept else "")
        )
