import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_lowvram import GPUProfile, format_bytes, memory_budget, plan_callbacks
from lightning_lowvram.demo import DigitsMLP, TinyGPT, TinyTextDataModule
from lightning_lowvram.planner import estimate_step_memory, plan
from lightning_lowvram.planner.chart import chart
from lightning_lowvram.planner.search import tensor_peak
from tests.helpers import quiet_trainer


def _gpt():
    return TinyGPT(seq_len=64, d_model=64, n_head=4, n_layer=4)


def _batch(data):
    data.setup("fit")
    return next(iter(data.train_dataloader()))


def _card(gib):  # an RTX 3070's compute, less memory
    return GPUProfile(
        name="tiny_card", memory_gib=gib, bf16=True, context_mib=0, compute_capability=(8, 6),
        fp32_tflops=20.3, tensor_tflops=40.6, bandwidth_gbs=448,
    )  # fmt: skip


def test_the_plan_fits_a_card_the_plain_setup_overflows_and_trains_there_without_oom(tmp_path):
    data = TinyTextDataModule(seq_len=64, batch_size=32)
    batch = _batch(data)
    plain = estimate_step_memory(_gpt(), batch, device="cuda")
    card = _card(plain.peak * 0.6 / 2**30)
    chosen = plan(_gpt(), batch, card)
    assert chosen.candidates[0].label == "32-true, micro-batch 32" and not chosen.candidates[0].fits
    assert (
        chosen.chosen is not None
        and chosen.chosen.fits
        and chosen.chosen.estimate.peak - chosen.chosen.estimate.allowance <= chosen.budget
    )
    assert "->" in chosen.table() and "nothing fits" not in chosen.table()
    assert chart(chosen, str(tmp_path / "plan.png")) and (tmp_path / "plan.png").read_bytes()[:4] == b"\x89PNG"
    overrides = chosen.overrides()
    assert overrides[0] == f"trainer.precision={chosen.chosen.precision}"

    def fit(callbacks, **kwargs):
        L.seed_everything(0)
        trainer = quiet_trainer(max_steps=3, limit_val_batches=0, callbacks=callbacks, **kwargs)
        with memory_budget(card, device="cpu"):
            trainer.fit(_gpt(), datamodule=data)
        return trainer

    with pytest.raises(torch.OutOfMemoryError):
        fit([])  # the plain setup does not fit the emulated card
    trainer = fit(plan_callbacks(chosen), **chosen.trainer_kwargs())  # the plan does
    assert trainer.global_step == 3


def test_nothing_fits_says_the_smallest_reachable_peak():
    data = TinyTextDataModule(seq_len=64, batch_size=8)
    result = plan(_gpt(), _batch(data), _card(0.0001))
    assert result.chosen is None and plan_callbacks(result) == [] and result.overrides() == []
    smallest = min(result.candidates, key=lambda c: c.estimate.peak - c.estimate.allowance)
    peak = smallest.estimate.peak - smallest.estimate.allowance
    assert f"nothing fits: the smallest predicted tensor peak is {format_bytes(peak)}" in result.table()
    assert f" {format_bytes(peak)} " in result.table().split("nothing fits")[0]  # the line agrees with the table


def test_bad_input():
    batch = (torch.zeros(8, 64), torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError, match="rtx9090"):
        plan(DigitsMLP(), batch, "rtx9090")
    with pytest.raises(ValueError, match="has no memory size to plan for"):
        plan(DigitsMLP(), batch, "cpu")
    with pytest.raises(ValueError, match="margin must be in"):
        plan(DigitsMLP(), batch, "rtx3060_12gb", margin=1.5)
    for field, value in (("memory_gib", 0.0), ("memory_gib", -8.0), ("free_gib", 0.0)):  # non-positive budgets
        with pytest.raises(ValueError, match=f"gpu.{field} must be > 0"):
            plan(DigitsMLP(), batch, GPUProfile(name="card", **{field: value}))
    with pytest.raises(ValueError, match="leaves no memory for tensors"):
        plan(DigitsMLP(), batch, GPUProfile(name="card", memory_gib=0.4, context_mib=500))


def test_when_optimizer_state_dominates_the_plan_takes_8bit_state():
    from lightning_lowvram import EightBitOptimizerCallback

    batch = (torch.zeros(8, 64), torch.zeros(8, dtype=torch.long))
    model = DigitsMLP(hidden=2048, depth=3)  # 8.5M parameters, tiny activations: micro-batching cannot help
    plain = estimate_step_memory(model, batch, device="cuda")
    eight = estimate_step_memory(model, batch, device="cuda", optimizer_8bit=True)
    result = plan(model, batch, _card((plain.peak + eight.peak) / 2 / 0.9 / 2**30))
    assert result.chosen is not None and result.chosen.optimizer_8bit and "8-bit optimizer" in result.chosen.label
    assert any(isinstance(c, EightBitOptimizerCallback) for c in plan_callbacks(result))
    assert "lowvram_optimizer_8bit" in result.overrides()[1]


class DeepFrozen(L.LightningModule):
    """Eight frozen 512 x 512 layers (a 'pretrained' base, whole NF4 blocks) under a trainable adapter and head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.adapter, self.head = nn.Linear(64, 512), nn.Linear(512, 10)
        self.base = nn.Sequential(*[nn.Linear(512, 512) for _ in range(8)]).requires_grad_(False)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.head(self.base(self.adapter(batch[0]))), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)


@pytest.mark.usefixtures("no_cublas_workspace")
def test_a_low_bit_frozen_base_only_when_allowed_and_nf4_when_int8_is_not_enough():
    from lightning_lowvram import LowBitBaseCallback
    from lightning_lowvram.lowbit import low_bit_saving

    batch = (torch.zeros(8, 64), torch.zeros(8, dtype=torch.long))
    model = DeepFrozen()
    plain = estimate_step_memory(model, batch, device="cuda").peak
    (int8, transient8), (nf4, transient) = low_bit_saving(model, 8), low_bit_saving(model, 4)
    between = plain - (int8 + nf4) / 2 + (transient8 + transient) / 2  # an int8 base does not fit, an NF4 one does
    card = _card(between / 0.9 / 2**30)
    assert plan(model, batch, card).chosen is None
    assert plan(model, batch, card, allow_int8_base=True).chosen is None
    allowed = plan(model, batch, card, allow_low_bit_base=True)
    assert allowed.chosen is not None and allowed.chosen.base_bits == 4 and "NF4 frozen base" in allowed.chosen.label
    # byte for byte: the float base's parameters less what NF4 saves, plus one layer's dequantization
    assert tensor_peak(allowed.chosen) == plain - nf4 + transient
    assert any(isinstance(c, LowBitBaseCallback) and c.bits == 4 for c in plan_callbacks(allowed))
    assert "callbacks.lowvram_low_bit_base.bits=4" in allowed.overrides()
    roomier = plan(model, batch, _card((plain - int8 / 2 + transient8) / 0.9 / 2**30), allow_int8_base=True)
    assert roomier.chosen is not None and roomier.chosen.int8_base
