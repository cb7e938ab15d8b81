import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_lowvram import AutoMicroBatchCallback, DynamicQuantCallback, PruningCallback, load_quantized
from lightning_lowvram.cores.dynamic_quant import linear_bytes, quantize_dynamic_int8, quantized_layers
from lightning_lowvram.demo import DigitsDataModule, DigitsMLP
from tests.helpers import RecordingLogger, quiet_trainer


@pytest.fixture(scope="module")
def trained():
    L.seed_everything(0)
    model, data = DigitsMLP(hidden=128), DigitsDataModule(batch_size=64)
    quiet_trainer(max_epochs=4, limit_val_batches=0).fit(model, datamodule=data)
    return model, data


def test_test_stage_runs_int8_and_compares_with_float_on_the_modules_own_metrics(trained):
    model, data = trained
    before = {k: v.clone() for k, v in model.state_dict().items()}
    logger, quant = RecordingLogger(), DynamicQuantCallback()
    result = quiet_trainer(callbacks=[quant], logger=logger).test(model, datamodule=data, verbose=False)[0]
    rows = quant.comparison["test"]
    assert abs(rows["test/acc"]["int8"] - rows["test/acc"]["float"]) <= 0.01  # within 1 point
    assert result["test/acc"] == pytest.approx(rows["test/acc"]["int8"])  # Lightning's own test ran in int8
    assert rows["linear_bytes"]["int8"] <= 0.27 * rows["linear_bytes"]["float"]
    assert rows["model_bytes"]["int8"] < rows["model_bytes"]["float"] and rows["latency_ms"]["int8"] > 0
    assert logger.metrics["lowvram/quant/test/test/acc/int8"] == rows["test/acc"]["int8"]
    assert quant.summary().startswith("3 layer(s) int8\nfloat vs int8 (test)")
    # the float model is untouched: same layers, same weights, ready to train on
    assert all(type(m) is nn.Linear for m in model.net if not isinstance(m, nn.ReLU))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_predict_returns_the_int8_models_outputs_and_the_artifact_round_trips(trained, tmp_path):
    model, data = trained
    path = tmp_path / "digits_int8.pt"
    quant = DynamicQuantCallback(stages=["predict"], save_path=str(path))
    predicted = torch.cat(quiet_trainer(callbacks=[quant]).predict(model, datamodule=data))
    int8 = quantize_dynamic_int8(model.eval())
    x = data.splits["test"].tensors[0]
    assert torch.equal(predicted, int8(x).argmax(-1))
    loaded = load_quantized(DigitsMLP(hidden=128), path)  # a fresh float module, torch.load(weights_only=True)
    assert quantized_layers(loaded) == ["net.0", "net.2", "net.4"]
    assert torch.equal(loaded(x), int8(x))


class FrozenBase(L.LightningModule):
    """A frozen 'pretrained' base between a trainable input adapter and a trainable head."""

    def __init__(self):
        super().__init__()
        self.adapter = nn.Linear(64, 64)
        self.base = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU())
        self.base.requires_grad_(False)
        self.head = nn.Linear(512, 10)

    def forward(self, x):
        return self.head(self.base(x + self.adapter(x)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)


def test_freeze_base_makes_frozen_layers_int8_and_adapters_still_train():
    L.seed_everything(0)
    model = FrozenBase()
    float_base = linear_bytes(model.base)
    adapter, head = model.adapter.weight.detach().clone(), model.head.weight.detach().clone()
    quant = DynamicQuantCallback(stages=[], freeze_base=True)
    with pytest.deprecated_call(match=r"use LowBitBaseCallback\(bits=8\)"):  # one frozen-base path, kept working
        quiet_trainer(max_steps=5, limit_val_batches=0, callbacks=[quant]).fit(model, datamodule=DigitsDataModule())
    assert quant.frozen == ["base.0", "base.2"] and quantized_layers(model) == ["base.0", "base.2"]
    assert linear_bytes(model.base) <= 0.27 * float_base
    assert not torch.equal(model.head.weight, head)
    assert not torch.equal(model.adapter.weight, adapter)  # its gradient came back through the int8 base


def test_freeze_base_refuses_a_backend_that_cuts_autograd_and_needs_frozen_layers():
    with pytest.raises(ValueError, match="backend='torch_ao' cuts autograd"):
        quiet_trainer(max_steps=1, callbacks=[DynamicQuantCallback(freeze_base=True, backend="torch_ao")]).fit(
            FrozenBase(), datamodule=DigitsDataModule()
        )
    with pytest.raises(ValueError, match="found no frozen Linear layer"):
        quiet_trainer(max_steps=1, callbacks=[DynamicQuantCallback(freeze_base=True)]).fit(
            DigitsMLP(hidden=16), datamodule=DigitsDataModule()
        )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"stages": ["train"]}, "stages must be among 'validate', 'test', 'predict', got \\['train'\\]"),
        ({"backend": "int4"}, "backend must be 'auto', 'measure' or one of"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DynamicQuantCallback(**kwargs)


def test_after_structured_pruning_and_with_eval_micro_batching():
    L.seed_everything(0)
    model, data = DigitsMLP(hidden=128), DigitsDataModule(batch_size=64)
    micro = AutoMicroBatchCallback(eval_micro_batch_size=16)
    quant = DynamicQuantCallback(stages=["validate", "test"])
    trainer = quiet_trainer(
        max_epochs=3, callbacks=[PruningCallback(0.5, schedule="once"), micro, quant], num_sanity_val_steps=0
    )
    trainer.fit(model, datamodule=data)
    trainer.test(model, datamodule=data, verbose=False)
    assert model.net[0].out_features == 64
    rows = quant.comparison["test"]
    assert abs(rows["test/acc"]["int8"] - rows["test/acc"]["float"]) <= 0.01
    assert "val/acc" in quant.comparison["validate"]
    assert micro.sizes["test"] == 16 and micro.micro_batch_size is not None
    assert all(type(m) is nn.Linear for m in model.net if not isinstance(m, nn.ReLU))  # float again after each stage


def test_a_warning_says_when_int8_was_slower():
    from types import SimpleNamespace

    quant = DynamicQuantCallback(print_table=False)
    trainer = SimpleNamespace(loggers=[], global_step=0)
    with pytest.warns(UserWarning, match=r"int8 \(None\) took 2.00x the float time per test batch"):
        quant._report(trainer, "test", {"latency_ms": 1.0}, {"latency_ms": 2.0})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quant._report(trainer, "test", {"latency_ms": 2.0}, {"latency_ms": 1.0})  # faster: no warning


def test_measuring_the_backends_does_not_count_in_the_stages_metrics():
    from lightning.pytorch.callbacks import Callback

    class Probe(Callback):
        def on_test_start(self, trainer, pl_module):
            self.updates = pl_module.test_acc._update_count

    probe = Probe()
    quant = DynamicQuantCallback(stages=("test",), backend="measure", compare=False, print_table=False)
    trainer = L.Trainer(callbacks=[quant, probe], logger=False, enable_progress_bar=False, enable_checkpointing=False)
    model = DigitsMLP(hidden=32)
    trainer.test(model, DigitsDataModule(), verbose=False)
    assert quant.measured["test"] and probe.updates == 0  # 4 timed runs per path happened, none counted


def test_a_model_without_a_layer_to_convert_says_so():
    class ConvOnly(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv1d(4, 4, 1)

        def test_step(self, batch, batch_idx):
            self.log("out", self.conv(batch[0]).sum())

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(4, 4, 3)), batch_size=2)
    with pytest.warns(UserWarning, match=r"no layer converted to int8 in ConvOnly \(0 kept in float, 0 frozen"):
        quiet_trainer(callbacks=[DynamicQuantCallback(stages="test", compare=False)]).test(ConvOnly(), loader)
