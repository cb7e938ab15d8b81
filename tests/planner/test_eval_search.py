"""Evaluation plans (planner/eval_search.py): the fastest setting that fits, priced by the step-time model, and
checked by running it under the emulated card."""

import dataclasses

import lightning as L
import pytest
import torch

from lightning_lowvram import MemoryMeter, gpu_profile, memory_budget, plan_eval
from lightning_lowvram.compose import eval_plan_callbacks
from lightning_lowvram.demo import DigitsMLP
from tests.real_models.models import HFModule, causal_lm, hf_batches


@pytest.fixture(scope="module")
def llama():
    module = HFModule(causal_lm("llama", hidden=128, num_hidden_layers=8))  # blocks: most of the weights
    loader = hf_batches("llama", n=8, batch_size=4, seq=16)
    return module, loader, next(iter(loader))


def _card(nbytes):  # a card whose usable bytes are nbytes, with the time model of an rtx3060
    return dataclasses.replace(gpu_profile("rtx3060_12gb"), name="tiny", memory_gib=nbytes / 2**30, context_mib=0.0)


def test_a_roomy_card_runs_as_is(llama):
    module, _, batch = llama
    chosen = plan_eval(module, batch, "rtx3060_12gb", "predict")
    assert chosen.chosen.label == "eval micro-batch 4" and eval_plan_callbacks(chosen) == []
    assert "eval micro-batch 4" in chosen.table() and chosen.overrides() == []


def test_a_card_smaller_than_the_weights_streams_and_the_run_fits(llama):
    module, loader, batch = llama
    weights = sum(p.numel() * p.element_size() for p in module.parameters())
    card = _card(weights // 2)
    chosen = plan_eval(module, batch, card, "predict")
    assert chosen.candidates[0].fits is False
    picked = chosen.chosen
    assert picked.resident_blocks is not None and picked.estimate.host > 0
    assert picked.seconds > chosen.candidates[0].seconds  # streaming costs PCIe time, and the table says so
    assert "streamed" in chosen.table()
    assert "lowvram_weight_streaming" in chosen.overrides()[0]
    assert f"callbacks.lowvram_weight_streaming.resident_blocks={picked.resident_blocks}" in chosen.overrides()
    expected = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False).predict(module, loader)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                        callbacks=eval_plan_callbacks(chosen))  # fmt: skip
    with memory_budget(card.usable_bytes), MemoryMeter() as meter:
        got = trainer.predict(module, loader)
    assert meter.peak.total <= picked.tensor_peak  # the prediction is on the safe side of the run
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_low_bit_weights_only_when_allowed(llama):
    module, _, batch = llama
    weights = sum(p.numel() * p.element_size() for p in module.parameters())
    card = _card(weights // 2)
    assert all(c.bits == 0 for c in plan_eval(module, batch, card, "validate").candidates)
    allowed = plan_eval(module, batch, card, "validate", allow_low_bit_base=True)
    assert {c.bits for c in allowed.candidates} == {0, 4, 8}
    int8 = next(c for c in allowed.candidates if c.bits == 8 and c.micro_batch_size == 4)
    plain = next(c for c in allowed.candidates if c.bits == 0 and c.resident_blocks is None and c.micro_batch_size == 4)
    assert int8.tensor_peak < plain.tensor_peak and "int8 weights" in int8.label


def test_a_model_without_blocks_is_not_streamed():
    chosen = plan_eval(DigitsMLP(), (torch.zeros(64, 64), torch.zeros(64, dtype=torch.long)), "rtx3060_12gb")
    assert all(c.resident_blocks is None for c in chosen.candidates)
    with pytest.raises(ValueError, match="gpu='cpu' has no memory size to plan for"):
        plan_eval(DigitsMLP(), (torch.zeros(8, 64), torch.zeros(8, dtype=torch.long)), "cpu")
