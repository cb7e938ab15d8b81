"""DynamicQuantCallback on the architectures users bring: Conv1D quantized, tied weights counted once, bytes = file."""

import warnings

import pytest
import torch
from torch import nn

from lightning_lowvram import DynamicQuantCallback, load_quantized
from lightning_lowvram.cores.dynamic_quant import (
    int8_kernel_ok,
    is_linear,
    median_seconds,
    module_bytes,
    quantized_layers,
    state_dict_bytes,
)
from tests.helpers import quiet_trainer
from tests.real_models.models import NAMES, build, hf_model


def _test(module, loader, callback):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(callbacks=[callback]).test(module, loader, verbose=False)
    return [str(w.message) for w in caught if "DynamicQuantCallback" in str(w.message)]


@pytest.mark.parametrize("name", NAMES)
def test_every_linear_and_conv1d_runs_int8_except_tied_ones(name, tmp_path):
    module, loader = build(name)
    layers = [n for n, m in module.named_modules() if is_linear(m)]
    artifact = tmp_path / "int8.pt"
    callback = DynamicQuantCallback(stages=("test",), save_path=str(artifact), print_table=False)
    warned = _test(module, loader, callback)
    tied = ["model.lm_head"] if name == "gpt2" else []
    assert list(callback.kept_float) == tied
    assert bool(tied) == any("kept in float: model.lm_head (weight tied" in w for w in warned)
    fresh = load_quantized(build(name)[0], artifact)
    assert sorted(quantized_layers(fresh)) == sorted(n for n in layers if n not in tied)
    saved = torch.load(artifact, weights_only=True)["state_dict"]
    assert module_bytes(fresh) == state_dict_bytes(saved)  # the report counts what the artifact holds
    assert module_bytes(fresh) <= artifact.stat().st_size <= module_bytes(fresh) + 64 * 1024  # file = tensors + index
    rows = callback.comparison["test"]
    assert rows["model_bytes"]["int8"] < rows["model_bytes"]["float"]  # never reported smaller than it is
    assert abs(rows["test_loss"]["int8"] - rows["test_loss"]["float"]) < 0.05 * rows["test_loss"]["float"]


def test_tied_weights_are_counted_once():
    model = hf_model("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    unique = sum(p.nbytes for p in model.parameters()) + sum(b.nbytes for b in model.buffers())
    assert module_bytes(model) == unique


def test_gpt2_frozen_conv1d_base_becomes_int8_and_gradients_flow():
    module, loader = build("gpt2")
    for block in module.model.transformer.h:
        block.requires_grad_(False)
        for norm in (block.ln_1, block.ln_2):
            norm.requires_grad_(True)  # trainable pieces around the frozen base
    callback = DynamicQuantCallback(stages=(), freeze_base=True)
    before = {n: p.detach().clone() for n, p in module.named_parameters() if "ln_1" in n}
    quiet_trainer(max_steps=2, callbacks=[callback]).fit(module, loader)
    assert len(callback.frozen) == 8  # c_attn, attn.c_proj, c_fc, mlp.c_proj in each of 2 blocks
    assert all(n in quantized_layers(module) for n in callback.frozen)
    assert any(not torch.equal(p, before[n]) for n, p in module.named_parameters() if n in before)


def test_measure_keeps_the_fastest_path_float_included():
    module, loader = build("gpt2")  # every backend runs on GPT-2's Conv1D layers
    callback = DynamicQuantCallback(stages=("test",), backend="measure", print_table=False)
    _test(module, loader, callback)
    assert callback.measured["test"] in ("float", "torch_ao", "torchao_dynamic", "torchao_weight_only")
    if callback.measured["test"] == "float":
        assert "test" not in callback.comparison  # float kept: nothing swapped, nothing to compare
    else:
        assert quantized_layers(module) == []  # swapped back after the stage


def test_median_seconds_leaves_the_warm_up_out():
    calls = []
    median_seconds(lambda: calls.append(1), "cpu", warmup=2, repeats=3)
    assert len(calls) == 5


def test_cuda_kernel_rule_keeps_odd_shapes_float():
    assert not int8_kernel_ok(nn.Linear(768, 50257), "torchao_dynamic", "cuda")  # GPT-2's lm_head
    assert int8_kernel_ok(nn.Linear(1024, 4096), "torchao_dynamic", "cuda")
    assert int8_kernel_ok(nn.Linear(768, 50257), "torchao_dynamic", "cpu")
    assert int8_kernel_ok(nn.Linear(768, 50257), "torchao_weight_only", "cuda")


def test_an_artifact_of_another_model_or_no_artifact_is_one_clear_error(tmp_path):
    module, loader = build("llama")
    artifact = tmp_path / "int8.pt"
    _test(module, loader, DynamicQuantCallback(stages=("test",), save_path=str(artifact), print_table=False))
    from tests.real_models.models import HFModule

    other = HFModule(hf_model("llama", hidden=32))
    with pytest.raises(
        ValueError,
        match=r"saved from another model: layer 'model.model.layers.0.self_attn.q_proj' is 64 x 64 there, 32 x 32 here",
    ):
        load_quantized(other, artifact)
    checkpoint = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": module.state_dict()}, checkpoint)
    with pytest.raises(ValueError, match="not an int8 artifact"):
        load_quantized(build("llama")[0], checkpoint)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(artifact.read_bytes()[:1000])
    with pytest.raises(ValueError, match="not a readable int8 artifact"):
        load_quantized(build("llama")[0], truncated)


@pytest.mark.gpu
def test_auto_on_cuda_never_runs_slower_than_float():
    """On a GPU: GPT-2 (Conv1D layers, tied lm_head kept float), the path measured fastest at the first batch."""
    module, loader = build("gpt2")
    callback = DynamicQuantCallback(stages=("test",), print_table=False)
    quiet_trainer(accelerator="cuda", callbacks=[callback]).test(module, loader, verbose=False)
    assert callback.measured["test"] in ("float", "torchao_dynamic", "torchao_weight_only")
    if "test" in callback.comparison:
        latency = callback.comparison["test"]["latency_ms"]
        assert latency["int8"] <= 1.2 * latency["float"]  # chosen as the fastest at the first batch (noise allowed)
