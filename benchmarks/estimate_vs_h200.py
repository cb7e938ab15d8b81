"""The estimator's CUDA rules against the one real-GPU measurement there is (issue 12's table, an NVIDIA H200).

The *measured* column was taken on an H200 (torch 2.11 + CUDA 13, Lightning 2.6.6, 2026-11-27): the peak of
``torch.cuda.max_memory_allocated()`` over a 2-step AdamW Lightning fit. This script traces the same settings on fake
tensors here, under the H200's rules (compute capability 9.0, no context allowance, as the measurement has none), and
prints estimate/measured. Models: HF GPT-2 small (random init, ``GPT2Config(n_positions=1024)``; dropout 0 except the
dropout row) and torchvision's resnet18 shapes (``tests/real_models/models.py``, ``resnet18()``; torchvision does not
import beside the CPU torch).

The checkpointing row was measured with the ActivationCheckpointingCallback of that day, which left HF's key/value
cache on: the cache, held by the checkpointed blocks' inputs, kept every layer's keys and values through backward
(+576 MiB here). The callback turns the cache off since (commit de51e74); the row is traced as measured (cache kept),
and a last row gives today's prediction, which no GPU has measured yet.

Run: ``python -m benchmarks.estimate_vs_h200`` from the repository root (about a minute on 2 CPU cores).
"""

from __future__ import annotations

import contextlib
import dataclasses
import platform
from datetime import date
from unittest import mock

import lightning as L
import torch
import torch.nn.functional as F

from lightning_lowvram import estimate_step_memory, gpu_profile
from lightning_lowvram.demo.hf import HFModule
from lightning_lowvram.demo.resnet import resnet18

H200 = dataclasses.replace(gpu_profile("h200_141gb"), context_mib=0)


class ResNetModule(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = resnet18()

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters())


def gpt2(dropout: float) -> HFModule:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_positions=1024, bos_token_id=0, eos_token_id=0, resid_pdrop=dropout, embd_pdrop=dropout,
                        attn_pdrop=dropout)  # fmt: skip
    return HFModule(GPT2LMHeadModel(config), optimizer="adamw")


def text(batch: int, seq: int) -> dict[str, torch.Tensor]:
    ids = torch.zeros(batch, seq, dtype=torch.long)
    return {"input_ids": ids, "labels": ids}


def cache_kept() -> contextlib.AbstractContextManager:
    """The checkpointing callback as measured: HF's key/value cache left on."""
    return mock.patch("lightning_lowvram.cores.activation_checkpointing._cache_off", lambda model: None)


# (row, module factory, batch, estimate keywords, measured MiB on the H200 or None, context of the trace)
ROWS = [
    ("HF GPT-2 small, 8 x 1024", lambda: gpt2(0.0), text(8, 1024), {"precision": "32-true"}, 14896, None),
    ("HF GPT-2 small, 8 x 1024", lambda: gpt2(0.0), text(8, 1024), {"precision": "bf16-mixed"}, 12829, None),
    ("HF GPT-2 small, dropout 0.1", lambda: gpt2(0.1), text(8, 1024), {"precision": "bf16-mixed"}, 12987, None),
    ("HF GPT-2 small, 16 x 512, micro 4", lambda: gpt2(0.0), text(16, 512), {"micro_batch_size": 4}, 5326, None),
    ("HF GPT-2 small + checkpointing (cache kept, as measured)", lambda: gpt2(0.0), text(8, 1024),
     {"activation_checkpointing": True}, 7121, cache_kept),
    ("resnet18, 64 x 224²", ResNetModule, (torch.zeros(64, 3, 224, 224), torch.zeros(64, dtype=torch.long)),
     {"precision": "32-true"}, 1572, None),
    ("resnet18, 64 x 224²", ResNetModule, (torch.zeros(64, 3, 224, 224), torch.zeros(64, dtype=torch.long)),
     {"precision": "bf16-mixed"}, 993, None),
    ("HF GPT-2 small + checkpointing (today's callback)", lambda: gpt2(0.0), text(8, 1024),
     {"activation_checkpointing": True}, None, None),
]  # fmt: skip


def main() -> None:
    print(f"Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, {date.today()}\n")
    print("| model | precision | estimate MiB | measured MiB (H200) | estimate/measured |")
    print("|---|---|---|---|---|")
    for name, make, batch, kwargs, measured, context in ROWS:
        mib = estimate_mib(make, batch, kwargs, context)
        precision = kwargs.get("precision", "32-true")
        ratio = f"{mib / measured:.3f}" if measured else "not measured"
        print(f"| {name} | {precision} | {mib:.0f} | {measured or '-'} | {ratio} |")


def estimate_mib(make, batch, kwargs, context) -> float:
    torch.manual_seed(0)
    with context() if context else contextlib.nullcontext():
        return estimate_step_memory(make(), batch, gpu=H200, **kwargs).peak / 2**20


if __name__ == "__main__":
    main()
