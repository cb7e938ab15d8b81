"""Two CPU processes (DDP, gloo) training TinyGPT, with or without ActivationCheckpointingCallback.

Usage: ``python tests/callbacks/ddp_activation_checkpointing.py OUT_DIR on|off``. Each rank writes
``OUT_DIR/rank<r>.pt``.
"""

import sys

import lightning as L
import torch

from lightning_lowvram import ActivationCheckpointingCallback
from lightning_lowvram.demo import TinyGPT, TinyTextDataModule
from tests.helpers import quiet_trainer


def main(out: str, checkpointing: str) -> None:
    L.seed_everything(0)
    model = TinyGPT(seq_len=32, d_model=32, n_head=4, n_layer=3, dropout=0.1)
    callbacks = [ActivationCheckpointingCallback()] if checkpointing == "on" else []
    trainer = quiet_trainer(
        devices=2,
        strategy="ddp",
        max_steps=4,
        limit_val_batches=0,
        callbacks=callbacks,
    )
    trainer.fit(model, datamodule=TinyTextDataModule(seq_len=32, batch_size=8))
    torch.save({"weights": model.state_dict()}, f"{out}/rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:])
