"""MemoryReportCallback: peak memory per stage and category, to the loggers and as a table."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from lightning_lowvram.memory.meter import MemoryMeter, MemoryStats, memory_table

Stage = Literal["fit", "validate", "test", "predict"]
_STAGES = ("fit", "validate", "test", "predict")


class MemoryReportCallback(Callback):
    """Measure the peak tensor memory of each stage, split by category, and report it when the stage ends.

    The meter opens when a stage starts (after the model is on its device and the optimizers exist) and closes when
    it ends; validation inside ``fit`` counts toward ``fit``. Metrics ``lowvram/memory/<stage>/<category>_mib`` go to
    every logger of the Trainer; the table is printed on rank zero. ``reports`` keeps the last peak of each stage.

    The one trap: the meter is a ``TorchDispatchMode`` that runs Python code on every tensor operation (not measured
    yet); leave it out of timing runs.

    Args:
        stages: Stages to measure.
        print_table: Print the table when a stage ends.

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

    def __init__(self, stages: Sequence[Stage] = _STAGES, print_table: bool = True) -> None:
        unknown = [s for s in stages if s not in _STAGES]
        if unknown:
            raise ValueError(f"MemoryReportCallback(stages=...): unknown {unknown}; allowed: {list(_STAGES)}")
        self.stages = tuple(stages)
        self.print_table = print_table
        self.reports: dict[str, MemoryStats] = {}
        self._meter: MemoryMeter | None = None
        self._stage: str | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(stages=self.stages)

    # -- hooks: each opens or closes the meter for the stage the Trainer runs -----------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._open(trainer, pl_module, "fit")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close(trainer, "fit")

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._open(trainer, pl_module, "validate")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close(trainer, "validate")

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._open(trainer, pl_module, "test")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close(trainer, "test")

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._open(trainer, pl_module, "predict")

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close(trainer, "predict")

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._discard()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._discard()

    # -- implementation -----------------------------------------------------------------------------------------
    def _open(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage not in self.stages or trainer.state.fn != stage or self._meter is not None:
            return
        self._stage = stage
        # optimizer state counts while fitting; in other stages it is not needed on the device
        self._meter = MemoryMeter(pl_module, *(trainer.optimizers if stage == "fit" else ()))
        self._meter.__enter__()

    def _close(self, trainer: L.Trainer, stage: str) -> None:
        if self._meter is None or self._stage != stage:
            return
        meter, self._meter = self._meter, None
        meter.__exit__(None, None, None)
        peak = self.reports[stage] = meter.peak
        for logger in trainer.loggers:
            logger.log_metrics(peak.as_metrics(f"lowvram/memory/{stage}"), step=trainer.global_step)
        if self.print_table:
            rank_zero_info(f"Peak memory ({stage}, {trainer.strategy.root_device}):\n{memory_table({stage: peak})}")

    def _discard(self) -> None:
        if self._meter is not None:
            meter, self._meter = self._meter, None
            meter.__exit__(None, None, None)
