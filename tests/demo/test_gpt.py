import lightning as L
import pytest

from lightning_lowvram.demo import TinyGPT, TinyTextDataModule
from tests.helpers import quiet_trainer


def test_loss_drops_below_uniform():
    L.seed_everything(0)
    model, data = TinyGPT(seq_len=32, d_model=64, n_head=2, n_layer=1), TinyTextDataModule(seq_len=32, batch_size=8)
    trainer = quiet_trainer(max_epochs=4)
    trainer.fit(model, datamodule=data)
    (result,) = trainer.validate(model, datamodule=data, verbose=False)
    assert result["val/loss"] < 3.5  # uniform over 256 bytes is ln(256) = 5.55


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="model.d_model=30 must be divisible by model.n_head=4"):
        TinyGPT(d_model=30, n_head=4)
    with pytest.raises(ValueError, match="data.seq_len=100000 is too long"):
        TinyTextDataModule(seq_len=100_000).setup("fit")
