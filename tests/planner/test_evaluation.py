"""Evaluation estimates (planner/evaluation.py) against the meter's real CPU run of the same step, as Lightning runs
it (eval mode, inference_mode), plain and with the blocks streamed through accelerate's hooks."""

import pytest
import torch

from lightning_lowvram import MemoryMeter, estimate_eval_memory
from lightning_lowvram.cores.streaming import stream_blocks, unstream_blocks
from lightning_lowvram.demo import DigitsMLP, TinyGPT
from lightning_lowvram.planner.evaluation import STAGES
from tests.real_models.models import HFModule, causal_lm, hf_batches


def _measured(module, batch, stage, resident=None):
    module.eval()
    if resident is not None:
        stream_blocks(module, "cpu", resident)
    try:
        with MemoryMeter(module) as meter, torch.inference_mode():
            output = getattr(module, STAGES[stage])(batch, 0)
            del output
    finally:
        if resident is not None:
            unstream_blocks(module)
    return meter.peak.total


def test_extrapolated_blocks_and_the_demos():
    module = HFModule(causal_lm("llama", hidden=64, num_hidden_layers=8))
    batch = next(iter(hf_batches("llama", n=4, batch_size=4, seq=64)))
    estimate = estimate_eval_memory(module, batch, "predict")
    assert estimate.traced_blocks == (2, 3, 8)
    assert estimate.peak == pytest.approx(_measured(module, batch, "predict"), rel=0.05)
    streamed = estimate_eval_memory(module, batch, "predict", resident_blocks=0)
    assert streamed.peak == pytest.approx(_measured(module, batch, "predict", 0), rel=0.05)
    gpt = TinyGPT(n_layer=2)
    text = (torch.zeros(4, 32, dtype=torch.long), torch.zeros(4, 32, dtype=torch.long))
    assert estimate_eval_memory(gpt, text, "test").peak == pytest.approx(_measured(gpt, text, "test"), rel=0.05)
    mlp = DigitsMLP()
    digits = (torch.zeros(64, 64), torch.zeros(64, dtype=torch.long))
    for stage in STAGES:
        got = estimate_eval_memory(mlp, digits, stage).peak
        assert got == pytest.approx(_measured(mlp, digits, stage), rel=0.05)


def test_a_meta_device_model_estimates_as_the_real_one():
    module = HFModule(causal_lm("llama", hidden=64, num_hidden_layers=4))
    batch = next(iter(hf_batches("llama", n=2, batch_size=2, seq=32)))
    real = estimate_eval_memory(module, batch, "predict", gpu="rtx3060_12gb")
    with torch.device("meta"):
        meta = HFModule(causal_lm("llama", hidden=64, num_hidden_layers=4))
    assert estimate_eval_memory(meta, batch, "predict", gpu="rtx3060_12gb").peak == real.peak
    assert real.device == "cuda" and real.allowance > 0
    # bf16 weights: the parameters halve
    half = estimate_eval_memory(module, batch, "predict", gpu="rtx3060_12gb", precision="bf16-true")
    assert half.by_category["parameters"] == pytest.approx(real.by_category["parameters"] / 2, rel=0.01)


def test_prefetch_holds_a_second_block_on_cuda_and_streaming_costs_pcie_time():
    module = HFModule(causal_lm("llama", hidden=64, num_hidden_layers=4))
    batch = next(iter(hf_batches("llama", n=2, batch_size=2, seq=32)))
    cpu = estimate_eval_memory(module, batch, "validate", resident_blocks=0)
    cuda = estimate_eval_memory(module, batch, "validate", resident_blocks=0, gpu="rtx3060_12gb")
    plain = estimate_eval_memory(module, batch, "validate", gpu="rtx3060_12gb")
    block = cpu.host // 4
    assert cuda.peak - cuda.allowance >= cpu.peak + block  # the next block's copy beside the current one
    assert cuda.step_time("rtx3060_12gb") > plain.step_time("rtx3060_12gb")  # its weights cross PCIe
    # the copies: the streamed bytes at the profile's 31.5 GB/s, beside compute on the same ops
    extra = cuda.step_time("rtx3060_12gb") - plain.step_time("rtx3060_12gb")
    assert extra == pytest.approx(cuda.streamed / 31.5e9, rel=0.01)


def test_bad_input_is_one_line():
    mlp = DigitsMLP()
    digits = (torch.zeros(8, 64), torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError, match="stage must be one of 'validate', 'test', 'predict', got 'fit'"):
        estimate_eval_memory(mlp, digits, "fit")
    with pytest.raises(ValueError, match="DigitsMLP has no repeated blocks"):
        estimate_eval_memory(mlp, digits, resident_blocks=0)
    message = r"resident_blocks=3: TinyGPT has 2 blocks to stream \(blocks.0 ... blocks.1\); allowed 0 to 2"
    with pytest.raises(ValueError, match=message):
        estimate_eval_memory(TinyGPT(n_layer=2), (torch.zeros(2, 8, dtype=torch.long),) * 2, resident_blocks=3)
    with pytest.raises(ValueError, match="the example batch does not fit DigitsMLP.validation_step"):
        estimate_eval_memory(mlp, (torch.zeros(8, 10), torch.zeros(8, dtype=torch.long)))
    with pytest.raises(ValueError, match="micro_batch_size must be >= 1, got 0"):
        estimate_eval_memory(mlp, digits, micro_batch_size=0)
