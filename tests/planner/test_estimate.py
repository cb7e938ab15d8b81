import lightning as L
import pytest
import torch

from lightning_lowvram import ActivationCheckpointingCallback, AutoMicroBatchCallback, MemoryReportCallback
from lightning_lowvram.demo import DigitsDataModule, DigitsMLP, TinyGPT, TinyTextDataModule
from lightning_lowvram.planner import estimate_step_memory
from tests.helpers import quiet_trainer

DEMOS = {
    "digits_mlp": (lambda: DigitsMLP(hidden=256), lambda: DigitsDataModule(batch_size=64)),
    "tiny_gpt": (
        lambda: TinyGPT(seq_len=64, d_model=64, n_head=4, n_layer=2),
        lambda: TinyTextDataModule(batch_size=32),
    ),
    "tiny_gpt_dropout": (
        lambda: TinyGPT(seq_len=64, d_model=64, n_head=4, n_layer=2, dropout=0.1),
        lambda: TinyTextDataModule(batch_size=32),
    ),
}


def _measured(name, micro, precision, checkpointing):
    """The meter's peak of a real Lightning fit (3 optimizer steps: optimizer state exists) with the same settings."""
    make_model, make_data = DEMOS[name]
    L.seed_everything(0)
    model, data = make_model(), make_data()
    report = MemoryReportCallback(stages=["fit"], print_table=False)
    callbacks = [AutoMicroBatchCallback(micro_batch_size=micro), report]
    callbacks += [ActivationCheckpointingCallback()] if checkpointing else []
    quiet_trainer(max_steps=3, limit_val_batches=0, precision=precision, callbacks=callbacks).fit(
        model, datamodule=data
    )
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    return make_model(), batch, report.reports["fit"].total


@pytest.mark.parametrize("micro", [4, 8, 16, 32])
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize(("name", "checkpointing"), [("digits_mlp", False), ("tiny_gpt", False), ("tiny_gpt", True)])
def test_cpu_estimate_matches_the_meter_within_5_percent(name, checkpointing, precision, micro):
    model, batch, measured = _measured(name, micro, precision, checkpointing)
    estimate = estimate_step_memory(
        model, batch, micro_batch_size=micro, precision=precision, activation_checkpointing=checkpointing
    )
    assert estimate.device == "cpu" and estimate.allowance == 0
    assert abs(estimate.peak - measured) <= 0.05 * measured, (estimate, measured)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_cpu_estimate_with_dropout_matches_the_meter_within_5_percent(precision):
    model, batch, measured = _measured("tiny_gpt_dropout", 8, precision, False)
    estimate = estimate_step_memory(model, batch, micro_batch_size=8, precision=precision)
    assert abs(estimate.peak - measured) <= 0.05 * measured, (estimate, measured)


def _digits_batch(n=64):
    return torch.zeros(n, 64), torch.zeros(n, dtype=torch.long)


def test_a_cuda_card_adds_rounding_foreach_temporaries_and_the_context_allowance():
    model = TinyGPT(seq_len=64, d_model=64, n_head=4, n_layer=2)
    batch = (torch.zeros(8, 64, dtype=torch.long), torch.zeros(8, 64, dtype=torch.long))
    cpu = estimate_step_memory(model, batch)
    card = estimate_step_memory(model, batch, gpu="rtx3060_12gb")
    assert card.device == "cuda" and card.gpu == "rtx3060_12gb" and card.allowance == 500 * 2**20
    assert card.peak - card.allowance >= cpu.peak  # 512-byte rounding only adds
    assert card.fits(11 * 2**30) and not card.fits(card.peak)


def test_estimating_allocates_nothing_real_and_leaves_the_module_alone():
    model = DigitsMLP(hidden=64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    estimate = estimate_step_memory(model, _digits_batch())
    assert set(estimate.by_phase) == {"forward", "backward", "optimizer"}
    assert estimate.by_category["optimizer"] > 0  # two steps: AdamW state exists
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"gpu": "rtx9090_1gb"}, ValueError, "rtx9090_1gb"),
        ({"precision": "fp8"}, ValueError, "precision must be one of"),
        ({"micro_batch_size": 0}, ValueError, "micro_batch_size must be >= 1"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        estimate_step_memory(DigitsMLP(hidden=16), _digits_batch(), **kwargs)


def test_a_batch_that_does_not_match_the_module_is_a_clear_error():
    with pytest.raises(ValueError, match="the example batch does not fit DigitsMLP.training_step"):
        estimate_step_memory(DigitsMLP(hidden=16), (torch.zeros(8, 32), torch.zeros(8, dtype=torch.long)))


class DataDependent(DigitsMLP):
    """A step whose shapes depend on values (boolean indexing): fake tensors cannot trace it."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        keep = x[:, 0] >= 0  # data-dependent number of rows
        return torch.nn.functional.cross_entropy(self(x[keep]), y[keep])


def test_a_step_fake_tensors_cannot_trace_is_measured_for_real():
    estimate = estimate_step_memory(DataDependent(hidden=32), (torch.rand(16, 64), torch.zeros(16, dtype=torch.long)))
    assert estimate.method == "measured" and estimate.by_category["parameters"] > 0
    assert estimate_step_memory(DigitsMLP(hidden=32), _digits_batch()).method == "fake"


def test_8bit_optimizer_state_is_modelled_as_torchao_stores_it():
    from lightning_lowvram.cores.optimizer_8bit import adam_state_bytes

    model = DigitsMLP(hidden=512)
    plain = estimate_step_memory(model, _digits_batch())
    eight = estimate_step_memory(model, _digits_batch(), optimizer_8bit=True)
    fp32, eight_bit = (adam_state_bytes(model.parameters(), eight_bit=b) for b in (False, True))
    assert plain.by_category["optimizer"] >= fp32  # the moments plus the step's temporaries
    assert plain.by_category["optimizer"] - eight.by_category["optimizer"] == fp32 - eight_bit
    assert plain.peak - eight.peak == fp32 - eight_bit > 0
    # every phase holds the moments: each phase's peak is lower by as much (what longest_sequence reads per phase)
    assert {p: plain.by_phase[p] - v for p, v in eight.by_phase.items()} == dict.fromkeys(
        plain.by_phase, fp32 - eight_bit
    )
    assert max(eight.by_phase.values()) + eight.allowance == eight.peak


@pytest.mark.usefixtures("no_cublas_workspace")
def test_cuda_rules_keep_dropout_masks_as_bool():
    class WithDropout(DigitsMLP):
        def __init__(self):
            super().__init__(hidden=1024)
            self.drop = torch.nn.Dropout(0.1)

        def forward(self, x):
            return self.net[2](self.drop(self.net[1](self.net[0](x))))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)  # no optimizer temporaries to tell apart

    batch = (torch.zeros(256, 64), torch.zeros(256, dtype=torch.long))
    cpu = estimate_step_memory(WithDropout(), batch)
    cuda = estimate_step_memory(WithDropout(), batch, device="cuda")
    mask_values = 256 * 1024
    # the forward keeps the mask for backward: float32 on CPU, bool under CUDA rules
    assert cpu.by_phase["forward"] - cuda.by_phase["forward"] >= 3 * mask_values - 4096, (cpu, cuda)
