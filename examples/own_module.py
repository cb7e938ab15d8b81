"""Your own LightningModule, plain Trainer, no Hydra: measure the peak and emulate a smaller card on CPU.

Run: python examples/own_module.py
"""

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lowvram import MemoryReportCallback, format_bytes, gpu_profile, memory_budget


class Regressor(L.LightningModule):
    def __init__(self, width: int = 512):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(32, width), nn.ReLU(), nn.Linear(width, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def main() -> None:
    data = DataLoader(TensorDataset(torch.randn(512, 32), torch.randn(512, 1)), batch_size=64)
    report = MemoryReportCallback(stages=["fit"])
    trainer = L.Trainer(max_epochs=1, callbacks=[report], logger=False, enable_checkpointing=False)
    card = gpu_profile("rtx3060_12gb")
    # on a machine without that card, the fit runs under its memory, emulated: past it, torch.OutOfMemoryError
    with memory_budget(card, device="cpu"):
        trainer.fit(Regressor(), data)
    print(
        f"peak {format_bytes(report.reports['fit'].total)} of {format_bytes(card.usable_bytes)} usable on {card.name}"
    )


if __name__ == "__main__":
    main()
