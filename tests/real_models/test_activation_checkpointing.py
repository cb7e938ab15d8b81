"""ActivationCheckpointingCallback on the architectures users bring: exact, and BatchNorm statistics updated once."""

import copy

import lightning as L
import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch.utils.data import DataLoader

from lightning_lowvram import ActivationCheckpointingCallback, ChunkedCrossEntropyCallback, memory_budget
from lightning_lowvram.cores.activation_checkpointing import repeated_blocks
from lightning_lowvram.planner import estimate_step_memory
from tests.helpers import quiet_trainer
from tests.real_models.models import NAMES, HFModule, build, causal_lm


@pytest.mark.parametrize("offload", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_checkpointed_fit_equals_the_plain_fit_buffers_included(name, offload):
    """With ``offload=True`` the blocks' saved inputs wait in host memory: the same weights and buffers."""
    module, loader = build(name)
    assert len(repeated_blocks(module)) >= 2  # what the callback wraps
    reference = copy.deepcopy(module)
    quiet_trainer(max_steps=3).fit(reference, loader)
    callback = ActivationCheckpointingCallback(offload=offload)
    quiet_trainer(max_steps=3, callbacks=[callback]).fit(module, loader)
    expected = reference.state_dict()
    for key, value in module.state_dict().items():  # running_mean/var and num_batches_tracked included
        torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-6, msg=key)
    if name == "resnet":
        bn = module.net.layer1[0].bn1
        assert int(bn.num_batches_tracked) == 3  # once per step, not twice
    else:
        assert module.model.config.use_cache  # turned off while checkpointed only


class _Losses(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def _deep_llama():
    """LoRA on 24 blocks at 1024 tokens: the checkpointed blocks' inputs are a large part of the step."""
    model = causal_lm("llama", hidden=256, num_hidden_layers=24, vocab=512, num_attention_heads=2, head_dim=128,
                      num_key_value_heads=1)  # fmt: skip
    return HFModule(get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"])))


def _long_batches():
    ids = torch.randint(0, 512, (3, 1, 1024), generator=torch.Generator().manual_seed(0))
    return DataLoader([{"input_ids": row, "labels": row} for row in ids], batch_size=None)


@pytest.mark.slow  # three Lightning fits of a 24-block model at 1024 tokens
def test_offloaded_inputs_are_host_bytes_the_emulated_card_never_holds():
    """Under a budget between the two estimates the checkpointed fit runs out of memory; with its blocks' inputs in
    host memory it trains with the plain run's losses, and the estimate reports those bytes as host memory."""
    batch = next(iter(_long_batches()))
    settings = {"activation_checkpointing": True, "chunked_cross_entropy": True, "device": "cpu"}
    kept = estimate_step_memory(_deep_llama(), batch, **settings)
    moved = estimate_step_memory(_deep_llama(), batch, offload_activations=True, **settings)
    assert moved.offloaded_activations >= 24 * 1024 * 256 * 4  # each block's float32 input hidden states
    assert moved.host == moved.offloaded_activations and moved.peak < kept.peak
    budget = (moved.peak + kept.peak) // 2

    def fit(offload):
        torch.manual_seed(0)
        losses = _Losses()
        callbacks = [ActivationCheckpointingCallback(offload=offload), ChunkedCrossEntropyCallback(), losses]
        with memory_budget(budget, device="cpu"):
            quiet_trainer(max_steps=3, callbacks=callbacks).fit(_deep_llama(), _long_batches())
        return losses.losses

    with pytest.raises(torch.OutOfMemoryError):
        fit(offload=False)
    torch.manual_seed(0)
    plain = _Losses()
    quiet_trainer(max_steps=3, callbacks=[plain]).fit(_deep_llama(), _long_batches())
    assert fit(offload=True) == pytest.approx(plain.losses, rel=1e-5)


def test_offload_without_checkpointing_is_refused_naming_the_setting():
    with pytest.raises(ValueError, match="offload_activations=True .* needs activation_checkpointing=True"):
        estimate_step_memory(_deep_llama(), next(iter(_long_batches())), offload_activations=True)
    with pytest.raises(ValueError, match="offload must be true or false, got 'yes'"):
        ActivationCheckpointingCallback(offload="yes")
