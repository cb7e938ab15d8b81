"""MemoryReportCallback: peak memory per stage and category, to the loggers and as a table."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_lowvram.memory.meter import MemoryMeter, MemoryStats, memory_table

Stage = Literal["fit", "validate", "test", "predict"]
_STAGES = ("fit", "validate", "test", "predict")


class MemoryReportCallback(Callback):
    """Measure the peak tensor memory of each stage, split by category, and report it when the stage ends.

    The meter opens when a stage starts (after the model is on its device and the optimizers exist). It follows
    every tensor operation in Python, which costs time (1.17x a small GPT's CPU step), so by default it measures only
    the first ``steps`` optimizer steps of ``fit`` and the first ``steps`` batches of each evaluation run, and then
    leaves the steps alone (3: by the third step the optimizer state exists and a step holds all it will hold; two
    were not always enough in the tests, e.g. bf16 with micro-batches); validation inside ``fit``
    counts toward ``fit``. Metrics ``lowvram/memory/<stage>/<category>_mib`` go to every logger of the Trainer when
    the stage ends; the table is printed on rank zero. ``reports`` keeps the last peak of each stage.

    On CUDA the caching allocator's peaks (``cuda_allocated``, ``cuda_reserved``) still cover every step of the stage
    after the sampled ones (not yet run on a GPU).

    The one trap: on CPU, and in the categories on CUDA, a peak that comes later than the sampled steps (a longer
    batch, an epoch with another shape) is not seen; pass ``steps=None`` to measure every step.

    Args:
        stages: Stages to measure.
        print_table: Print the table when a stage ends.
        steps: Optimizer steps of ``fit`` (and batches of each evaluation run) to measure; ``None``: all of them.

    Raises:
        ValueError: If ``stages`` names an unknown stage.

    Example:
        >>> from lightning_lowvram.demo import DigitsDataModule, DigitsMLP
        >>> report = MemoryReportCallback(stages=["fit"], print_table=False)
        >>> trainer = L.Trainer(max_steps=2, callbacks=[report], logger=False, enable_checkpointing=False,
        ...                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
        >>> trainer.fit(DigitsMLP(hidden=16), DigitsDataModule(batch_size=8))
        >>> report.reports["fit"]["parameters"] > 0
        True

    """

    def __init__(self, stages: Sequence[Stage] = _STAGES, print_table: bool = True, steps: int | None = 3) -> None:
        unknown = [s for s in stages if s not in _STAGES]
        if unknown:
            raise ValueError(f"MemoryReportCallback(stages=...): unknown {unknown}; allowed: {list(_STAGES)}")
        if not isinstance(print_table, bool):
            raise ValueError(f"print_table must be True or False, got {print_table!r}")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise ValueError(f"MemoryReportCallback(steps=...) must be an integer >= 1 or None, got {steps!r}")
        self.stages = tuple(stages)
        self.print_table = print_table
        self.steps = steps
        self.reports: dict[str, MemoryStats] = {}
        self._meter: MemoryMeter | None = None
        self._stage: str | None = None
        self._peaks: list[MemoryStats] = []  # of the sampled windows of the running stage
        self._eval_batches = 0

    @override
    @property
    def state_key(self) -> str:
        return self._generate_state_key(stages=self.stages)

    # -- hooks: each opens or closes the meter for the stage the Trainer runs -----------------------------------
    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._open(trainer, pl_module, "fit")

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.steps is not None and trainer.global_step >= self.steps:
            self._pause()

    @override
    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._count_eval_batch()

    @override
    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._count_eval_batch()

    @override
    def on_predict_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._count_eval_batch()

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close(trainer, "fit")

    @override
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval_batches = 0
        if trainer.state.fn == "fit" and self._stage == "fit" and self._meter is None and not trainer.sanity_checking:
            if len(self._peaks) < 2:  # the first validation run inside fit is sampled too, into fit's report
                self._resume(trainer, pl_module)
            return
        self._open(trainer, pl_module, "validate")

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit" and self._stage == "fit":
            if self.steps is not None and trainer.global_step >= self.steps:
                self._pause()
            return
        self._close(trainer, "validate")

    @override
    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval_batches = 0
        self._open(trainer, pl_module, "test")

    @override
    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close(trainer, "test")

    @override
    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval_batches = 0
        self._open(trainer, pl_module, "predict")

    @override
    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close(trainer, "predict")

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._discard()

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._discard()

    # -- implementation -----------------------------------------------------------------------------------------
    def _open(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage not in self.stages or trainer.state.fn != stage or self._stage is not None:
            return
        self._stage, self._peaks = stage, []
        self._resume(trainer, pl_module)

    def _resume(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # optimizer state counts while fitting; in other stages it is not needed on the device
        self._meter = MemoryMeter(pl_module, *(trainer.optimizers if self._stage == "fit" else ()))
        self._meter.__enter__()

    def _pause(self) -> None:
        """Stop following operations (the sampled steps are done); keep the peak for the stage's report."""
        if self._meter is not None:
            meter, self._meter = self._meter, None
            meter.__exit__(None, None, None)
            self._peaks.append(meter.peak)

    def _count_eval_batch(self) -> None:
        self._eval_batches += 1
        if self.steps is not None and self._eval_batches >= self.steps and self._stage is not None:
            self._pause()

    def _close(self, trainer: L.Trainer, stage: str) -> None:
        if self._stage != stage:
            return
        self._pause()
        self._stage, peaks = None, self._peaks
        if not peaks:
            return
        peak = max(peaks, key=lambda p: p.total)
        if peak.cuda_allocated is not None:  # the allocator saw every step since the last sample, not only those
            peak = dataclasses.replace(
                peak,
                cuda_allocated=max([p.cuda_allocated or 0 for p in peaks] + [torch.cuda.max_memory_allocated()]),
                cuda_reserved=max([p.cuda_reserved or 0 for p in peaks] + [torch.cuda.max_memory_reserved()]),
            )
        self.reports[stage] = peak
        for logger in trainer.loggers:
            logger.log_metrics(peak.as_metrics(f"lowvram/memory/{stage}"), step=trainer.global_step)
        if self.print_table:
            rank_zero_info(f"Peak memory ({stage}, {trainer.strategy.root_device}):\n{memory_table({stage: peak})}")

    def _discard(self) -> None:
        if self._meter is not None:
            meter, self._meter = self._meter, None
            meter.__exit__(None, None, None)
        self._stage, self._peaks = None, []
