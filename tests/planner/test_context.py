"""The longest sequence that fits a card: the answer fits, one step more does not; a model without weights works."""

import dataclasses

import pytest
import torch

from lightning_lowvram import gpu_profile
from lightning_lowvram.planner import estimate_step_memory
from lightning_lowvram.planner.context import longest_sequence, with_sequence
from tests.real_models.models import HFModule, causal_lm

BATCH = {"input_ids": torch.zeros(1, 64, dtype=torch.long), "labels": torch.zeros(1, 64, dtype=torch.long)}


CARD_MIB = 560  # a width-256 Llama under AdamW holds ~470 MiB of weights and state: the rest is the context's


def _card(mib):
    return dataclasses.replace(gpu_profile("rtx3060_12gb"), memory_gib=mib / 1024, context_mib=0)


def _tensor_peak(module, tokens, **kwargs):
    estimate = estimate_step_memory(module, with_sequence(BATCH, tokens), gpu=_card(CARD_MIB), **kwargs)
    return estimate.peak - estimate.allowance


@pytest.mark.usefixtures("no_cublas_workspace")
@pytest.mark.parametrize("chunked", [False, True])
def test_the_answer_fits_and_one_step_more_does_not(chunked):
    module = HFModule(causal_lm("llama", vocab=32000, hidden=256), optimizer="adamw")
    kwargs = {"precision": "bf16-mixed", "activation_checkpointing": True, "chunked_cross_entropy": chunked}
    fit = longest_sequence(module, BATCH, _card(CARD_MIB), step=64, **kwargs)
    assert fit.tokens > 0 and fit.tokens % 64 == 0
    assert _tensor_peak(module, fit.tokens, **kwargs) <= fit.budget < _tensor_peak(module, fit.tokens + 64, **kwargs)
    assert f"{fit.tokens} tokens" in str(fit)


@pytest.mark.usefixtures("no_cublas_workspace")
def test_the_chunked_loss_fits_a_longer_context_and_a_meta_model_gives_the_same_answer():
    kwargs = {"precision": "bf16-mixed", "activation_checkpointing": True, "step": 64}  # flash: linear attention
    plain = longest_sequence(HFModule(causal_lm("llama", vocab=32000, hidden=256)), BATCH, _card(CARD_MIB), **kwargs)
    chunked = longest_sequence(
        HFModule(causal_lm("llama", vocab=32000, hidden=256)), BATCH, _card(CARD_MIB), chunked_cross_entropy=True,
        **kwargs,
    )  # fmt: skip
    assert chunked.tokens > 1.5 * plain.tokens, (plain, chunked)
    with torch.device("meta"):
        empty = HFModule(causal_lm("llama", vocab=32000, hidden=256))
    assert longest_sequence(empty, BATCH, _card(CARD_MIB), **kwargs).tokens == plain.tokens


def test_bad_settings_are_refused_naming_them():
    module = HFModule(causal_lm("llama"))
    with pytest.raises(ValueError, match="step must be >= 1 token, got 0"):
        longest_sequence(module, BATCH, "rtx3060_12gb", step=0)
    with pytest.raises(ValueError, match="gpu 'cpu' has no memory size"):
        longest_sequence(module, BATCH, "cpu")
    with pytest.raises(ValueError, match="no tensor with a sequence dimension"):
        longest_sequence(module, {"x": torch.zeros(3)}, "rtx3060_12gb")
