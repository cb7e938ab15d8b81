"""The estimator and the planner on the architectures users bring: dict batches, padding, tied weights, GQA."""

import dataclasses

import pytest
import torch
from peft import LoraConfig, get_peft_model

from lightning_lowvram import AutoMicroBatchCallback, MemoryReportCallback, gpu_profile
from lightning_lowvram.planner import estimate_step_memory, plan
from tests.helpers import quiet_trainer
from tests.real_models.models import NAMES, HFModule, build, hf_batches, hf_model


def _measured(name, micro, precision):
    """The meter's peak of a real Lightning fit (3 optimizer steps) at the same micro-batch and precision."""
    module, loader = build(name)
    report = MemoryReportCallback(stages=["fit"], print_table=False)
    callbacks = [AutoMicroBatchCallback(micro_batch_size=micro), report]
    quiet_trainer(max_steps=3, precision=precision, callbacks=callbacks).fit(module, loader)
    return report.reports["fit"].total


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("name", NAMES)
def test_cpu_estimate_matches_the_meter_within_5_percent(name, precision):
    measured = _measured(name, 4, precision)
    module, loader = build(name)
    estimate = estimate_step_memory(module, next(iter(loader)), micro_batch_size=4, precision=precision)
    assert estimate.method == "fake"  # traced on fake tensors, not the measured fallback
    assert abs(estimate.peak - measured) <= 0.05 * measured, (estimate, measured)


@pytest.mark.usefixtures("no_cublas_workspace")
@pytest.mark.parametrize("name", NAMES)
def test_plan_runs_and_fits_a_card_the_plain_step_does_not(name):
    module, loader = build(name)
    batch = next(iter(loader))
    plain = estimate_step_memory(module, batch, device="cuda")
    card = dataclasses.replace(gpu_profile("rtx3070_8gb"), memory_gib=plain.peak * 0.9 / 2**30, context_mib=0)
    chosen = plan(build(name)[0], batch, card)
    assert not chosen.candidates[0].fits
    assert chosen.chosen is not None and chosen.chosen.fits, chosen.table()


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("load", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["gpt2", "llama"])  # tied (GPT-2) and untied (this Llama) heads
def test_a_bf16_true_estimate_matches_the_meter(name, load, lora):
    """bf16 weights as LoRA users load them: with or without peft, loaded in float32 or bf16 (issue 23, item 4)."""

    def module():
        model = hf_model(name).to(load)
        if lora:
            model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
        return HFModule(model)

    loader = hf_batches(name)
    report = MemoryReportCallback(stages=["fit"], print_table=False)
    callbacks = [AutoMicroBatchCallback(micro_batch_size=4), report]
    quiet_trainer(max_steps=3, precision="bf16-true", callbacks=callbacks).fit(module(), loader)
    measured = report.reports["fit"].total
    estimate = estimate_step_memory(module(), next(iter(loader)), micro_batch_size=4, precision="bf16-true")
    assert estimate.method == "fake"
    assert abs(estimate.peak - measured) <= 0.05 * measured, (estimate, measured)
