"""Small modules the tests (and configs in tests) point `_target_` at."""

import lightning as L
import torch
from lightning.pytorch.loggers import Logger
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


class UserModule(L.LightningModule):
    """A user's own module, run through `lowvram fit model._target_=tests.helpers.UserModule`."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("user/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class UserData(L.LightningDataModule):
    def __init__(self, batch_size: int = 8) -> None:
        super().__init__()
        self.batch_size = batch_size

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(64, 8, generator=g)
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), self.batch_size)


class InterruptAfter(L.Callback):
    """Press Ctrl-C (raise ``KeyboardInterrupt``) when the optimizer step ``steps`` is done."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.steps:
            raise KeyboardInterrupt


class RecordingLogger(Logger):
    """A logger that keeps the last value of every metric (what the callbacks report through the Trainer)."""

    name = "recording"
    version = 0

    def __init__(self) -> None:
        super().__init__()
        self.metrics: dict[str, float] = {}

    def log_metrics(self, metrics, step=None):
        self.metrics.update(metrics)

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def seeded_fit(model: L.LightningModule, data: L.LightningDataModule, callbacks=(), **kwargs) -> L.Trainer:
    """``quiet_trainer(...).fit`` after ``seed_everything(0)``: 3 steps and no validation unless told otherwise."""
    L.seed_everything(0)
    trainer = quiet_trainer(callbacks=list(callbacks), **{"max_steps": 3, "limit_val_batches": 0, **kwargs})
    trainer.fit(model, datamodule=data)
    return trainer


class TinyCausalLM(L.LightningModule):
    """A user's module around a tiny random-init HF Llama (vocabulary 32000), for `lowvram plan max_context=true`."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=32000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=65536,
        )  # fmt: skip
        self.model = LlamaForCausalLM(config)

    def training_step(self, batch, batch_idx):
        loss = self.model(**batch).loss
        self.log("train_loss", loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


class TokenData(L.LightningDataModule):
    """Two rows of 256 token ids, labels = inputs (a causal LM's data)."""

    def train_dataloader(self):
        ids = torch.randint(0, 32000, (2, 256), generator=torch.Generator().manual_seed(0))
        rows = [{"input_ids": row, "labels": row} for row in ids]
        return torch.utils.data.DataLoader(rows, batch_size=2)
