import random
from contextlib import ExitStack

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import torchmetrics
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_lowvram import AutoMicroBatchCallback, MemoryReportCallback, memory_budget
from lightning_lowvram.demo import DigitsDataModule
from tests.callbacks.test_memory_report import RecordingLogger
from tests.helpers import quiet_trainer

BATCH = 128


class WideNet(L.LightningModule):
    """float64, no dropout/BatchNorm; activations dominate memory, so the budget decides the micro-batch size."""

    def __init__(self, width: int = 512):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, 10)).double()
        self.seen = torchmetrics.SumMetric()
        self.predicted = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.seen.update(torch.ones(len(x), dtype=torch.float64))
        self.log("val/loss", F.cross_entropy(self(x), y))

    def predict_step(self, batch, batch_idx):
        return self(batch[0])

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        return {
            "optimizer": opt,
            "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.StepLR(opt, 3, 0.5), "interval": "step"},
        }


def _fit(callbacks=(), budget=None, batches=6, epochs=2, accumulate=1, seed=0, ckpt=None, trainer_kwargs=None):
    L.seed_everything(seed)
    model = WideNet()
    data = DigitsDataModule(batch_size=BATCH, dtype="float64")
    data.setup("fit")  # the dataset lives in host memory: built before the emulated device budget
    trainer = quiet_trainer(
        max_epochs=epochs,
        limit_train_batches=batches,
        limit_val_batches=0,
        accumulate_grad_batches=accumulate,
        callbacks=list(callbacks),
        **(trainer_kwargs or {}),
    )
    with ExitStack() as stack:
        if budget is not None:
            stack.enter_context(memory_budget(budget, device="cpu"))
        trainer.fit(model, datamodule=data, ckpt_path=ckpt)
    return model, trainer


def _peak(size: int) -> int:
    """Peak bytes (our meter) of a run split into micro-batches of `size`: what a budget must hold for it."""
    report = MemoryReportCallback(stages=["fit"], print_table=False)
    _fit([AutoMicroBatchCallback(micro_batch_size=size), report], batches=2, epochs=1)
    return report.reports["fit"].total


@pytest.fixture(scope="module")
def peaks():
    return {size: _peak(size) for size in (4, 8, 16, 32, 64, 128)}


def _between(peaks, fits: int, fails: int) -> int:
    """A budget in which micro-batch `fits` runs and `fails` (and anything larger) runs out of memory."""
    assert peaks[fits] < peaks[fails]
    return (peaks[fits] + peaks[fails]) // 2


def _assert_same_weights(a, b, tol=1e-9):
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.allclose(p, q, rtol=0, atol=tol), name


def test_a_budget_forces_a_quarter_batch_and_the_weights_equal_plain_lightning(peaks):
    reference, ref_trainer = _fit()
    micro = AutoMicroBatchCallback()
    model, trainer = _fit([micro], budget=_between(peaks, 32, 64))
    assert micro.micro_batch_size == BATCH // 4 and micro.micro_batches == 4
    assert micro.failed["train"] == 64 and micro.oom_retries == 2  # 128 -> 64 -> 32, failed sizes never retried
    assert trainer.global_step == ref_trainer.global_step == 12
    _assert_same_weights(model, reference)


def test_accumulation_and_a_budget_that_tightens_mid_epoch(peaks):
    """Later batches need less memory than is left: the same batch is redone smaller, earlier gradients kept."""

    class Tighten(Callback):
        def __init__(self, at, limit):
            self.at, self.limit, self.seen, self.stack = at, limit, 0, ExitStack()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if self.seen == self.at:  # the second batch of an accumulation window: gradients already hold batch 3
                self.stack.enter_context(memory_budget(self.limit, device="cpu"))
            self.seen += 1

        def on_train_end(self, trainer, pl_module):
            self.stack.close()

    reference, _ = _fit(accumulate=2)
    micro = AutoMicroBatchCallback()
    model, _ = _fit([micro, Tighten(3, _between(peaks, 8, 16))], accumulate=2, budget=peaks[128] * 2)
    assert micro.micro_batch_size == 8 and micro.failed["train"] == 16 and micro.oom_retries == 4
    _assert_same_weights(model, reference)


@pytest.mark.parametrize("seed", range(20))
def test_randomised_budgets_always_finish_with_the_reference_weights(seed, peaks):
    rng = random.Random(seed)
    reference, _ = _fit(batches=3, epochs=1)
    micro = AutoMicroBatchCallback(micro_batch_size=rng.choice(["auto", 128, 48, 7]))
    budget = rng.randint(peaks[4], peaks[128] + 1000)
    model, _ = _fit([micro], budget=budget, batches=3, epochs=1)
    _assert_same_weights(model, reference)


def test_min_micro_batch_size_that_does_not_fit_raises_a_clear_error(peaks):
    micro = AutoMicroBatchCallback(min_micro_batch_size=8)
    with pytest.raises(torch.OutOfMemoryError, match=r"micro-batch of 8 sample\(s\) does not fit.*lowvram plan"):
        _fit([micro], budget=_between(peaks, 4, 8), batches=1, epochs=1)


def test_resumed_run_starts_at_the_chosen_size(peaks, tmp_path):
    micro = AutoMicroBatchCallback()
    budget = _between(peaks, 32, 64)
    _, trainer = _fit([micro], budget=budget, batches=2, epochs=1)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    resumed = AutoMicroBatchCallback()
    _fit([resumed], budget=budget, batches=2, epochs=2, ckpt=str(tmp_path / "last.ckpt"))
    assert resumed.sizes["train"] == 32 and resumed.oom_retries == 2  # restored count, no new failure


def test_sizes_and_retries_reach_the_loggers(peaks):
    logger = RecordingLogger()
    micro = AutoMicroBatchCallback()
    _fit(
        [micro],
        budget=_between(peaks, 32, 64),
        batches=2,
        epochs=1,
        trainer_kwargs={"logger": logger, "log_every_n_steps": 1},
    )
    assert logger.metrics["lowvram/micro_batch_size"] == 32
    assert logger.metrics["lowvram/micro_batches"] == 4
    assert logger.metrics["lowvram/oom_retries"] == 2


def test_eval_micro_batches_count_each_sample_once_and_predict_is_identical(peaks):
    L.seed_everything(0)
    model, data = WideNet(), DigitsDataModule(batch_size=BATCH, dtype="float64")
    data.setup("fit")
    plain = quiet_trainer().predict(model, datamodule=data)
    micro = AutoMicroBatchCallback(micro_batch_size=32, eval_micro_batch_size="auto")
    trainer = quiet_trainer(callbacks=[micro])
    with memory_budget(_between(peaks, 4, 8), device="cpu"):
        split = trainer.predict(model, datamodule=data)
        trainer.validate(model, datamodule=data, verbose=False)
    assert [p.shape for p in split] == [p.shape for p in plain]
    assert all(torch.equal(a, b) for a, b in zip(split, plain, strict=True))
    assert micro.sizes["predict"] < BATCH and micro.sizes["validate"] < BATCH
    assert micro.sizes["train"] == 32  # an eval OOM never shrinks the training size
    assert model.seen.compute().item() == len(data.splits["val"])  # no double counting after retries


def test_fixed_eval_size_splits_without_oom():
    L.seed_everything(0)
    model, data = WideNet(), DigitsDataModule(batch_size=BATCH, dtype="float64")
    micro = AutoMicroBatchCallback(eval_micro_batch_size=5)
    quiet_trainer(callbacks=[micro]).validate(model, datamodule=data, verbose=False)
    assert model.seen.compute().item() == len(data.splits["val"]) and micro.oom_retries == 0


def test_bf16_mixed_on_cpu_matches_plain_bf16_closely(peaks):
    kwargs = {"precision": "bf16-mixed"}
    reference, _ = _fit(batches=3, epochs=1, trainer_kwargs=kwargs)
    model, _ = _fit([AutoMicroBatchCallback(micro_batch_size=8)], batches=3, epochs=1, trainer_kwargs=kwargs)
    _assert_same_weights(model, reference, tol=1e-2)  # bf16 matmuls round differently per micro-batch


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"micro_batch_size": 0}, "micro_batch_size must be 'auto' or an integer >= min_micro_batch_size=1, got 0"),
        ({"micro_batch_size": "big"}, "micro_batch_size must be 'auto'"),
        ({"eval_micro_batch_size": 2, "min_micro_batch_size": 4}, "eval_micro_batch_size must be"),
        ({"min_micro_batch_size": 0}, "min_micro_batch_size must be an integer >= 1"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AutoMicroBatchCallback(**kwargs)


def test_manual_optimization_is_refused_at_setup():
    class Manual(WideNet):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

    model = Manual()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(MisconfigurationException, match="automatic optimization only"):
        quiet_trainer(max_steps=1, callbacks=[AutoMicroBatchCallback()]).fit(model, datamodule=DigitsDataModule())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_batchnorm_warns_once():
    class WithBN(WideNet):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10)).double()

    with pytest.warns(UserWarning, match="BatchNorm layers now see micro-batches"):
        L.seed_everything(0)
        quiet_trainer(max_steps=2, limit_val_batches=0, callbacks=[AutoMicroBatchCallback(micro_batch_size=8)]).fit(
            WithBN(), datamodule=DigitsDataModule(batch_size=BATCH, dtype="float64")
        )
