import contextlib

import lightning as L
import pytest
import torch

from lightning_lowvram import EightBitOptimizerCallback
from lightning_lowvram.cores.dynamic_quant import tensor_bytes
from lightning_lowvram.cores.optimizer_8bit import adam_state_bytes
from lightning_lowvram.demo import DigitsDataModule, DigitsMLP
from tests.helpers import quiet_trainer


class WithScheduler(DigitsMLP):
    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=0.01)
        return {
            "optimizer": opt,
            "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, 0.5), "interval": "step"},
        }


def _state_bytes(trainer):
    return sum(tensor_bytes(v) for s in trainer.optimizers[0].state.values() for v in s.values())


def test_adam_state_in_8_bits_is_a_quarter_and_training_and_schedules_go_on():
    L.seed_everything(0)
    model, plain = WithScheduler(hidden=512), WithScheduler(hidden=512)
    plain.load_state_dict(model.state_dict())
    before = model.net[0].weight.detach().clone()
    trainer = quiet_trainer(max_steps=3, limit_val_batches=0, callbacks=[EightBitOptimizerCallback()])
    trainer.fit(model, datamodule=DigitsDataModule())
    reference = quiet_trainer(max_steps=3, limit_val_batches=0)
    reference.fit(plain, datamodule=DigitsDataModule())
    assert type(trainer.optimizers[0]).__name__ == "AdamW8bit"
    assert trainer.lr_scheduler_configs[0].scheduler.optimizer is trainer.optimizers[0]
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.01 * 0.5**3)
    assert _state_bytes(trainer) == adam_state_bytes(model.parameters(), eight_bit=True)
    assert _state_bytes(reference) == adam_state_bytes(plain.parameters(), eight_bit=False)
    assert _state_bytes(trainer) <= 0.3 * _state_bytes(reference)
    assert not torch.equal(model.net[0].weight, before)
    assert "configure_optimizers" not in model.__dict__  # unwrapped at teardown


def test_other_optimizers_are_refused_before_any_step():
    class SGDModel(DigitsMLP):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    model = SGDModel(hidden=16)
    before = model.net[0].weight.detach().clone()
    with pytest.raises(ValueError, match="available for Adam and AdamW, not SGD"):
        quiet_trainer(max_steps=1, callbacks=[EightBitOptimizerCallback()]).fit(model, datamodule=DigitsDataModule())
    assert torch.equal(model.net[0].weight, before)


def test_metered_and_emulated_steps_run_uncompiled_with_the_same_weights_and_say_so(caplog):
    """torchao compiles its update with fullgraph=True, which a dispatch mode (the meter, the CPU budget) refuses."""
    from lightning_lowvram import MemoryReportCallback, memory_budget

    caplog.set_level("INFO")
    weights = []
    for watched in (False, True):
        L.seed_everything(0)
        model = DigitsMLP(hidden=512)
        callbacks = [EightBitOptimizerCallback()]
        if watched:
            callbacks.append(MemoryReportCallback(stages=["fit"], print_table=False, steps=2))
        trainer = quiet_trainer(max_steps=3, limit_val_batches=0, callbacks=callbacks)
        with memory_budget(2**30) if watched else contextlib.nullcontext():
            trainer.fit(model, datamodule=DigitsDataModule())
        weights.append(model.net[0].weight.detach().clone())
    # eager = compiled, to rounding: a float rounding difference can flip one 8-bit code of the state (one step of its
    # quantization grid, seen as 3e-4 on 1 weight of 32768 with torchao's compiled update), never more
    torch.testing.assert_close(weights[1], weights[0], rtol=0, atol=1e-3)
    assert (weights[1] - weights[0]).abs().gt(1e-6).float().mean() < 1e-3
    # the metered peak holds the state and, during the eager update, a parameter's float32 moments being rewritten
    assert callbacks[1].reports["fit"]["optimizer"] >= _state_bytes(trainer)
    assert any("8-bit optimizer: its steps run uncompiled" in r.getMessage() for r in caplog.records)
