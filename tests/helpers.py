"""Small modules the tests (and configs in tests) point `_target_` at."""

import lightning as L
import torch
from torch import nn


class NoTrainingStep(L.LightningModule):
    """A LightningModule that forgot `training_step`."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(64, 10)


class NotAModule:
    """Not a LightningModule at all."""


def quiet_trainer(**kwargs) -> L.Trainer:
    defaults = dict(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


def state_bytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)
