import random
from contextlib import ExitStack
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import torchmetrics
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_lowvram import AutoMicroBatchCallback, MemoryReportCallback, memory_budget
from lightning_lowvram.demo import DigitsDataModule
from tests.ddp import run_ddp
from tests.helpers import RecordingLogger, quiet_trainer

BATCH = 128


class WideNet(L.LightningModule):
    """float64, no dropout/BatchNorm; activations dominate memory, so the budget decides the micro-batch size."""

    def __init__(self, width: int = 512, dtype: torch.dtype = torch.float64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, 10)).to(dtype)
        self.seen = torchmetrics.SumMetric()
        self.samples = torchmetrics.SumMetric()  # samples training_step saw since the last optimizer step

    def forward(self, x):
        return self.net(x.to(self.net[0].weight.dtype))

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.samples.update(torch.ones(len(x), dtype=torch.float64))
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


class HeavyBackward(torch.autograd.Function):
    """Identity whose backward needs a scratch buffer 16x the activation: out-of-memory errors happen in backward."""

    events: list[tuple[str, int]] = []  # ("forward" | "backward", micro-batch size), in order

    @staticmethod
    def forward(ctx, x):
        HeavyBackward.events.append(("forward", len(x)))
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        HeavyBackward.events.append(("backward", len(grad)))
        scratch = grad.repeat(1, 64)
        return grad + 0 * scratch[:, : grad.shape[1]]


class HeavyBackwardNet(WideNet):
    def forward(self, x):
        hidden = HeavyBackward.apply(self.net[0](x))
        return self.net[2](self.net[1](hidden))


class BatchNormNet(WideNet):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, 10)).double()


class SamplesPerStep(Callback):
    """Samples the module's training_step saw before each optimizer step."""

    def __init__(self):
        self.counts = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.counts.append(int(pl_module.samples.compute()))  # torchmetrics: restored when an attempt fails
        pl_module.samples.reset()


class Tighten(Callback):
    """Enter a tighter budget before training batch `at` (0-based), as longer sequences later in an epoch would."""

    def __init__(self, at, limit):
        self.at, self.limit, self.seen, self.stack = at, limit, 0, ExitStack()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.seen == self.at:
            self.stack.enter_context(memory_budget(self.limit, device="cpu"))
        self.seen += 1

    def on_train_end(self, trainer, pl_module):
        self.stack.close()


def _fit(
    callbacks=(),
    budget=None,
    batches=6,
    epochs=2,
    accumulate=1,
    seed=0,
    ckpt=None,
    trainer_kwargs=None,
    model_fn=WideNet,
):
    L.seed_everything(seed)
    model = model_fn()
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


def _peak(size: int, **fit_kwargs) -> int:
    """Peak bytes (our meter) of a run split into micro-batches of `size`: what a budget must hold for it."""
    report = MemoryReportCallback(stages=["fit"], print_table=False)
    _fit([AutoMicroBatchCallback(micro_batch_size=size), report], batches=2, epochs=1, **fit_kwargs)
    return report.reports["fit"].total


@pytest.fixture(scope="module")
def peaks():
    return {size: _peak(size) for size in (4, 7, 8, 16, 32, 48, 64, 128)}


def _between(peaks, fits: int, fails: int) -> int:
    """A budget in which micro-batch `fits` runs and `fails` (and anything larger) runs out of memory."""
    assert peaks[fits] < peaks[fails]
    return (peaks[fits] + peaks[fails]) // 2


def _assert_same_weights(a, b, tol=1e-9):
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.allclose(p, q, rtol=0, atol=tol), name


def test_a_budget_forces_a_quarter_batch_and_the_weights_equal_plain_lightning(peaks):
    ref_counts, counts = SamplesPerStep(), SamplesPerStep()
    reference, ref_trainer = _fit([ref_counts])
    micro = AutoMicroBatchCallback()
    model, trainer = _fit([micro, counts], budget=_between(peaks, 32, 64))
    assert micro.micro_batch_size == BATCH // 4 and micro.micro_batches == 4
    assert micro.failed["train"] == 64 and micro.oom_retries == 2  # 128 -> 64 -> 32, failed sizes never retried
    assert trainer.global_step == ref_trainer.global_step == 12
    assert counts.counts == ref_counts.counts == [BATCH] * 12  # every optimizer step saw the whole batch, once
    _assert_same_weights(model, reference)


def test_accumulation_and_a_budget_that_tightens_mid_epoch(peaks):
    """Later batches need less memory than is left: the same batch is redone smaller, earlier gradients kept."""

    reference, _ = _fit(accumulate=2)
    micro = AutoMicroBatchCallback()
    model, _ = _fit([micro, Tighten(3, _between(peaks, 8, 16))], accumulate=2, budget=peaks[128] * 2)
    assert micro.micro_batch_size == 8 and micro.failed["train"] == 16 and micro.oom_retries == 4
    _assert_same_weights(model, reference)


def test_oom_in_backward_inside_an_accumulation_window_leaves_no_partial_gradients():
    """Backward fails after some micro-batches already added their gradients on top of the window's earlier batch."""
    peaks = {size: _peak(size, model_fn=HeavyBackwardNet) for size in (16, 32)}
    reference, _ = _fit(accumulate=2, model_fn=HeavyBackwardNet)
    HeavyBackward.events.clear()
    micro = AutoMicroBatchCallback(micro_batch_size=32)
    tighten = Tighten(3, _between(peaks, 16, 32))
    model, _ = _fit([micro, tighten], accumulate=2, model_fn=HeavyBackwardNet)
    assert micro.failed["train"] == 32 and micro.micro_batch_size == 16 and micro.oom_retries == 1
    batch_3 = HeavyBackward.events[3 * 8 : 3 * 8 + 4]  # batches 0-2: 4 micro-batches of 32, forward + backward
    assert batch_3 == [("forward", 32), ("backward", 32), ("forward", 16), ("backward", 16)]
    _assert_same_weights(model, reference)


def test_batchnorm_running_stats_are_restored_after_a_failed_attempt():
    peaks = {size: _peak(size, model_fn=BatchNormNet) for size in (32, 64)}
    reference, _ = _fit([AutoMicroBatchCallback(micro_batch_size=32)], model_fn=BatchNormNet)
    micro = AutoMicroBatchCallback()
    model, _ = _fit([micro], budget=_between(peaks, 32, 64), model_fn=BatchNormNet)
    assert micro.micro_batch_size == 32 and micro.oom_retries == 2
    _assert_same_weights(model, reference)
    for a, b in zip(model.net[1].buffers(), reference.net[1].buffers(), strict=True):
        assert torch.allclose(a.double(), b.double(), rtol=0, atol=1e-9)  # failed forwards left no trace


@pytest.mark.parametrize("seed", range(20))
def test_randomised_budgets_always_finish_with_the_reference_weights(seed, peaks):
    rng = random.Random(seed)
    accumulate = rng.choice([1, 2])
    reference, _ = _fit(batches=4, epochs=1, accumulate=accumulate)
    start = rng.choice(["auto", 128, 48, 7])
    micro = AutoMicroBatchCallback(micro_batch_size=start)
    budget = rng.randint(peaks[4], peaks[128 if start == "auto" else start] - 1)  # the starting size cannot fit
    tighten = Tighten(rng.randint(1, 3), rng.randint(peaks[4], budget))  # later batches need more than is left
    model, _ = _fit([micro, tighten], budget=budget, batches=4, epochs=1, accumulate=accumulate)
    assert micro.oom_retries >= 1  # the budget really bit: the run recovered from a real OOM
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


def test_16_mixed_with_a_grad_scaler_matches_the_same_split_without_failures():
    """fp16 autocast + GradScaler (CPU here; the GPU path is the same plugin): scale state survives the retries."""

    def kwargs():
        return {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]}

    def model_fn():
        return WideNet(dtype=torch.float32)

    peaks = {size: _peak(size, model_fn=model_fn, trainer_kwargs=kwargs()) for size in (32, 64)}
    reference, ref_trainer = _fit(
        [AutoMicroBatchCallback(micro_batch_size=32)], trainer_kwargs=kwargs(), model_fn=model_fn
    )
    micro = AutoMicroBatchCallback()
    model, trainer = _fit([micro], budget=_between(peaks, 32, 64), trainer_kwargs=kwargs(), model_fn=model_fn)
    assert micro.micro_batch_size == 32 and micro.oom_retries == 2
    assert trainer.precision_plugin.scaler.state_dict() == ref_trainer.precision_plugin.scaler.state_dict()
    _assert_same_weights(model, reference, tol=0)


def test_torch_compiled_module_recovers_and_matches(peaks):
    """`aot_eager` runs Dynamo + AOTAutograd like inductor does, without a C++ build (too slow for CI)."""
    reference, _ = _fit(batches=3, epochs=1)
    micro = AutoMicroBatchCallback()
    model = None

    def compiled():
        nonlocal model
        model = WideNet()
        return torch.compile(model, backend="aot_eager")

    _fit([micro], budget=_between(peaks, 32, 64), batches=3, epochs=1, model_fn=compiled)
    assert micro.micro_batch_size == 32 and micro.oom_retries == 2
    _assert_same_weights(model, reference)


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


@pytest.mark.slow  # DDP: two subprocesses
def test_ddp_oom_on_one_rank_moves_both_ranks_to_the_same_size(tmp_path):
    from tests.callbacks import ddp_micro_batch as ddp

    def run(out, size, limit):
        return run_ddp(ddp.__file__, out, size, limit)

    peaks = {size: run(tmp_path / f"measure{size}", size, 0)[1]["peak"] for size in (16, 32)}
    # the per-rank DDP estimate (one device's step plus DDP's gradient buckets) against the meter of rank 1
    from lightning_lowvram.planner import estimate_step_memory

    data = ddp.OrderedDigits(batch_size=ddp.PER_RANK_BATCH, dtype="float64")
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    for size in (16, 32):
        estimate = estimate_step_memory(WideNet(), batch, micro_batch_size=size, devices=2)
        assert abs(estimate.peak / peaks[size] - 1) <= 0.10, (size, estimate.peak, peaks[size])  # measured -2.6 %
        alone = estimate_step_memory(WideNet(), batch, micro_batch_size=size)  # without the buckets: -26 %
        assert alone.peak < 0.9 * peaks[size]
    ranks = run(tmp_path / "run", "auto", _between(peaks, 16, 32))
    assert [r["micro_batch_size"] for r in ranks] == [16, 16]  # rank 1 alone ran out at 64 and 32
    assert [r["micro"]["failed"]["train"] for r in ranks] == [32, 32]
    assert ranks[0]["micro"]["oom_retries"] == ranks[1]["micro"]["oom_retries"] == 2

    L.seed_everything(0)
    reference = WideNet()
    data = ddp.OrderedDigits(batch_size=2 * ddp.PER_RANK_BATCH, dtype="float64")
    quiet_trainer(max_epochs=1, limit_train_batches=ddp.BATCHES, limit_val_batches=0).fit(reference, datamodule=data)
    for name, value in reference.state_dict().items():
        assert torch.equal(ranks[0]["weights"][name], ranks[1]["weights"][name]), name  # identical across ranks
        assert torch.allclose(ranks[0]["weights"][name], value, rtol=0, atol=1e-9), name  # = single process


@pytest.mark.slow  # FSDP2: two subprocesses, three runs
def test_fsdp2_forced_micro_batches_and_an_oom_on_one_rank_equal_the_unsplit_fsdp2_run(tmp_path):
    """FSDP2 (fully_shard in configure_model, ModelParallelStrategy, 2 gloo processes), accumulation 2: forced
    micro-batches, and rank 1 alone out of memory at batch 1 (mid-window, the emulated budget's real OOM), give the
    unsplit run's weights; no hang (each run has a hard timeout), both ranks settle on the same size. FSDP2Strategy
    (what a plan across cards returns) on the module without configure_model gives the same weights."""
    from tests.callbacks import ddp_micro_batch as ddp
    from tests.callbacks import fsdp2_micro_batch as fsdp2

    def run(name, size, limit):
        return run_ddp(fsdp2.__file__, tmp_path / name, size, limit, 2, timeout=240)

    reference, forced = run("reference", "none", 0), run("forced", 16, 0)
    peak16, peak64 = forced[1]["peak"], reference[1]["peak"]
    # activations grow linearly with the micro-batch: this holds 16 samples, not 32; the budget starts at batch 1,
    # when the window's gradients (as many bytes as the parameters) already exist and are not counted
    ranks = run("oom", "auto", peak16 + (peak64 - peak16) // 6 - forced[1]["params"])
    assert [r["micro_batch_size"] for r in ranks] == [16, 16]
    assert [r["micro"]["failed"]["train"] for r in ranks] == [32, 32] and ranks[0]["micro"]["oom_retries"] == 2
    # lightning_lowvram's FSDP2Strategy on WideNet as it is (no configure_model: the strategy shards it), with the
    # callback's micro-batches of 16, trains the same
    ours = run_ddp(fsdp2.__file__, tmp_path / "ours", 16, 0, 2, "ours", timeout=240)  # and forced micro-batches
    for name, value in reference[0]["weights"].items():
        for r in (0, 1):
            assert torch.allclose(forced[r]["weights"][name], value, rtol=0, atol=1e-9), name
            assert torch.allclose(ranks[r]["weights"][name], value, rtol=0, atol=1e-9), name
            assert torch.allclose(ours[r]["weights"][name], value, rtol=0, atol=1e-9), name

    # the per-rank estimate (FSDP2 traced over a fake process group in this process) against each rank's meter
    from lightning_lowvram.planner import estimate_step_memory

    data = ddp.OrderedDigits(batch_size=2 * ddp.PER_RANK_BATCH, dtype="float64")
    data.setup("fit")
    window = next(iter(data.train_dataloader()))  # accumulation 2: a batch of 64 with the window's gradients present
    net = fsdp2.sharded_net()
    estimate = estimate_step_memory(net, window, micro_batch_size=ddp.PER_RANK_BATCH, devices=2, sharding="full")
    for r in (0, 1):
        assert abs(estimate.peak / reference[r]["peak"] - 1) <= 0.10, (estimate.peak, reference[r]["peak"])


class CudaNet(L.LightningModule):
    """Activations of ~8 GiB at batch 32768 (fp16 autocast, 2 GiB per hidden tensor): more than an 8 GB card holds."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4096, 32768), nn.ReLU(), nn.Linear(32768, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class CudaData(L.LightningDataModule):
    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        data = torch.utils.data.TensorDataset(torch.randn(65536, 4096, generator=g), torch.randint(0, 10, (65536,)))
        return torch.utils.data.DataLoader(data, batch_size=32768)


@pytest.mark.gpu
def test_a_real_cuda_oom_on_an_emulated_8gb_card_is_recovered_in_16_mixed():
    """set_per_process_memory_fraction caps the allocator at an RTX 3070's 8 GB: the allocator's own OOM, recovered."""

    def fit(callback, budget):
        L.seed_everything(0)
        model = CudaNet()
        trainer = quiet_trainer(accelerator="cuda", precision="16-mixed", max_steps=2, callbacks=[callback])
        with ExitStack() as stack:
            if budget:
                stack.enter_context(memory_budget("rtx3070_8gb", device="cuda"))
            trainer.fit(model, datamodule=CudaData())
        return model

    micro = AutoMicroBatchCallback()
    model = fit(micro, budget=True)
    assert micro.oom_retries >= 1 and micro.micro_batch_size < 32768
    reference = fit(AutoMicroBatchCallback(micro_batch_size=micro.micro_batch_size), budget=False)
    _assert_same_weights(model, reference, tol=1e-4)  # the same split; cuBLAS may pick other kernels


@pytest.mark.parametrize(
    ("strategy", "reason"),
    [("FSDPStrategy", "is not tested with the FSDPStrategy .FSDP1.: Lightning runs training_step inside"),
     ("DeepSpeedStrategy", "does not support the DeepSpeedStrategy: DeepSpeed runs its own gradient accumulation")],
)  # fmt: skip
def test_fsdp1_and_deepspeed_are_refused_at_setup_naming_the_reason(strategy, reason):
    """A stand-in trainer holding the real strategy class (FSDP1 here would need CUDA, DeepSpeed its package);
    FSDP2 (ModelParallelStrategy) is supported: tested with two processes above."""
    import lightning.pytorch.strategies as strategies

    cls = getattr(strategies, strategy)
    trainer = SimpleNamespace(strategy=cls.__new__(cls))
    with pytest.raises(MisconfigurationException, match=reason):
        AutoMicroBatchCallback().setup(trainer, WideNet(), "fit")


class TokenNet(L.LightningModule):
    """Loss = mean over non-padding tokens (ignore_index): micro-batches hold different token counts."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16, dtype=torch.float64)
        self.head = nn.Linear(16, 50, dtype=torch.float64)

    def training_step(self, batch, batch_idx):
        logits = self.head(self.emb(batch["tokens"]))
        assert len(batch["names"]) == len(batch["tokens"])  # per-sample strings sliced alongside
        return F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), ignore_index=-100)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class TokenData(L.LightningDataModule):
    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, 50, (96, 12), generator=g)
        lengths = torch.randint(1, 13, (96,), generator=g)
        targets = torch.where(torch.arange(12) < lengths[:, None], tokens.roll(-1, 1), -100)
        rows = [
            {"tokens": t, "targets": y, "names": f"doc{i}"}
            for i, (t, y) in enumerate(zip(tokens, targets, strict=True))
        ]
        return torch.utils.data.DataLoader(rows, batch_size=32)


def _tokens(batch):
    return (batch["targets"] != -100).sum()


@pytest.mark.parametrize(("count_fn", "equal"), [(_tokens, True), (None, False)])
def test_count_fn_weights_by_tokens_so_a_token_mean_loss_matches(count_fn, equal):
    def fit(callbacks):
        L.seed_everything(0)
        model = TokenNet()
        quiet_trainer(max_epochs=2, callbacks=callbacks).fit(model, datamodule=TokenData())
        return model

    reference = fit([])
    model = fit([AutoMicroBatchCallback(micro_batch_size=7, count_fn=count_fn)])
    same = all(
        torch.allclose(p, q, rtol=0, atol=1e-9) for p, q in zip(model.parameters(), reference.parameters(), strict=True)
    )
    assert same is equal  # weighting by samples is wrong for a token mean: the test can tell


def test_slice_fn_splits_a_batch_type_the_library_does_not_know():
    class Packed:  # e.g. a user's packed-sequence object
        def __init__(self, x, y):
            self.x, self.y = x, y

        def __len__(self):
            return len(self.x)

    class PackedNet(WideNet):
        def training_step(self, batch, batch_idx):
            return super().training_step((batch.x, batch.y), batch_idx)

    class PackedData(DigitsDataModule):
        def train_dataloader(self):
            def collate(rows):
                return Packed(torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]))

            return torch.utils.data.DataLoader(self.splits["train"], batch_size=self.batch_size, collate_fn=collate)

    sizes = []

    def slice_fn(batch, start, end):
        sizes.append(end - start)
        return Packed(batch.x[start:end], batch.y[start:end])

    L.seed_everything(0)
    data = PackedData(batch_size=BATCH, dtype="float64")
    data.setup("fit")
    micro = AutoMicroBatchCallback(micro_batch_size=50, slice_fn=slice_fn)
    quiet_trainer(max_steps=2, limit_val_batches=0, callbacks=[micro]).fit(PackedNet(), datamodule=data)
    assert sizes == [50, 50, 28] * 2


def test_list_state_metrics_are_rolled_back_on_retry(peaks):
    """A torchmetrics metric that keeps every prediction (a list state) counts each sample once after retries."""

    class Collects(WideNet):
        def __init__(self):
            super().__init__()
            self.collected = torchmetrics.CatMetric()

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.collected.update(torch.ones(len(x)))
            self.log("val/loss", F.cross_entropy(self(x), y))

    L.seed_everything(0)
    model, data = Collects(), DigitsDataModule(batch_size=BATCH, dtype="float64")
    data.setup("fit")
    micro = AutoMicroBatchCallback(micro_batch_size=32)
    with memory_budget(_between(peaks, 4, 8), device="cpu"):
        quiet_trainer(callbacks=[micro]).validate(model, datamodule=data, verbose=False)
    assert micro.oom_retries > 0 and len(model.collected.compute()) == len(data.splits["val"])
