"""Tiny random-init versions of the architectures users bring, wrapped the way users write LightningModules.

HF GPT-2 (``Conv1D``, tied embeddings), Llama (grouped-query attention, RoPE), BERT for sequence classification
(padded batches) and a ResNet-style Conv+BatchNorm net (torchvision does not import beside the CPU torch here, so the
net is our own: basic blocks with a strided 1x1 shortcut, as in ``resnet18``). No weights are downloaded.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from transformers import (
    BatchEncoding,
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

VOCAB = 96
HF_NAMES = ("gpt2", "llama", "bert")
NAMES = (*HF_NAMES, "resnet")


def hf_model(name: str, layers: int = 2, hidden: int = 64) -> nn.Module:
    """A tiny random-init Hugging Face model built from its config (no download), dropout off."""
    torch.manual_seed(0)
    if name == "gpt2":
        config = GPT2Config(
            bos_token_id=0, eos_token_id=0,
            vocab_size=VOCAB, n_positions=128, n_embd=hidden, n_layer=layers, n_head=4,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )  # fmt: skip
        return GPT2LMHeadModel(config)
    if name == "llama":
        config = LlamaConfig(
            vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        )  # fmt: skip
        return LlamaForCausalLM(config)
    if name == "bert":
        config = BertConfig(
            vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
            intermediate_size=2 * hidden, max_position_embeddings=128, num_labels=3,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )  # fmt: skip
        return BertForSequenceClassification(config)
    if name == "bert_mlm":
        return BertForMaskedLM(BertConfig(**{**hf_model("bert").config.to_dict(), "architectures": None}))
    raise ValueError(name)


class HFModule(L.LightningModule):
    """How users fine-tune a Hugging Face model: a dict batch in, ``outputs.loss`` out."""

    def __init__(self, model: nn.Module, lr: float = 0.05, optimizer: str = "sgd") -> None:
        super().__init__()
        self.model, self.lr, self.optimizer = model, lr, optimizer

    def training_step(self, batch, batch_idx):
        outputs = self.model(**batch)
        self.log("train_loss", outputs.loss)
        return outputs.loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.model(**batch).loss)

    def test_step(self, batch, batch_idx):
        self.log("test_loss", self.model(**batch).loss)

    def predict_step(self, batch, batch_idx):
        return self.model(**{k: v for k, v in batch.items() if k != "labels"}).logits

    def configure_optimizers(self):
        if self.optimizer == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def hf_batches(name: str, n: int = 16, batch_size: int = 8, seq: int = 16, encoding: bool = False) -> DataLoader:
    """Padded dict batches (right padding, varying lengths): causal LMs get ``labels`` = ids with -100 on padding."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (n, seq), generator=g)
    lengths = torch.randint(seq // 4, seq + 1, (n,), generator=g)
    mask = (torch.arange(seq)[None] < lengths[:, None]).long()
    ids = ids * mask
    if name == "bert":
        labels = torch.randint(0, 3, (n,), generator=g)
    elif name == "bert_mlm":  # about 15 % of the real tokens are predicted, as in BERT's pre-training
        labels = ids.masked_fill((mask == 0) | (torch.rand(n, seq, generator=g) > 0.15), -100)
    else:
        labels = ids.masked_fill(mask == 0, -100)
    rows = [{"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]} for i in range(n)]

    def collate(items):
        batch = {key: torch.stack([item[key] for item in items]) for key in items[0]}
        return BatchEncoding(batch) if encoding else batch

    return DataLoader(rows, batch_size=batch_size, collate_fn=collate)


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
    """torchvision's resnet18 shapes (11.7M parameters), random init (its torchvision does not import here)."""
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
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)
    return DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)


def build(name: str, **kwargs) -> tuple[L.LightningModule, DataLoader]:
    """The module and its training loader for one of :data:`NAMES`."""
    if name == "resnet":
        return ResNetModule(), image_batches(**kwargs)
    return HFModule(hf_model(name)), hf_batches(name, **kwargs)


def first_batch(name: str, **kwargs):
    return next(iter(build(name, **kwargs)[1]))


CAUSAL_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "gpt2")


def causal_lm(model_type: str, vocab: int = VOCAB, hidden: int = 32, **overrides) -> nn.Module:
    """A tiny random-init HF causal LM of ``model_type`` from its config (no download), dropout off.

    Gemma-2 gets a small ``final_logit_softcapping`` so the capping is exercised, not saturated or idle.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    if model_type == "gpt2":
        return (
            hf_model("gpt2", hidden=hidden)
            if vocab == VOCAB and not overrides
            else GPT2LMHeadModel(
                GPT2Config(**{**hf_model("gpt2", hidden=hidden).config.to_dict(), "vocab_size": vocab, **overrides})
            )
        )
    kwargs = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, max_position_embeddings=4096,
        attention_dropout=0.0, pad_token_id=0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    if model_type == "gemma2":
        kwargs |= {"final_logit_softcapping": 2.0, "attn_logit_softcapping": None, "query_pre_attn_scalar": hidden // 4}
    config = AutoConfig.for_model(model_type, **{**kwargs, **overrides})
    return AutoModelForCausalLM.from_config(config)
