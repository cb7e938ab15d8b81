import copy

import pytest
import torch
from torch import nn

from lightning_lowvram.cores.dynamic_quant import linear_bytes
from lightning_lowvram.cores.low_bit_base import frozen_linear_layers, low_bit_layers, quantize_frozen_base


class Adapted(nn.Module):
    """A frozen base (two Linear layers) under a trainable adapter, as LoRA-style fine-tuning has it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.adapter = nn.Linear(256, 256)
        self.base = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256))
        self.base.requires_grad_(False)

    def forward(self, x):
        return self.base(self.adapter(x))


# bits -> (bytes ratio bound vs float32, adapter-gradient relative error bound): measured 0.132 / 0.13 and
# 0.256 / 0.005 on these random weights; NF4's ~9 % per-weight error is what QLoRA trades for 4 bits
BOUNDS = {4: (0.16, 0.2), 8: (0.30, 0.02)}


@pytest.mark.parametrize("bits", [4, 8])
def test_the_frozen_base_shrinks_and_gradients_still_reach_the_adapter(bits):
    float_model, low = Adapted(), Adapted()
    float_bytes = linear_bytes(float_model, ["base.0", "base.2"])
    report = quantize_frozen_base(low, bits)
    assert report.converted == ["base.0", "base.2"] and low_bit_layers(low) == ["base.0", "base.2"]
    assert report.bytes_before == float_bytes and report.bytes_after == linear_bytes(low, ["base.0", "base.2"])
    assert report.ratio <= BOUNDS[bits][0]
    assert low.adapter.weight.dtype == torch.float32 and type(low.adapter.weight) is nn.Parameter  # untouched
    x = torch.randn(32, 256, requires_grad=True)
    for model in (float_model, low):
        model(x).pow(2).mean().backward()
    reference = float_model.adapter.weight.grad
    assert low.adapter.weight.grad is not None
    error = (low.adapter.weight.grad - reference).norm() / reference.norm()
    assert error <= BOUNDS[bits][1], float(error)


def test_gpt2_conv1d_layers_are_converted_as_linear_and_tied_ones_stay_float():
    from tests.real_models.models import hf_model

    model = hf_model("gpt2", hidden=128)  # 128 x 384 attention: whole NF4 blocks
    model.requires_grad_(False)
    report = quantize_frozen_base(model, bits=4)
    assert any(name.endswith("attn.c_attn") for name in report.converted)  # a Conv1D, now an nn.Linear in NF4
    assert "lm_head" in report.kept and "tied" in report.kept["lm_head"]
    ids = torch.randint(1, 90, (2, 16))
    assert torch.isfinite(model(input_ids=ids, labels=ids).loss)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="bits must be 4, 8 or 16, got 3"):
        quantize_frozen_base(Adapted(), bits=3)
    with pytest.raises(ValueError, match="has no frozen Linear/Conv1D layer"):
        quantize_frozen_base(nn.Sequential(nn.Linear(4, 4)), bits=4)
    odd = nn.Sequential(nn.Linear(7, 3), nn.Linear(3, 128), nn.Linear(128, 128))  # 21, 384 and 16384 weights
    odd.requires_grad_(False)
    report = quantize_frozen_base(odd, bits=4)
    assert report.converted == ["2"] and "not a multiple of 64 x 256" in report.kept["0"] and "1" in report.kept
    copied = copy.deepcopy(odd)  # torchao re-blocks copies at 64 x 256: what the size rule keeps possible
    assert frozen_linear_layers(copied) == ["0", "1"] and low_bit_layers(copied) == ["2"]
    again = quantize_frozen_base(copied, bits=4)  # a second conversion leaves the low-bit layer as it is
    assert again.converted == [] and low_bit_layers(copied) == ["2"]


@pytest.mark.parametrize("bits", [4, 8])
def test_the_modelled_saving_is_the_converted_bytes(bits):
    from lightning_lowvram.cores.low_bit_base import dequant_bytes, low_bit_saving

    model = Adapted()
    saved, transient = low_bit_saving(model, bits)
    report = quantize_frozen_base(model, bits)
    assert transient == dequant_bytes(512 * 256, 4, bits, rows=512)  # the larger layer's dequantization, float32
    assert saved == report.bytes_before - report.bytes_after  # byte for byte, as the planner subtracts it


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [4, 8])
def test_the_dequantization_transient_is_measured(bits, dtype):
    """``dequant_bytes`` is what the tracker sees a layer's forward and backward hold beyond its input and output."""
    from lightning_lowvram.cores.low_bit_base import dequant_bytes
    from lightning_lowvram.memory.tracker import LiveTensorTracker

    n = 1024
    layer = nn.Sequential(nn.Linear(n, n)).to(dtype).requires_grad_(False)
    quantize_frozen_base(layer, bits)
    x = torch.randn(2, n, dtype=dtype, requires_grad=True)
    tracker = LiveTensorTracker()
    with tracker:
        layer(x).sum().backward()  # forward, then backward's own dequantization
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    held = sum(v for k, v in peak.items() if str(k).endswith(("ACT", "TEMP"))) - 2 * x.numel() * x.element_size()
    expected = dequant_bytes(n * n, dtype.itemsize, bits, rows=n)
    assert n * n * dtype.itemsize <= held <= expected, (held, expected)  # a weight's worth, never more than modelled
    if bits == 4 and dtype == torch.float32:  # what NF4Linear avoids: torchao's own F.linear on the NF4 weight
        torchao = LiveTensorTracker()
        with torchao:
            nn.functional.linear(x, layer[0].weight).sum().backward()
        peak = torchao.get_tracker_snapshot("peak")[torch.device("cpu")]
        held = sum(v for k, v in peak.items() if str(k).endswith(("ACT", "TEMP"))) - 2 * x.numel() * x.element_size()
        assert held >= 20 * n * n, held  # 20 bytes a float32 weight at once (the README's number)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_linear_computes_what_torchaos_nf4_computes(dtype):
    """Our sliced dequantization equals torchao's ``get_original_weight`` to the bit; outputs and input gradients are
    a float Linear's with that weight, with and without autocast (where the output is the autocast dtype, as a
    float Linear's is)."""
    from lightning_lowvram.cores.low_bit_base import NF4Linear, nf4_dequantize

    torch.manual_seed(0)
    layer = nn.Linear(512, 384).to(dtype).requires_grad_(False)
    model = nn.Sequential(layer)
    quantize_frozen_base(model, bits=4)
    nf4 = model[0]
    assert isinstance(nf4, NF4Linear) and isinstance(nf4, nn.Linear)
    assert torch.equal(nf4_dequantize(nf4.weight), nf4.weight.get_original_weight())
    for autocast in (False, True):
        x = torch.randn(8, 512, dtype=dtype, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            ours = nf4(x)
            theirs = nn.functional.linear(x, nf4.weight.get_original_weight(), nf4.bias)
        assert ours.dtype == theirs.dtype
        torch.testing.assert_close(ours, theirs, rtol=1e-2 if autocast else 1e-5, atol=1e-2 if autocast else 1e-5)
        (g_ours,) = torch.autograd.grad(ours.float().pow(2).sum(), x)
        (g_theirs,) = torch.autograd.grad(theirs.float().pow(2).sum(), x)
        torch.testing.assert_close(g_ours, g_theirs, rtol=2e-2 if autocast else 1e-4, atol=2e-2 if autocast else 1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [4, 8])
def test_on_cuda_the_allocator_sees_the_low_bit_bytes(bits):
    """What the CUDA caching allocator holds for the converted layers is the bytes the report counts (each tensor
    rounded up to the allocator's 512-byte blocks). Unverified until a GPU session runs it."""
    model = Adapted().cuda()
    names = ["base.0", "base.2"]
    float_bytes = linear_bytes(model, names)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    report = quantize_frozen_base(model, bits)
    torch.cuda.synchronize()
    freed = before - torch.cuda.memory_allocated()  # the float weights went, the low-bit ones came
    tensors = sum(1 for n in names for _ in model.get_submodule(n).state_dict().values()) + 8  # scales, tables
    assert report.bytes_before == float_bytes
    assert abs(freed - (report.bytes_before - report.bytes_after)) <= 512 * tensors, (freed, report)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_bf16_base_computes_the_same_step_to_the_bit_under_bf16_autocast_and_halves_its_bytes(family):
    from peft import LoraConfig, get_peft_model

    from lightning_lowvram.cores.low_bit_base import low_bit_saving
    from tests.real_models.models import hf_batches, hf_model

    targets = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}[family]
    torch.manual_seed(0)
    config = LoraConfig(r=8, target_modules=targets, fan_in_fan_out=family == "gpt2")
    plain = get_peft_model(hf_model(family, hidden=128), config)
    bf16 = copy.deepcopy(plain)
    before = sum(p.numel() * p.element_size() for p in bf16.parameters())
    saved, transient = low_bit_saving(bf16, 16)
    report = quantize_frozen_base(bf16, bits=16)
    after = sum(p.numel() * p.element_size() for p in bf16.parameters())
    assert before - after == saved > 0 and transient == 0  # the modelled saving, byte for byte
    assert report.ratio == 0.5 and bf16.get_submodule(report.converted[0]).weight.dtype == torch.bfloat16
    if family == "gpt2":  # the head is the embedding: converting it would change the embedding's output
        assert "base_model.model.lm_head" in report.kept and bf16.base_model.model.lm_head.weight.dtype == torch.float32
    adapters = {n: p for n, p in bf16.named_parameters() if p.requires_grad}
    assert adapters and all(p.dtype == torch.float32 for p in adapters.values())  # as peft keeps them
    batch = next(iter(hf_batches(family, n=4, batch_size=4, seq=16)))
    losses = []
    for model in (plain, bf16):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        losses.append(loss)
    assert torch.equal(losses[0], losses[1])
    for name, p in plain.named_parameters():
        if p.requires_grad:
            assert torch.equal(p.grad, adapters[name].grad), name
