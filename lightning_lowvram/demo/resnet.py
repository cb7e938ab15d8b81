"""A ResNet-style Conv+BatchNorm net as users write it (torchvision does not import beside the CPU torch here).

Basic blocks with a strided 1x1 shortcut, as in torchvision's ``resnet18``; ``resnet18()`` has its shapes.

Example:
    >>> sum(p.numel() for p in resnet18().parameters())
    11689512

"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader


class BasicBlock(nn.Module):
    """ResNet's basic block: conv-bn-relu-conv-bn plus the identity or a strided 1x1 conv+bn shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class TinyResNet(nn.Module):
    """``resnet18``'s layout at a small width: stem, four stages of basic blocks, global pool, classifier.

    ``imagenet_stem=True`` uses torchvision's stem (7x7 stride-2 convolution and 3x3 stride-2 max-pool), so
    ``TinyResNet(64, classes=1000, imagenet_stem=True)`` has torchvision's resnet18 shapes (``resnet18()``).
    """

    def __init__(self, width: int = 8, blocks: int = 2, classes: int = 10, imagenet_stem: bool = False) -> None:
        super().__init__()
        if imagenet_stem:
            self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
            self.pool = nn.MaxPool2d(3, 2, 1)
        else:
            self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
            self.pool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(width)
        stages, cin = [], width
        for i in range(4):
            cout = width * 2**i
            stages.append(nn.Sequential(*[BasicBlock(cin if b == 0 else cout, cout, 2 if i and b == 0 else 1)
                                          for b in range(blocks)]))  # fmt: skip
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(x.mean((2, 3)))


def resnet18() -> TinyResNet:
    """Torchvision's resnet18 shapes (11.7M parameters), random init (its torchvision does not import here)."""
    return TinyResNet(64, classes=1000, imagenet_stem=True)


class ResNetModule(L.LightningModule):
    """A Conv+BatchNorm classifier as users write it: ``(images, labels)`` batches."""

    def __init__(self, width: int = 8, lr: float = 0.05) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net, self.lr = TinyResNet(width), lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def image_batches(n: int = 16, batch_size: int = 8, size: int = 16) -> DataLoader:
    """Random ``(images, labels)`` batches for the net (10 classes)."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)
    return DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)
