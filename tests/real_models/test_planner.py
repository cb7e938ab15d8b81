"""The estimator and the planner on the architectures users bring: dict batches, padding, tied weights, GQA."""

import dataclasses
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model

from lightning_lowvram import AutoMicroBatchCallback, MemoryReportCallback, gpu_profile
from lightning_lowvram.planner import estimate_step_memory, plan
from tests.helpers import quiet_trainer
from tests.real_models.models import HF_NAMES, NAMES, HFModule, build, hf_batches, hf_model


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


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_a_bf16_base_estimate_matches_the_meter(name):
    """A bfloat16 frozen base under float32 LoRA adapters, bf16-mixed (LowBitBaseCallback(bits=16), issue 23)."""
    from lightning_lowvram import LowBitBaseCallback

    def module():
        torch.manual_seed(0)
        return HFModule(get_peft_model(hf_model(name), LoraConfig(r=4, target_modules="all-linear")))

    loader = hf_batches(name)
    report = MemoryReportCallback(stages=["fit"], print_table=False)
    callbacks = [LowBitBaseCallback(bits=16), AutoMicroBatchCallback(micro_batch_size=4), report]
    quiet_trainer(max_steps=3, precision="bf16-mixed", callbacks=callbacks).fit(module(), loader)
    measured = report.reports["fit"].total
    estimate = estimate_step_memory(
        module(), next(iter(loader)), micro_batch_size=4, precision="bf16-mixed", bf16_base=True
    )  # fmt: skip
    assert estimate.method == "fake"
    assert abs(estimate.peak - measured) <= 0.05 * measured, (estimate, measured)
    with pytest.raises(ValueError, match="precision='32-true'"):
        estimate_step_memory(module(), next(iter(loader)), bf16_base=True)


class _Logging(HFModule):
    """Logs as many users do: a Python float of the loss, and a list of per-row token counts."""

    def training_step(self, batch, batch_idx):
        outputs = self.model(**batch)
        self.log("train_loss", outputs.loss.item())
        self.log("tokens", float(sum(batch["attention_mask"].sum(dim=1).tolist())))
        return outputs.loss


@pytest.mark.parametrize("name", HF_NAMES)
def test_a_step_that_logs_python_numbers_is_traced_like_any_other(name):
    """``.item()``, ``.tolist()`` and ``float()`` in training_step: fake tensors, the card's rules, no real run."""
    batch = next(iter(hf_batches(name)))
    plain = estimate_step_memory(HFModule(hf_model(name)), batch, gpu="rtx3060_12gb", precision="bf16-mixed")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logged = estimate_step_memory(_Logging(hf_model(name)), batch, gpu="rtx3060_12gb", precision="bf16-mixed")
    assert logged.method == "fake" and not [w for w in caught if "cannot be traced" in str(w.message)]
    assert logged.peak == plain.peak


def _unpadded(name, mask, seq=128, packed=False):
    """2 rows without padding, with or without the all-ones ``attention_mask`` a tokenizer returns; ``packed``: two
    sequences per row, told by ``position_ids`` that restart (as packing collators give them)."""
    ids = torch.randint(1, 64, (2, seq), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": torch.tensor([0, 1]) if name == "bert" else ids}
    if packed:
        batch["position_ids"] = torch.arange(seq).remainder(seq // 2).expand(2, -1)
    return {**batch, "attention_mask": torch.ones_like(ids)} if mask else batch


def _fit_peak(module, batch, callbacks=()):
    from torch.utils.data import DataLoader

    report = MemoryReportCallback(stages=["fit"], print_table=False)
    loader = DataLoader([batch], batch_size=None)
    quiet_trainer(max_steps=2, callbacks=[*callbacks, report]).fit(module, loader)
    return report.reports["fit"].total


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("name", HF_NAMES)
def test_masks_the_real_step_skips_are_skipped_in_the_trace(name, checkpointing):
    """transformers leaves SDPA's mask out (``is_causal=True``, or none for BERT) for an all-ones ``attention_mask``
    and for positions that are not packed, but only where it can read their values; on fake tensors it cannot, and
    the trace built the ``[2, 1, 128, 128]`` mask the real step never does: +16 % on Llama, +12 % on BERT, +5 % on
    GPT-2 here, and a checkpointed HF model without an attention mask (no cache: the packed-sequence check runs)
    over by 5 bytes per token squared, the mask also keeping the CUDA rules off the flash kernel."""
    from lightning_lowvram import ActivationCheckpointingCallback

    settings = {"activation_checkpointing": checkpointing}
    callbacks = [ActivationCheckpointingCallback()] if checkpointing else []
    for mask in (True, False):
        batch = _unpadded(name, mask)
        measured = _fit_peak(HFModule(hf_model(name)), batch, callbacks)
        estimate = estimate_step_memory(HFModule(hf_model(name)), batch, **settings)
        assert abs(estimate.peak - measured) <= 0.01 * measured, (mask, estimate, measured)
    for gpu in (None, "rtx3060_12gb"):  # the step with the all-ones mask is the step without it, under either rules
        with_mask = estimate_step_memory(HFModule(hf_model(name)), _unpadded(name, True), gpu=gpu, **settings)
        without = estimate_step_memory(HFModule(hf_model(name)), _unpadded(name, False), gpu=gpu, **settings)
        assert with_mask.peak == without.peak, (gpu, with_mask, without)


def test_packed_sequences_keep_their_mask_in_the_trace_as_in_the_real_step():
    """Position ids that restart mean packed sequences: the real step builds the block mask, and so does the trace."""
    from lightning_lowvram import ActivationCheckpointingCallback

    batch = _unpadded("llama", mask=False, packed=True)
    measured = _fit_peak(HFModule(hf_model("llama")), batch, [ActivationCheckpointingCallback()])
    estimate = estimate_step_memory(HFModule(hf_model("llama")), batch, activation_checkpointing=True)
    unpacked = _unpadded("llama", mask=False)
    unpacked = estimate_step_memory(HFModule(hf_model("llama")), unpacked, activation_checkpointing=True)
    assert abs(estimate.peak - measured) <= 0.01 * measured, (estimate, measured)
    assert estimate.peak > unpacked.peak  # the mask is there


def _empty(name, how):
    """The model of ``hf_model(name)`` built without weights: on the meta device or by accelerate."""
    config = hf_model(name).config
    cls = type(hf_model(name))
    if how == "meta":
        with torch.device("meta"):
            return cls(config)
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = cls(config)
    model.tie_weights()  # accelerate's hook re-creates each registered parameter, so ties are made again after
    return model


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("how", ["meta", "accelerate"])
@pytest.mark.parametrize("name", HF_NAMES)
def test_a_module_without_weights_estimates_as_the_real_one(name, how, lora):
    def wrap(model):
        if lora:
            model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
        return HFModule(model, optimizer="adamw")

    batch = next(iter(hf_batches(name)))
    empty = wrap(_empty(name, how))
    assert all(p.is_meta for p in empty.parameters())
    for kwargs in ({}, {"gpu": "rtx3060_12gb", "precision": "bf16-mixed", "activation_checkpointing": True}):
        real = estimate_step_memory(wrap(hf_model(name)), batch, **kwargs)
        assert estimate_step_memory(empty, batch, **kwargs).by_category == real.by_category
    assert all(p.is_meta for p in empty.parameters())  # nothing was materialised in the user's module


@pytest.mark.usefixtures("no_cublas_workspace")
def test_a_plan_from_a_module_without_weights_is_the_real_modules_plan():
    batch = next(iter(hf_batches("llama")))
    real = plan(HFModule(hf_model("llama"), optimizer="adamw"), batch, "rtx3060_12gb")
    empty = plan(HFModule(_empty("llama", "meta"), optimizer="adamw"), batch, "rtx3060_12gb")
    assert empty.table() == real.table()


class _Branching(HFModule):
    def training_step(self, batch, batch_idx):
        loss = self.model(**batch).loss
        return loss * 2 if loss > 1 else loss  # a branch on the value: not traceable


def test_a_module_without_weights_that_cannot_be_traced_is_refused_without_blaming_the_batch():
    batch = next(iter(hf_batches("llama")))
    with pytest.raises(ValueError, match="on the meta device .* cannot be traced") as err:
        estimate_step_memory(_Branching(_empty("llama", "meta")), batch)
    assert "batch" not in str(err.value).split("(")[0]
    with pytest.warns(UserWarning, match="runs once for real"):  # with weights: measured, and announced
        assert estimate_step_memory(_Branching(hf_model("llama")), batch).method == "measured"
