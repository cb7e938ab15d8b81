"""Tiny random-init Hugging Face models built from their configs (no download), wrapped as users write them.

``HFModule`` is how users fine-tune a Hugging Face model in Lightning: a dict batch in, ``outputs.loss`` out, the loss
logged. ``hf_model`` builds GPT-2 (``Conv1D``, tied embeddings), Llama (grouped-query attention, RoPE) or BERT for
sequence classification at a tiny width with random weights; ``hf_batches`` gives padded dict batches for them.

Example:
    >>> module = HFModule(hf_model("llama"))
    >>> batch = next(iter(hf_batches("llama", n=2, batch_size=2)))
    >>> float(module.training_step(batch, 0).detach()) > 0
    True

"""

from __future__ import annotations

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader

VOCAB = 96  # the tiny models' vocabulary


def hf_model(name: str, layers: int = 2, hidden: int = 64) -> nn.Module:
    """A tiny random-init Hugging Face model built from its config (no download), dropout off.

    Args:
        name: ``"gpt2"``, ``"llama"``, ``"bert"`` (sequence classification, 3 labels) or ``"bert_mlm"``.
        layers: Transformer layers.
        hidden: Hidden size.

    """
    from transformers import (
        BertConfig,
        BertForMaskedLM,
        BertForSequenceClassification,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

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
    from transformers import BatchEncoding

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
