import contextlib
import dataclasses

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_lowvram import FSDP2Strategy, GPUProfile, format_bytes, memory_budget, plan_callbacks
from lightning_lowvram.demo import DigitsMLP, TinyGPT, TinyTextDataModule
from lightning_lowvram.planner import estimate_step_memory, plan
from lightning_lowvram.planner.chart import chart
from lightning_lowvram.planner.estimate import PRECISIONS
from lightning_lowvram.planner.search import tensor_peak
from lightning_lowvram.planner.timing import traffic_of
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
    assert chosen.trainer_kwargs() == {"precision": chosen.chosen.precision}  # one card: no strategy, no devices

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
    from lightning_lowvram.cores.low_bit_base import low_bit_saving

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


@pytest.mark.usefixtures("no_cublas_workspace")
def test_a_bf16_base_under_bf16_mixed_when_it_is_what_fits_and_it_runs_under_the_budget_with_the_plain_steps():
    from lightning_lowvram import LowBitBaseCallback
    from lightning_lowvram.cores.low_bit_base import low_bit_saving

    batch = (torch.zeros(8, 64), torch.zeros(8, dtype=torch.long))
    fp32, mixed = (estimate_step_memory(DeepFrozen(), batch, device="cuda", precision=p).peak for p in PRECISIONS[:2])
    bf16 = estimate_step_memory(DeepFrozen(), batch, device="cuda", precision="bf16-mixed", bf16_base=True).peak
    saved, _ = low_bit_saving(DeepFrozen(), 16)
    assert mixed - bf16 >= saved  # half the frozen bytes, and autocast's bfloat16 copies of them are not made
    plain = min(fp32, mixed)
    card = _card((plain + bf16) / 2 / 0.9 / 2**30)  # the float32 base does not fit, a bfloat16 one does
    assert plan(DeepFrozen(), batch, card, allow_bf16_base=False).chosen is None
    assert plan(DeepFrozen(), batch, card, precisions=("32-true",)).chosen is None  # exact under bf16 autocast only
    for kwargs in ({}, {"allow_low_bit_base": True, "precisions": ("bf16-mixed",)}):  # NF4 fits too: bf16 is exact
        result = plan(DeepFrozen(), batch, card, **kwargs)
        chosen = result.chosen
        assert chosen is not None and chosen.base_bits == 16 and chosen.precision == "bf16-mixed", result.table()
        assert "bf16 frozen base" in chosen.label and tensor_peak(chosen) == bf16  # traced with the base converted
    assert "callbacks.lowvram_low_bit_base.bits=16" in result.overrides()
    callbacks = plan_callbacks(result)
    assert any(isinstance(c, LowBitBaseCallback) and c.bits == 16 for c in callbacks)
    data = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randn(16, 64), torch.randint(0, 10, (16,))), batch_size=8
    )

    def fit(callbacks, budget=None):
        torch.manual_seed(0)
        model = DeepFrozen()
        trainer = quiet_trainer(max_steps=2, limit_val_batches=0, callbacks=callbacks, **result.trainer_kwargs())
        with memory_budget(budget, device="cpu") if budget else contextlib.nullcontext():
            trainer.fit(model, data)
        return model

    with pytest.raises(torch.OutOfMemoryError):
        fit([], card)  # the float32 base does not fit the emulated card
    planned, reference = fit(plan_callbacks(result), card), fit([])
    assert torch.equal(planned.adapter.weight, reference.adapter.weight)  # the plain bf16-mixed steps, to the bit
    assert torch.equal(planned.head.weight, reference.head.weight)


def _state_heavy():  # parameters and AdamW state outweigh the activations of 4 x 16 tokens
    return TinyGPT(seq_len=16, d_model=256, n_head=4, n_layer=4)


def _linked(mib, interconnect=31.5, pcie=31.5):  # the tiny card with PCIe 4.0 links (GB/s per direction)
    return dataclasses.replace(_card(mib / 1024), interconnect_gbs=interconnect, pcie_gbs=pcie)


def test_across_cards_fsdp2_fits_what_one_card_cannot_and_yields_the_strategy_that_runs_it():
    batch = _batch(TinyTextDataModule(seq_len=16, batch_size=4))  # one rank's batch
    card = _linked(60)  # one such card holds this model only with CPU offload (the offload test below: 50 MiB)
    four = plan(_state_heavy(), batch, card, devices=4, precisions=("32-true",))
    chosen = four.chosen
    assert chosen is not None and chosen.devices == 4 and chosen.sharding in ("full", "grad_op")
    assert all(not c.fits for c in four.candidates if c.sharding == "none")  # DDP holds the whole state a rank
    alone = estimate_step_memory(
        _state_heavy(), batch, micro_batch_size=chosen.micro_batch_size, gpu=card, devices=4, sharding=chosen.sharding
    )  # fmt: skip
    assert chosen.estimate.peak == alone.peak and chosen.estimate.devices == 4  # the per-rank estimate, as traced
    assert "plan for 4 x tiny_card, per rank" in four.table() and "FSDP2" in chosen.label
    kwargs = four.trainer_kwargs()
    assert isinstance(kwargs["strategy"], FSDP2Strategy) and kwargs["devices"] == 4
    assert (
        kwargs["strategy"].reshard_after_forward == (chosen.sharding == "full") and not kwargs["strategy"].cpu_offload
    )
    assert {"strategy=fsdp2", "trainer.devices=4"} <= set(four.overrides())


def test_across_cards_ddp_when_the_state_fits_one_card():
    batch = _batch(TinyTextDataModule(seq_len=64, batch_size=32))  # activations outweigh the state
    four = plan(_gpt(), batch, _linked(400), devices=4, precisions=("32-true",))
    # the same traffic as FSDP2 grad_op (ZeRO-2 moves what DDP moves) without its copies in and out of the shards
    assert four.chosen.label == "DDP x4, 32-true, micro-batch 32", four.table()
    assert four.trainer_kwargs() == {"precision": "32-true", "strategy": "ddp", "devices": 4}
    assert {"+trainer.strategy=ddp", "trainer.devices=4"} <= set(four.overrides())


def test_the_step_time_charges_collectives_at_the_interconnect_and_offload_at_pcie():
    batch = _batch(TinyTextDataModule(seq_len=16, batch_size=4))
    fast, slow = _linked(400, interconnect=300.0), _linked(400, interconnect=15.75)
    params = sum(p.numel() * 4 for p in _state_heavy().parameters())
    for sharding, gathers in (("none", 0), ("grad_op", 1), ("full", 2)):
        e = estimate_step_memory(_state_heavy(), batch, gpu=fast, devices=4, sharding=sharding)
        moved = 0.75 * (gathers * params + params) if gathers else 2 * 0.75 * params  # ring all-gathers / all-reduce
        traffic = traffic_of(4, sharding, "none", params, params)
        assert traffic.interconnect == pytest.approx(moved)
        difference = e.work.seconds(slow, 1, traffic) - e.work.seconds(fast, 1, traffic)
        assert difference == pytest.approx(moved / 15.75e9 - moved / 300e9)
    offload = traffic_of(1, "full", "params", params, params)
    assert offload.interconnect == 0 and offload.pcie == 3 * params and offload.host_optimizer


def test_one_card_with_cpu_offload_when_nothing_else_fits():
    batch = _batch(TinyTextDataModule(seq_len=16, batch_size=4))
    card = _linked(50)
    result = plan(_state_heavy(), batch, card, precisions=("32-true",))
    chosen = result.chosen
    assert chosen is not None and chosen.offload == "params" and chosen.devices == 1 and chosen.estimate.host > 0
    assert not any(c.fits for c in result.candidates if c.offload == "none")  # nothing else fits one card
    assert chosen.label.startswith("FSDP2 + CPU offload") and " host" in result.table()
    assert chosen.step_time > min(c.step_time for c in result.candidates if c.offload == "none")  # slower
    strategy = result.trainer_kwargs()["strategy"]
    assert (
        isinstance(strategy, FSDP2Strategy) and strategy.cpu_offload and "strategy=fsdp2_offload" in result.overrides()
    )
    # a profile without PCIe bandwidth cannot price it: skipped and said so
    bare = plan(_state_heavy(), batch, dataclasses.replace(card, pcie_gbs=None), precisions=("32-true",))
    assert bare.chosen is None and "has no pcie_gbs" in bare.table()


def test_across_cards_bad_input():
    batch = _batch(TinyTextDataModule(seq_len=16, batch_size=4))
    with pytest.raises(ValueError, match="devices must be an integer >= 1, got 0"):
        plan(_state_heavy(), batch, _linked(60), devices=0)
    with pytest.raises(ValueError, match="'tiny_card' has no interconnect_gbs: planning across cards needs it"):
        plan(_state_heavy(), batch, _card(0.06), devices=2)
