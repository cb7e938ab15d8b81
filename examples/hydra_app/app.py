"""Another Hydra app honouring lowvram's `gpu=` and `strategy=`.

Run: cd examples/hydra_app && python app.py gpu=t4_16gb strategy=micro_batch
"""

import hydra
import lightning as L

from lightning_lowvram.demo import DigitsDataModule, DigitsMLP
from lightning_lowvram.hydra_setup import lowvram_setup


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg) -> None:
    model, data = DigitsMLP(), DigitsDataModule()
    data.setup("fit")
    setup = lowvram_setup(cfg, model=model, batch=next(iter(data.train_dataloader())))  # the one call
    trainer = L.Trainer(
        max_steps=2, limit_val_batches=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=setup.callbacks, **setup.trainer_kwargs,
    )  # fmt: skip
    with setup.budget():
        trainer.fit(model, datamodule=data)
    print(setup.profile.name, setup.profile.memory_gib, sorted(type(c).__name__ for c in setup.callbacks))


if __name__ == "__main__":
    main()
