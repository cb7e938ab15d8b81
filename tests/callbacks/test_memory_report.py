import logging

import lightning as L
import pytest

from lightning_lowvram import MemoryReportCallback
from lightning_lowvram.demo import DigitsDataModule, DigitsMLP
from tests.helpers import RecordingLogger, quiet_trainer


def test_peak_per_stage_to_loggers_and_printed(caplog):
    report, logger = MemoryReportCallback(), RecordingLogger()
    model, data = DigitsMLP(hidden=32), DigitsDataModule(batch_size=32)
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=4, limit_val_batches=2, logger=logger, callbacks=[report])
    with caplog.at_level(logging.INFO):
        trainer.fit(model, datamodule=data)
        trainer.validate(model, datamodule=data)
        trainer.test(model, datamodule=data)
        trainer.predict(model, datamodule=data)
    assert set(report.reports) == {"fit", "validate", "test", "predict"}
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    fit = report.reports["fit"]
    assert fit["parameters"] == param_bytes
    assert fit["optimizer"] >= 2 * param_bytes  # AdamW: two states per parameter
    assert fit.total > report.reports["test"].total
    for stage in ("validate", "test", "predict"):
        assert report.reports[stage]["gradients"] == 0
        assert report.reports[stage]["optimizer"] == 0
        assert report.reports[stage]["parameters"] == param_bytes
    assert logger.metrics["lowvram/memory/fit/parameters_mib"] == pytest.approx(param_bytes / 2**20)
    assert "lowvram/memory/predict/total_mib" in logger.metrics
    assert "Peak memory (fit, cpu)" in caplog.text
    assert "parameters" in caplog.text


def test_meter_is_closed_after_an_exception():
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    class Boom(DigitsMLP):
        def training_step(self, batch, batch_idx):
            raise RuntimeError("boom")

    report = MemoryReportCallback(print_table=False)
    with pytest.raises(RuntimeError, match="boom"):
        quiet_trainer(max_steps=1, callbacks=[report]).fit(Boom(hidden=8), datamodule=DigitsDataModule())
    assert _get_current_dispatch_mode() is None
    assert report.reports == {}


def test_bad_stage_is_refused():
    with pytest.raises(ValueError, match=r"stages=.*'train'.*allowed"):
        MemoryReportCallback(stages=["train"])


def test_two_instances_have_distinct_state_keys():
    assert MemoryReportCallback(stages=["fit"]).state_key != MemoryReportCallback().state_key


def test_sampled_steps_report_the_whole_runs_peak_and_leave_later_steps_alone():
    from lightning.pytorch.callbacks import Callback

    from lightning_lowvram.demo import TinyGPT, TinyTextDataModule

    class Probe(Callback):
        def __init__(self, report):
            self.report, self.metered = report, []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.metered.append(self.report._meter is not None)

    reports = {}
    for steps in (3, None):
        L.seed_everything(0)
        report = MemoryReportCallback(stages=["fit"], print_table=False, steps=steps)
        probe = Probe(report)
        trainer = L.Trainer(max_steps=8, callbacks=[report, probe], logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=2,
                            val_check_interval=4)  # fmt: skip
        trainer.fit(TinyGPT(seq_len=64, d_model=64, n_head=4, n_layer=2), TinyTextDataModule(batch_size=16))
        reports[steps] = report.reports["fit"].total
        assert probe.metered == ([True] * 3 + [False] * 5 if steps else [True] * 8)
    assert abs(reports[3] - reports[None]) <= 0.01 * reports[None]
    with pytest.raises(ValueError, match="steps=...\\) must be an integer >= 1 or None"):
        MemoryReportCallback(steps=0)
