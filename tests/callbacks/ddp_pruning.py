"""Two CPU processes (DDP, gloo) with PruningCallback; run by test_pruning, re-launched per rank.

Usage: ``python tests/callbacks/ddp_pruning.py OUT_DIR METHOD``. Each rank writes ``OUT_DIR/rank<r>.pt``.
"""

import sys

import lightning as L
import torch

from lightning_lowvram import PruningCallback
from lightning_lowvram.demo import DigitsDataModule, DigitsMLP
from tests.helpers import quiet_trainer


def main(out: str, method: str) -> None:
    L.seed_everything(0)
    model = DigitsMLP(hidden=64)
    pruning = PruningCallback(0.5, method=method, criterion="random", start_step=0, end_step=6, frequency=2)
    trainer = quiet_trainer(
        devices=2,
        strategy="ddp",
        max_steps=10,
        limit_val_batches=0,
        callbacks=[pruning],
    )
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=32))
    state = {"weights": model.state_dict(), "masks": pruning.state_dict()["masks"], "events": pruning.events}
    torch.save(state, f"{out}/rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:])
