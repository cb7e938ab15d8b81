"""Tracing 2 and 3 of a model's blocks and extrapolating gives the whole model's estimate, byte for byte."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from lightning_lowvram import gpu_profile
from lightning_lowvram.demo import TinyGPT
from lightning_lowvram.planner import estimate_step_memory
from lightning_lowvram.planner.blocks import BlockStack, block_stack, extrapolate_ops, keep_blocks
from tests.real_models.models import HFModule, causal_lm, hf_model

IDS = torch.randint(1, 90, (2, 64), generator=torch.Generator().manual_seed(0))
BATCH = {"input_ids": IDS, "labels": IDS, "attention_mask": torch.ones_like(IDS)}


def _lm(family, lora=False, layers=8):
    model = causal_lm("gpt2", n_layer=layers) if family == "gpt2" else causal_lm(family, num_hidden_layers=layers)
    return HFModule(get_peft_model(model, LoraConfig(r=4, target_modules="all-linear")) if lora else model)


def _assert_same(make, batch, **settings):
    cut = estimate_step_memory(make(), batch, **settings)
    whole = estimate_step_memory(make(), batch, extrapolate_blocks=False, **settings)
    assert cut.traced_blocks is not None and whole.traced_blocks is None
    assert (cut.peak, cut.by_phase, cut.by_category, cut.host) == (whole.peak, whole.by_phase, whole.by_category,
                                                                    whole.host)  # fmt: skip
    card = gpu_profile("rtx3060_12gb")
    assert cut.work.seconds(card, 2) == pytest.approx(whole.work.seconds(card, 2), rel=1e-9)
    assert cut.work.flops() == pytest.approx(whole.work.flops(), rel=1e-9)
    return cut


SETTINGS = {
    "plain": {},
    "cuda bf16 checkpointed": {"gpu": "rtx3060_12gb", "precision": "bf16-mixed", "activation_checkpointing": True},
    "long-context levers": {"activation_checkpointing": True, "offload_activations": True,
                            "chunked_cross_entropy": True, "tiled_mlp": True},
    "micro-batched adamw 8-bit": {"micro_batch_size": 1, "optimizer": torch.optim.AdamW, "optimizer_8bit": True},
}  # fmt: skip


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gemma2", "gpt2"])
def test_a_causal_lm_extrapolates_to_the_whole_models_bytes_and_work(family, setting):
    layers = 12 if family == "gemma2" else 8  # Gemma-2 alternates sliding and global layers: period 2
    estimate = _assert_same(lambda: _lm(family, layers=layers), BATCH, **SETTINGS[setting])
    assert estimate.traced_blocks == ((4, 6, 12) if family == "gemma2" else (2, 3, 8))


@pytest.mark.parametrize(
    "settings",
    [
        {"precision": "bf16-true"},
        {"precision": "bf16-mixed", "bf16_base": True, "gpu": "rtx4090_24gb"},
        {"devices": 2, "sharding": "full", "offload": "params"},
        {"devices": 2, "sharding": "grad_op", "gpu": "rtx3060_12gb"},
    ],
    ids=["bf16-true", "bf16 base", "fsdp2 offload", "fsdp2 grad_op cuda"],
)
def test_lora_bf16_and_sharded_steps_extrapolate_too(settings):
    _assert_same(lambda: _lm("llama", lora=True), BATCH, **settings)


def test_an_encoder_a_meta_device_model_and_a_demo_extrapolate_too():
    labels = {"input_ids": IDS, "labels": torch.tensor([0, 1]), "attention_mask": torch.ones_like(IDS)}
    _assert_same(lambda: HFModule(hf_model("bert", layers=7)), labels, activation_checkpointing=True)

    def empty():
        with torch.device("meta"):
            return _lm("llama")

    _assert_same(empty, BATCH, gpu="rtx3060_12gb")
    text = torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(0))
    _assert_same(lambda: TinyGPT(n_layer=6), (text[:, :-1], text[:, 1:]), activation_checkpointing=True)


def test_blocks_without_one_pattern_are_traced_whole():
    pruned = causal_lm("llama", num_hidden_layers=8)
    pruned.model.layers[5].mlp.up_proj = nn.Linear(32, 48, bias=False)  # a pruned block: another shape
    pruned.model.layers[5].mlp.down_proj = nn.Linear(48, 32, bias=False)
    pruned.model.layers[5].mlp.gate_proj = nn.Linear(32, 48, bias=False)
    assert block_stack(pruned) is None
    assert estimate_step_memory(HFModule(pruned), BATCH).traced_blocks is None
    assert block_stack(causal_lm("llama", num_hidden_layers=5)) is None  # 2 + 3 blocks would be no cheaper
    assert block_stack(nn.Sequential(nn.Linear(2, 2), nn.ReLU())) is None


def test_keep_blocks_cuts_the_stack_and_the_config():
    model = causal_lm("gemma2", num_hidden_layers=12)
    stack = block_stack(model)
    assert stack == BlockStack("model.layers", 12, 2)
    keep_blocks(model, stack, 4)
    assert len(model.model.layers) == 4 and model.config.num_hidden_layers == 4
    assert model.config.layer_types == ["sliding_attention", "full_attention"] * 2
    assert model(IDS).logits.shape == (2, 64, 96)


def test_ops_extrapolate_per_block_or_per_op():
    block, head = ("tensor", 10.0, 4.0), ("fp32", 1.0, 1.0)
    assert extrapolate_ops((head, block, block), (head, block, block, block), 2) == (head, *[block] * 5)
    # one multi-tensor kernel over every parameter: the same ops, more bytes
    assert extrapolate_ops((("fp32", 0.0, 20.0),), (("fp32", 0.0, 30.0),), 5) == (("fp32", 0.0, 80.0),)
    assert extrapolate_ops((head, block), (block, ("tensor", 1.0, 1.0), block), 1) is None
