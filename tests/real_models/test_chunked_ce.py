"""Chunked linear + cross-entropy on the causal LMs users bring: exact, through Lightning, and the bytes it saves."""

import contextlib
import copy
import dataclasses

import lightning as L
import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch.utils.data import DataLoader
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from lightning_lowvram import (
    AutoMicroBatchCallback,
    ChunkedCrossEntropyCallback,
    MemoryReportCallback,
    apply_chunked_cross_entropy,
    gpu_profile,
    memory_budget,
    plan_callbacks,
)
from lightning_lowvram.planner import estimate_step_memory, plan
from tests.helpers import quiet_trainer
from tests.real_models.models import CAUSAL_FAMILIES, HFModule, causal_lm, hf_batches, hf_model


def _loss_and_grads(model, batch, **kwargs):
    model.train()
    loss = model(**batch, **kwargs).loss
    params = [p for p in model.parameters() if p.requires_grad]
    return loss.detach(), torch.autograd.grad(loss, params)


def _assert_exact(plain, chunked, rel=1e-5):
    (loss_p, grads_p), (loss_c, grads_c) = plain, chunked
    assert abs(loss_c - loss_p) <= rel * abs(loss_p), (loss_c, loss_p)
    for g_p, g_c in zip(grads_p, grads_c, strict=True):
        assert (g_c - g_p).abs().max() <= rel * g_p.abs().max().clamp_min(1e-12)


@pytest.mark.parametrize("num_items", [None, 50])
@pytest.mark.parametrize("family", CAUSAL_FAMILIES)
def test_loss_and_every_gradient_equal_the_plain_model(family, num_items):
    """Padded batches (-100 labels), HF's label shift, tied (GPT-2, Gemma) and untied heads, Gemma-2's soft-capping."""
    batch = next(iter(hf_batches("llama")))
    kwargs = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    model = causal_lm(family)
    plain = _loss_and_grads(model, batch, **kwargs)
    assert apply_chunked_cross_entropy(model, chunk_size=5) == [type(model).__name__]
    _assert_exact(plain, _loss_and_grads(model, batch, **kwargs))
    assert model(**batch).logits is None  # in training the logits are never made whole


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # untied, tied
def test_a_lora_adapter_on_the_head_gets_the_plain_gradients(family):
    model = get_peft_model(causal_lm(family), LoraConfig(r=4, target_modules=["lm_head", "q_proj", "c_attn"]))
    for name, param in model.named_parameters():  # B starts at zero: give the adapters weights that matter
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    batch = next(iter(hf_batches("llama")))
    plain = _loss_and_grads(model, batch)
    apply_chunked_cross_entropy(model, chunk_size=7)
    _assert_exact(plain, _loss_and_grads(model, batch))


def test_evaluation_and_prediction_logits_are_untouched():
    module = HFModule(causal_lm("llama"))
    batch = next(iter(hf_batches("llama")))
    expected = module.predict_step(batch, 0)
    apply_chunked_cross_entropy(module)
    module.eval()
    assert torch.equal(module.predict_step(batch, 0), expected)
    assert module.model(**batch).logits is not None  # a validation step with labels keeps its logits too


def _fit(module, callbacks, precision="32-true"):
    torch.manual_seed(0)
    quiet_trainer(max_steps=3, precision=precision, callbacks=callbacks).fit(module, hf_batches("llama"))
    return module


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_training_with_micro_batches_ends_like_plain_lightning(family):
    """Micro-batches weighted by label tokens (AutoMicroBatchCallback's count) on top of the chunked loss."""
    plain = _fit(HFModule(causal_lm(family).double()), [])
    chunked = _fit(
        HFModule(causal_lm(family).double()),
        [
            ChunkedCrossEntropyCallback(chunk_size=9),
            AutoMicroBatchCallback(micro_batch_size=2, count_fn="causal_lm_tokens"),
        ],
    )
    for p, c in zip(plain.parameters(), chunked.parameters(), strict=True):
        assert torch.allclose(p, c, rtol=1e-7, atol=1e-9)
    assert type(chunked.model).forward is chunked.model.forward.__func__  # teardown gave the model its forward back


def _long_context_llama():
    """A body small beside its head: vocabulary 32000, 2 layers of width 64 (the logits dominate the step)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096,
    )  # fmt: skip
    return HFModule(LlamaForCausalLM(config), optimizer="adamw")


def _long_batches():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 32000, (4, 1, 2048), generator=g)
    return DataLoader([{"input_ids": row, "labels": row} for row in ids], batch_size=None)


@pytest.mark.slow  # six Lightning steps at 2048 tokens and a 32000 vocabulary
def test_the_step_peak_is_under_a_quarter_of_the_plain_step_where_the_logits_dominate():
    """The meter on real Lightning fits (3 steps, 2048 tokens, vocabulary 32000); the estimate traces the same."""
    peaks = {}
    for chunked in (False, True):
        report = MemoryReportCallback(stages=["fit"], print_table=False)
        callbacks = [report] + ([ChunkedCrossEntropyCallback()] if chunked else [])
        quiet_trainer(max_steps=3, callbacks=callbacks).fit(_long_context_llama(), _long_batches())
        peaks[chunked] = report.reports["fit"].total
        batch = next(iter(_long_batches()))
        estimate = estimate_step_memory(_long_context_llama(), batch, chunked_cross_entropy=chunked)
        assert abs(estimate.peak - peaks[chunked]) <= 0.05 * peaks[chunked], (chunked, estimate, peaks[chunked])
    assert peaks[True] <= 0.25 * peaks[False], peaks


def _refused(model, match):
    with pytest.raises(ValueError, match=match):
        quiet_trainer(max_steps=1, callbacks=[ChunkedCrossEntropyCallback()]).fit(HFModule(model), hf_batches("llama"))


def test_a_family_it_cannot_reproduce_is_refused_by_name_before_any_step():
    config = AutoConfig.for_model(
        "cohere", vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config)  # Cohere scales its logits (logit_scale)
    before = copy.deepcopy(model.state_dict())
    _refused(model, r"CohereForCausalLM \(model_type 'cohere'\) is not a family whose head and loss are reproduced")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # no step ran


def test_a_custom_loss_a_head_with_dropout_and_a_model_without_a_causal_lm_are_refused():
    custom = causal_lm("llama")
    custom.loss_function = lambda *args, **kwargs: torch.zeros(())
    _refused(custom, "computes its loss with <lambda>, not HF's ForCausalLMLoss")
    dropout = get_peft_model(causal_lm("llama"), LoraConfig(r=4, target_modules=["lm_head"], lora_dropout=0.1))
    _refused(dropout, r"head has dropout \(lora_dropout.default\)")
    with pytest.raises(ValueError, match="BertForSequenceClassification holds no Hugging Face \\*ForCausalLM"):
        apply_chunked_cross_entropy(hf_model("bert"))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_under_bf16_autocast_the_gradients_match_to_bf16_rounding(family):
    """Autocast caches one bf16 cast of each weight: every chunk's gradient must still reach the weight."""
    batch = next(iter(hf_batches("llama")))
    model = causal_lm(family)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = _loss_and_grads(model, batch)
        apply_chunked_cross_entropy(model, chunk_size=5)
        chunked = _loss_and_grads(model, batch)
    _assert_exact(plain, chunked, rel=1e-2)


class _Losses(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


@pytest.mark.slow  # a plan and three Lightning fits at 2048 tokens
@pytest.mark.usefixtures("no_cublas_workspace")
def test_the_plan_picks_the_chunked_loss_and_runs_where_the_plain_step_does_not_fit():
    """Scaled down (2048 tokens, vocabulary 32000): the plan's setting trains under the emulated card, losses equal."""
    batch = next(iter(_long_batches()))
    plain = estimate_step_memory(_long_context_llama(), batch, device="cuda")
    card = dataclasses.replace(gpu_profile("rtx3060_12gb"), memory_gib=plain.peak * 0.5 / 2**30, context_mib=0)
    chosen = plan(_long_context_llama(), batch, card, precisions=("32-true",))
    assert not chosen.candidates[0].fits and chosen.chosen is not None and chosen.chosen.chunked_ce, chosen.table()
    assert "lowvram_chunked_cross_entropy" in chosen.overrides()[1]
    callbacks = plan_callbacks(chosen)
    assert any(isinstance(c, ChunkedCrossEntropyCallback) for c in callbacks)

    def fit(callbacks, budget):
        torch.manual_seed(0)
        losses = _Losses()
        trainer = quiet_trainer(max_steps=3, callbacks=[*callbacks, losses], **chosen.trainer_kwargs())
        with memory_budget(card, device="cpu") if budget else contextlib.nullcontext():
            trainer.fit(_long_context_llama(), _long_batches())
        return losses.losses

    reference = fit([], budget=False)
    with pytest.raises(torch.OutOfMemoryError):
        fit([], budget=True)  # the plain step does not fit the emulated card
    assert fit(callbacks, budget=True) == pytest.approx(reference, rel=1e-5)


def test_an_nf4_head_under_lowbitbase_gets_the_plain_nf4_loss_and_gradients():
    """LowBitBaseCallback(bits=4) stores the frozen head in NF4: chunks share one dequantization, the same numbers."""
    from lightning_lowvram.cores.low_bit_base import NF4Linear, quantize_frozen_base

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2,
    )  # fmt: skip
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, target_modules=["q_proj"]))
    quantize_frozen_base(model, 4)
    assert isinstance(model.get_output_embeddings(), NF4Linear)
    batch = next(iter(hf_batches("llama")))
    plain = _loss_and_grads(model, batch)
    apply_chunked_cross_entropy(model, chunk_size=6)
    _assert_exact(plain, _loss_and_grads(model, batch))


def test_the_cce_backend_without_cuda_is_refused_before_any_step():
    model = causal_lm("llama")
    before = copy.deepcopy(model.state_dict())
    callback = ChunkedCrossEntropyCallback(backend="cce")
    with pytest.raises(ValueError, match="backend='cce' needs the model on CUDA \\(it is on cpu\\)"):
        quiet_trainer(max_steps=1, callbacks=[callback]).fit(HFModule(model), hf_batches("llama"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
