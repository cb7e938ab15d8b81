import copy

import pytest
import torch

from lightning_lowvram import LowBitBaseCallback
from lightning_lowvram.cores.low_bit_base import low_bit_layers
from tests.helpers import RecordingLogger, quiet_trainer
from tests.real_models.models import HFModule, hf_batches, hf_model


def _lora_llama() -> HFModule:
    """A tiny Llama (GQA) under peft's LoRA (r=8 on q and v): peft freezes the base."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(
        hf_model("llama", hidden=128), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    )
    return HFModule(model, lr=1e-2, optimizer="adamw")


def test_lora_trains_on_a_4_bit_base_and_a_checkpoint_loads_into_a_fresh_module(tmp_path):
    module, loader = _lora_llama(), hf_batches("llama", n=16, batch_size=8, seq=16)
    lora_before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    callback, logger = LowBitBaseCallback(bits=4), RecordingLogger()
    trainer = quiet_trainer(max_steps=4, limit_val_batches=0, logger=logger, callbacks=[callback])
    trainer.fit(module, loader)

    base = [n for n in low_bit_layers(module) if n.endswith("q_proj.base_layer")]
    assert base and all(type(module.get_submodule(n).weight).__name__ == "NF4Tensor" for n in base)
    assert callback.report.ratio <= 0.16 and logger.metrics["lowvram/low_bit_base/ratio"] == callback.report.ratio
    assert "in 4 bits" in callback.summary()
    lora = {n: p for n, p in module.named_parameters() if p.requires_grad}
    assert set(lora) == set(lora_before) and all("lora_" in n for n in lora)
    assert all(p.dtype == torch.float32 for p in lora.values())
    assert any(not torch.equal(lora[n], lora_before[n]) for n in lora)  # the adapters learned through the 4-bit base

    trainer.save_checkpoint(tmp_path / "lora.ckpt")
    fresh = _lora_llama()
    quiet_trainer(limit_val_batches=1, callbacks=[LowBitBaseCallback(bits=4)]).validate(
        fresh, loader, ckpt_path=tmp_path / "lora.ckpt"
    )
    batch = next(iter(loader))
    with torch.no_grad():
        assert torch.equal(fresh.model(**batch).logits, module.model(**batch).logits)


@pytest.mark.parametrize("bits", [4, 8])
def test_predict_runs_a_base_whose_float_weights_exceed_the_card(bits):
    from lightning_lowvram import memory_budget

    loader = hf_batches("llama", n=8, batch_size=4, seq=16)

    def frozen() -> HFModule:
        return HFModule(hf_model("llama", layers=4, hidden=256).requires_grad_(False))  # 9.4 MiB of float weights

    budget, float_model, low_model = 6 * 2**20, frozen(), frozen()  # built on the host, as users load them
    with memory_budget(budget), pytest.raises(torch.OutOfMemoryError):
        quiet_trainer().predict(float_model, loader)  # the float model does not fit
    with memory_budget(budget):
        low = quiet_trainer(callbacks=[LowBitBaseCallback(bits=bits)]).predict(low_model, loader)
    reference = quiet_trainer().predict(float_model, loader)
    dequantized = frozen()  # the float model with each converted weight replaced by its dequantized value
    for name in low_bit_layers(low_model):
        weight = low_model.get_submodule(name).weight
        value = weight.get_original_weight() if bits == 4 else weight.dequantize()
        dequantized.get_submodule(name).weight.data.copy_(value)
    for out, ref, same in zip(low, reference, quiet_trainer().predict(dequantized, loader), strict=True):
        torch.testing.assert_close(out, same, rtol=1e-4, atol=1e-5)  # the budget changed nothing but the bytes
        error = (out - ref).norm() / ref.norm()  # what the quantization costs: 0.25 (NF4) and 0.020 (int8) measured
        assert error < {4: 0.35, 8: 0.03}[bits], float(error)  # on random weights through 4 layers


def test_bad_input():
    with pytest.raises(ValueError, match="bits must be 4, 8 or 16, got 2"):
        LowBitBaseCallback(bits=2)
    from lightning_lowvram.demo import DigitsMLP

    with pytest.raises(ValueError, match="DigitsMLP has no frozen Linear/Conv1D layer"):
        quiet_trainer(max_steps=1, callbacks=[LowBitBaseCallback()]).fit(
            DigitsMLP(),
            torch.utils.data.DataLoader(
                torch.utils.data.TensorDataset(torch.zeros(4, 64), torch.zeros(4, dtype=torch.long)), batch_size=2
            ),
        )
    assert copy.deepcopy(LowBitBaseCallback(bits=8)).bits == 8


def test_a_bf16_base_trains_as_bf16_mixed_does_and_other_precisions_are_refused_before_a_step():
    loader = hf_batches("llama", n=16, batch_size=8, seq=16)

    def fit(callbacks, precision="bf16-mixed"):
        torch.manual_seed(0)
        module = _lora_llama()
        quiet_trainer(max_steps=3, limit_val_batches=0, precision=precision, callbacks=callbacks).fit(module, loader)
        return module

    callback = LowBitBaseCallback(bits=16)
    plain, bf16 = fit([]), fit([callback])
    assert "in bfloat16" in callback.summary() and callback.report.ratio == 0.5
    for (name, p), q in zip(plain.named_parameters(), bf16.parameters(), strict=True):
        if p.requires_grad:
            assert q.dtype == torch.float32 and torch.equal(p, q), name  # the same steps to the bit
    untouched = _lora_llama()
    weights = {n: p.detach().clone() for n, p in untouched.named_parameters()}
    with pytest.raises(ValueError, match=r"bits=16\).*precision='32-true'"):
        quiet_trainer(max_steps=1, callbacks=[LowBitBaseCallback(bits=16)]).fit(untouched, loader)
    assert all(torch.equal(p, weights[n]) and p.dtype == torch.float32 for n, p in untouched.named_parameters())
    converted = copy.deepcopy(bf16)
    callback = LowBitBaseCallback(bits=16)
    with pytest.warns(UserWarning, match="changed nothing"):
        quiet_trainer(max_steps=1, limit_val_batches=0, precision="bf16-mixed", callbacks=[callback]).fit(
            converted, loader
        )
    assert "no frozen layer stored in bfloat16" in callback.summary()
