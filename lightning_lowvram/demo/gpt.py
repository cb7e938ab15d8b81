"""Demo: a tiny GPT-style byte-level language model on text the package ships (no download)."""

from __future__ import annotations

import math
from importlib import resources
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_lowvram.demo._args import EpochShuffle, fraction, positive_int, positive_number


class ByteWindows(Dataset):
    """Non-overlapping windows of ``seq_len + 1`` bytes: ``(input, next-byte target)``."""

    def __init__(self, data: torch.Tensor, seq_len: int) -> None:
        self.data, self.seq_len = data, seq_len

    def __len__(self) -> int:
        return max((len(self.data) - 1) // self.seq_len, 0)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = self.data[i * self.seq_len : (i + 1) * self.seq_len + 1]
        return chunk[:-1], chunk[1:]


class TinyTextDataModule(L.LightningDataModule):
    """Byte-level windows of a text file (default: ``tiny_text.txt`` shipped with the package).

    Args:
        path: A UTF-8 text file; ``None`` uses the bundled text.
        seq_len: Tokens (bytes) per sample.
        batch_size: Samples per batch.
        val_fraction: Tail share of the text used for validation and test.

    Example:
        >>> dm = TinyTextDataModule(seq_len=32, batch_size=4)
        >>> dm.setup("fit")
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> tuple(x.shape), bool((x[:, 1:] == y[:, :-1]).all())
        ((4, 32), True)

    """

    def __init__(self, path: str | None = None, seq_len: int = 64, batch_size: int = 16, val_fraction: float = 0.1):
        super().__init__()
        positive_int(seq_len=seq_len, batch_size=batch_size)
        fraction(val_fraction=val_fraction)
        self.path, self.seq_len, self.batch_size, self.val_fraction = path, seq_len, batch_size, val_fraction
        self.splits: dict[str, ByteWindows] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        if self.path is None:
            raw = (resources.files("lightning_lowvram.demo") / "tiny_text.txt").read_bytes()
        else:
            raw = Path(self.path).read_bytes()
        data = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()
        cut = int(len(data) * (1 - self.val_fraction))
        self.splits = {"train": ByteWindows(data[:cut], self.seq_len), "val": ByteWindows(data[cut:], self.seq_len)}
        if len(self.splits["train"]) == 0 or len(self.splits["val"]) == 0:
            raise ValueError(f"data.seq_len={self.seq_len} is too long for a text of {len(data)} bytes")

    def train_dataloader(self) -> DataLoader:
        train = self.splits["train"]
        return DataLoader(train, batch_size=self.batch_size, sampler=EpochShuffle(len(train)))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["val"], batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with fused QKV; ``n_head`` heads of ``d_model // n_head``."""

    def __init__(self, d_model: int, n_head: int, dropout: float = 0.0) -> None:
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"model.d_model={d_model} must be divisible by model.n_head={n_head}")
        self.n_head, self.dropout = n_head, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_head, -1).permute(2, 0, 3, 1, 4)
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        return self.proj(out.transpose(1, 2).reshape(b, t, -1))


class LoRALinear(nn.Module):
    """A frozen ``base`` Linear plus a trainable low-rank update ``B(A(x)) * alpha / rank`` (Hu et al. 2021, LoRA).

    ``B`` starts at zero, so the wrapped layer starts equal to the base; ``alpha = 2 * rank`` (peft's default ratio).

    Example:
        >>> layer = LoRALinear(nn.Linear(8, 4), rank=2)
        >>> [n for n, p in layer.named_parameters() if p.requires_grad]
        ['lora_a.weight', 'lora_b.weight']

    """

    def __init__(self, base: nn.Linear, rank: int) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_a = nn.Linear(base.in_features, rank, bias=False)
        self.lora_b = nn.Linear(rank, base.out_features, bias=False)
        nn.init.zeros_(self.lora_b.weight)
        self.scale = 2.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_b(self.lora_a(x)) * self.scale


class Block(nn.Module):
    """Pre-norm transformer block: attention and a 4x MLP, each with a residual (GPT-2's dropout placement)."""

    def __init__(self, d_model: int, n_head: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_head, dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.mlp(self.ln2(x)))


class TinyGPT(L.LightningModule):
    """A GPT-style decoder over bytes (vocabulary 256).

    Args:
        seq_len: Maximum context length (position embeddings).
        d_model: Embedding width.
        n_head: Attention heads per block.
        n_layer: Number of blocks.
        lr: AdamW learning rate.
        dropout: Attention and residual dropout in training (GPT-2 uses 0.1).
        lora_rank: 0 trains every weight; ``r > 0`` freezes the model and trains rank-``r`` LoRA adapters on the
            attention projections only (the fine-tuning whose frozen base ``strategy=lora_4bit`` stores in 4 bits).

    Example:
        >>> TinyGPT(seq_len=16, d_model=32, n_head=2, n_layer=1)(torch.zeros(2, 16, dtype=torch.long)).shape
        torch.Size([2, 16, 256])

    """

    vocab_size = 256

    def __init__(
        self,
        seq_len: int = 64,
        d_model: int = 128,
        n_head: int = 4,
        n_layer: int = 2,
        lr: float = 3e-3,
        dropout: float = 0.0,
        lora_rank: int = 0,
    ):
        super().__init__()
        positive_int(seq_len=seq_len, d_model=d_model, n_head=n_head, n_layer=n_layer)
        if isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank < 0:
            raise ValueError(f"lora_rank must be 0 (no adapters) or an integer >= 1, got {lora_rank!r}")
        positive_number(lr=lr)
        fraction(dropout=dropout)
        self.save_hyperparameters()
        self.tok = nn.Embedding(self.vocab_size, d_model)
        self.pos = nn.Embedding(seq_len, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, self.vocab_size)
        if lora_rank:
            self.requires_grad_(False)
            for block in self.blocks:
                block.attn.qkv = LoRALinear(block.attn.qkv, lora_rank)
                block.attn.proj = LoRALinear(block.attn.proj, lora_rank)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    def _loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x).flatten(0, 1), y.flatten())

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        loss = self._loss(batch)
        self.log("val/loss", loss, prog_bar=True)
        self.log("val/bits_per_byte", loss / math.log(2))

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.log("test/loss", self._loss(batch))

    def predict_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        """The most likely next byte at every position."""
        return self(batch[0]).argmax(dim=-1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW((p for p in self.parameters() if p.requires_grad), lr=self.hparams.lr)
