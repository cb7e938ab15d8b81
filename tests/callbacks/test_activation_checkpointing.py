import lightning as L
import pytest
import torch

from lightning_lowvram import ActivationCheckpointingCallback, MemoryReportCallback
from lightning_lowvram.demo import TinyGPT, TinyTextDataModule
from tests.ddp import run_ddp
from tests.helpers import quiet_trainer


def _fit(callbacks):
    L.seed_everything(0)
    model, report = TinyGPT(seq_len=64, d_model=64, n_head=4, n_layer=4), MemoryReportCallback(print_table=False)
    quiet_trainer(max_steps=3, limit_val_batches=0, callbacks=[*callbacks, report]).fit(
        model, datamodule=TinyTextDataModule(seq_len=64, batch_size=16)
    )
    return model, report.reports["fit"]


def test_training_with_checkpointed_blocks_matches_and_keeps_fewer_activations():
    plain, plain_memory = _fit([])
    callback = ActivationCheckpointingCallback()
    model, memory = _fit([callback])
    for a, b in zip(model.parameters(), plain.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    assert memory.by_category["activations"] < 0.6 * plain_memory.by_category["activations"]
    assert memory.total < plain_memory.total
    assert callback.blocks_wrapped == [] and "forward" not in model.blocks[0].__dict__  # unwrapped at teardown


@pytest.mark.slow  # DDP: two subprocesses
def test_under_ddp_ranks_agree_and_match_the_unwrapped_ddp_run(tmp_path):
    from tests.callbacks import ddp_activation_checkpointing

    wrapped = run_ddp(ddp_activation_checkpointing.__file__, tmp_path / "on", "on")
    plain = run_ddp(ddp_activation_checkpointing.__file__, tmp_path / "off", "off")
    for name, value in wrapped[0]["weights"].items():
        assert torch.equal(value, wrapped[1]["weights"][name]), name  # one all-reduced update on both ranks
        assert torch.allclose(value, plain[0]["weights"][name], atol=1e-6), name  # dropout replayed identically
