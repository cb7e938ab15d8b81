"""WeightStreamingCallback in Lightning's validate, test and predict: the plain run's outputs, under a budget of
half the weights that the plain run does not fit."""

import lightning as L
import pytest
import torch

from lightning_lowvram import MemoryMeter, WeightStreamingCallback, memory_budget
from tests.real_models.models import HFModule, causal_lm, hf_batches


def _trainer(*callbacks):
    return L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                     enable_checkpointing=False, callbacks=list(callbacks))  # fmt: skip


@pytest.fixture(scope="module")
def llama():
    module = HFModule(causal_lm("llama", hidden=64, num_hidden_layers=8))  # blocks: 82 % of the weights
    return module, hf_batches("llama", n=4, batch_size=2, seq=16)


def test_predict_validate_test_equal_plain_lightning_under_half_the_weights(llama):
    module, loader = llama
    weights = sum(p.numel() * p.element_size() for p in module.parameters())
    expected = _trainer().predict(module, loader)
    expected_loss = _trainer().validate(module, loader, verbose=False)[0]
    with memory_budget(weights // 2), pytest.raises(torch.OutOfMemoryError):
        _trainer().predict(module, loader)  # the plain run does not fit
    callback = WeightStreamingCallback(resident_blocks=1)
    with memory_budget(weights // 2), MemoryMeter() as meter:
        got = _trainer(callback).predict(module, loader)
        loss = _trainer(callback).validate(module, loader, verbose=False)[0]
        _trainer(callback).test(module, loader, verbose=False)
    assert meter.peak.total < weights // 2  # the meter proves what the card held
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert loss["val_loss"] == pytest.approx(expected_loss["val_loss"], abs=1e-6)
    assert callback.streaming is None  # put back at teardown
    assert all(not p.is_meta and p.requires_grad for p in module.parameters())


def test_an_oom_mid_stage_puts_the_weights_back(llama):
    module, loader = llama
    with memory_budget(64 * 1024), pytest.raises(torch.OutOfMemoryError):
        _trainer(WeightStreamingCallback()).predict(module, loader)
    assert all(not p.is_meta for p in module.parameters())


def test_fit_is_not_streamed_and_says_so(llama, caplog):
    module, loader = llama
    callback = WeightStreamingCallback()
    with caplog.at_level("INFO"):
        L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                  enable_checkpointing=False, max_steps=1, limit_val_batches=0, callbacks=[callback]).fit(
            module, loader)  # fmt: skip
    assert "fit is not streamed" in caplog.text and callback.streaming is None


def test_bad_arguments_are_refused_before_any_step(llama):
    module, loader = llama
    with pytest.raises(ValueError, match=r"resident_blocks must be a whole number >= 0, got -1"):
        WeightStreamingCallback(resident_blocks=-1)
    with pytest.raises(ValueError, match=r"stages: 'fit' is not one of validate, test, predict"):
        WeightStreamingCallback(stages=["fit"])
    state = {k: v.clone() for k, v in module.state_dict().items()}
    message = r"resident_blocks=9: HFModule has 8 blocks to stream \(model.model.layers.0 ... model.model.layers.7\)"
    with pytest.raises(ValueError, match=message + "; allowed 0 to 8"):
        _trainer(WeightStreamingCallback(resident_blocks=9)).validate(module, loader, verbose=False)
    assert all(torch.equal(v, state[k]) for k, v in module.state_dict().items())
