"""Demo: an MLP on scikit-learn's bundled 8x8 digits (no download)."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lowvram.demo._args import EpochShuffle, fraction, positive_int, positive_number


class DigitsDataModule(L.LightningDataModule):
    """``sklearn.datasets.load_digits`` (1,797 images, 64 features, 10 classes), split train/val/test.

    Args:
        batch_size: Samples per batch the loaders yield.
        val_fraction: Share of samples for validation.
        test_fraction: Share of samples for test.
        seed: Seed of the split.
        dtype: Feature dtype (``"float32"`` or ``"float64"``).

    Example:
        >>> dm = DigitsDataModule(batch_size=32)
        >>> dm.setup("fit")
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> tuple(x.shape), tuple(y.shape)
        ((32, 64), (32,))

    """

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        seed: int = 0,
        dtype: str = "float32",
    ) -> None:
        super().__init__()
        positive_int(batch_size=batch_size)
        fraction(val_fraction=val_fraction, test_fraction=test_fraction)
        if dtype not in ("float32", "float64", "bfloat16", "float16"):
            raise ValueError(f"dtype must be one of float32, float64, bfloat16, float16, got {dtype!r}")
        self.batch_size = batch_size
        self.val_fraction, self.test_fraction, self.seed = val_fraction, test_fraction, seed
        self.dtype = getattr(torch, dtype)
        self.splits: dict[str, TensorDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        x = torch.as_tensor(x, dtype=self.dtype) / 16.0
        y = torch.as_tensor(y, dtype=torch.long)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.seed))
        n_val, n_test = int(len(x) * self.val_fraction), int(len(x) * self.test_fraction)
        parts = {"val": order[:n_val], "test": order[n_val : n_val + n_test], "train": order[n_val + n_test :]}
        self.splits = {name: TensorDataset(x[idx], y[idx]) for name, idx in parts.items()}

    def train_dataloader(self) -> DataLoader:
        train = self.splits["train"]
        return DataLoader(train, batch_size=self.batch_size, sampler=EpochShuffle(len(train), self.seed))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["val"], batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["test"], batch_size=self.batch_size)

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.splits["test"].tensors[0]), batch_size=self.batch_size)


class DigitsMLP(L.LightningModule):
    """A small MLP classifier with torchmetrics accuracy for val/test.

    Args:
        hidden: Width of the hidden layers.
        depth: Number of hidden layers.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.

    Example:
        >>> DigitsMLP(hidden=32)(torch.zeros(2, 64)).shape
        torch.Size([2, 10])

    """

    def __init__(self, hidden: int = 128, depth: int = 2, lr: float = 1e-2, weight_decay: float = 0.0) -> None:
        super().__init__()
        positive_int(hidden=hidden, depth=depth)
        positive_number(lr=lr)
        if isinstance(weight_decay, bool) or not isinstance(weight_decay, int | float) or weight_decay < 0:
            raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
        self.save_hyperparameters()
        layers: list[nn.Module] = []
        width = 64
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, 10))
        self.net = nn.Sequential(*layers)
        self.val_acc = torchmetrics.Accuracy(task="multiclass", num_classes=10)
        self.test_acc = torchmetrics.Accuracy(task="multiclass", num_classes=10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val/loss", F.cross_entropy(logits, y))
        self.log("val/acc", self.val_acc, prog_bar=True)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.test_acc(self(x), y)
        self.log("test/acc", self.test_acc)

    def predict_step(self, batch: tuple[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self(batch[0]).argmax(dim=-1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
