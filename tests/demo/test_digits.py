import lightning as L

from lightning_lowvram.demo import DigitsDataModule, DigitsMLP
from tests.helpers import quiet_trainer


def test_splits_are_disjoint_and_cover_the_dataset():
    dm = DigitsDataModule()
    dm.setup("fit")
    sizes = {k: len(v) for k, v in dm.splits.items()}
    assert sum(sizes.values()) == 1797 and sizes["val"] == sizes["test"] == 269


def test_the_demo_learns():
    L.seed_everything(0)
    model, data = DigitsMLP(), DigitsDataModule()
    trainer = quiet_trainer(max_epochs=3)
    trainer.fit(model, datamodule=data)
    (result,) = trainer.test(model, datamodule=data, verbose=False)
    assert result["test/acc"] > 0.9
    predictions = trainer.predict(model, datamodule=data)
    assert sum(len(p) for p in predictions) == 269
