"""The step-time model: work counted on the trace, priced per card, and the planner's ranking by it."""

import pytest
import torch
from torch import nn

from lightning_lowvram import GPUProfile, gpu_profile
from lightning_lowvram.demo import DigitsMLP, TinyGPT
from lightning_lowvram.planner import estimate_step_memory, plan
from lightning_lowvram.planner.timing import WorkCounter, rates_of


def _gpt_batch(n=32, seq=64):
    return torch.zeros(n, seq, dtype=torch.long), torch.zeros(n, seq, dtype=torch.long)


def test_work_is_counted_by_kind_and_views_launch_nothing():
    a, b, image, kernel = torch.ones(4, 8), torch.ones(8, 2), torch.ones(1, 3, 8, 8), torch.ones(4, 3, 3, 3)
    with WorkCounter() as counter:
        a.t().contiguous().view(-1)
        _ = a.bfloat16() @ b.bfloat16()
        nn.functional.conv2d(image, kernel)
    kinds = [kind for kind, *_ in counter.ops]
    assert kinds == ["fp32", "fp32", "fp32", "tensor", "tf32"]  # clone, two casts, the bf16 matmul, the conv
    assert counter.ops[3][1] == 2 * 4 * 8 * 2


def test_bf16_is_cheaper_on_a_tensor_core_card_and_checkpointing_adds_the_recompute():
    model, batch = TinyGPT(seq_len=64, d_model=256, n_head=4, n_layer=2), _gpt_batch()
    fp32 = estimate_step_memory(model, batch, gpu="a100_40gb")
    bf16 = estimate_step_memory(model, batch, gpu="a100_40gb", precision="bf16-mixed")
    ckpt = estimate_step_memory(model, batch, gpu="a100_40gb", activation_checkpointing=True)
    assert bf16.work.flops()["tensor"] == fp32.work.flops()["fp32"] > 0
    assert bf16.step_time("a100_40gb") < fp32.step_time("a100_40gb")
    assert fp32.work.flops()["fp32"] < ckpt.work.flops()["fp32"] <= 1.5 * fp32.work.flops()["fp32"]
    assert fp32.step_time("a100_40gb", 4) > 3 * fp32.step_time("a100_40gb", 1) - 3 * fp32.step_time("a100_40gb", 0)


def test_extrapolated_peaks_match_traced_ones():
    model, batch = TinyGPT(seq_len=64, d_model=64, n_head=4, n_layer=4), _gpt_batch()
    result = plan(model, batch, "rtx3070_8gb")
    for c in result.candidates:
        if c.traced or c.optimizer_8bit:
            continue
        traced = estimate_step_memory(
            model, batch, micro_batch_size=c.micro_batch_size, precision=c.precision,
            activation_checkpointing=c.activation_checkpointing, gpu="rtx3070_8gb",
        )  # fmt: skip
        assert abs(c.estimate.peak - traced.peak) <= 0.03 * traced.peak, c.label


def test_precisions_restricts_the_search():
    result = plan(TinyGPT(seq_len=64, d_model=64, n_head=4, n_layer=2), _gpt_batch(), "rtx3070_8gb",
                  precisions=("32-true",))  # fmt: skip
    assert {c.precision for c in result.candidates} == {"32-true"}


def test_bad_input_names_the_argument():
    batch = (torch.zeros(8, 64), torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"precisions: 'fp8' is not one of"):
        plan(DigitsMLP(), batch, "rtx3060_12gb", precisions=("32-true", "fp8"))
    with pytest.raises(ValueError, match="precisions must be a non-empty list"):
        plan(DigitsMLP(), batch, "rtx3060_12gb", precisions="32-true")
    bare = GPUProfile(name="mystery", memory_gib=8.0, bf16=True, compute_capability=(8, 6))
    with pytest.raises(ValueError, match="gpu 'mystery' has no fp32_tflops, tensor_tflops, bandwidth_gbs"):
        plan(DigitsMLP(), batch, bare)
    with pytest.raises(ValueError, match="gpu.tensor_tflops must be a number > 0"):
        GPUProfile(name="card", tensor_tflops=0)
    assert rates_of(gpu_profile("rtx3070_8gb"))["tf32"] == rates_of(gpu_profile("rtx3070_8gb"))["tensor"] / 2
    assert rates_of(gpu_profile("v100_16gb"))["tf32"] == rates_of(gpu_profile("v100_16gb"))["fp32"]  # no TF32


@pytest.mark.slow
def test_gpt2_small_on_an_8gb_card_plans_mixed_precision_and_orders_the_h200_settings_as_measured():
    from transformers import GPT2Config, GPT2LMHeadModel

    from tests.real_models.models import HFModule

    torch.manual_seed(0)
    module = HFModule(GPT2LMHeadModel(GPT2Config(n_positions=1024, bos_token_id=0, eos_token_id=0)), optimizer="adamw")
    ids = torch.zeros(32, 1024, dtype=torch.long)
    batch = {"input_ids": ids, "labels": ids}
    result = plan(module, batch, "rtx3070_8gb")
    assert result.chosen is not None and result.chosen.precision == "bf16-mixed"
    # the five settings measured on an H200 under an 8 GB cap (ANCHORS.md), fastest first: ties within 5 % apart
    h200 = gpu_profile("h200_141gb")
    settings = [("bf16-mixed", 8, True), ("bf16-mixed", 4, False), ("bf16-mixed", 2, False), ("32-true", 2, False),
                ("32-true", 4, True)]  # fmt: skip
    times = []
    for precision, micro, ckpt in settings:
        estimate = estimate_step_memory(module, batch, micro_batch_size=micro, precision=precision,
                                        activation_checkpointing=ckpt, gpu=h200)  # fmt: skip
        times.append(estimate.step_time(h200, 32 // micro))
    assert max(times[:3]) < min(times[3:])  # the three bf16 settings beat both fp32 ones
    assert times[4] > times[3]  # fp32 micro 4 with checkpointing is slower than fp32 micro 2
    assert times[1] < times[2]  # bf16: micro 4 beats micro 2 (measured 0.529 vs 0.581 s)
