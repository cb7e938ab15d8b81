"""Two CPU processes (DDP, gloo) with AutoMicroBatchCallback; run by test_auto_micro_batch, re-launched per rank.

Usage: ``python tests/callbacks/ddp_micro_batch.py OUT_DIR MICRO_BATCH_SIZE RANK1_BUDGET_BYTES`` (budget 0: none).
Each rank writes ``OUT_DIR/rank<r>.pt``: its weights, the callback's state and its peak bytes (our meter).
"""

import sys

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, DistributedSampler

from lightning_lowvram import AutoMicroBatchCallback, MemoryReportCallback, memory_budget
from lightning_lowvram.demo import DigitsDataModule
from tests.helpers import quiet_trainer

PER_RANK_BATCH = 64
BATCHES = 4


class OrderedDigits(DigitsDataModule):
    """No shuffling: rank r gets samples r, r+2, ... so a step covers the same samples as one 2x batch would."""

    def train_dataloader(self) -> DataLoader:
        data = self.splits["train"]
        if self.trainer is not None and self.trainer.world_size > 1:
            sampler = DistributedSampler(data, self.trainer.world_size, self.trainer.global_rank, shuffle=False)
            return DataLoader(data, batch_size=self.batch_size, sampler=sampler)
        return DataLoader(data, batch_size=self.batch_size, shuffle=False)


class RankOneBudget(Callback):
    """An emulated device budget on rank 1 only, from training batch ``start``: that rank alone runs out of memory."""

    def __init__(self, limit: int, start: int = 0):
        self.limit, self.start, self.budget = limit, start, None

    def setup(self, trainer, pl_module, stage):
        if self.start == 0:
            self._enter(trainer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.start and self.start:
            self._enter(trainer)  # mid-window under accumulation: the window's gradients must be put back

    def _enter(self, trainer):
        if self.limit and trainer.global_rank == 1:
            self.budget = memory_budget(self.limit, device="cpu")
            self.budget.__enter__()

    def teardown(self, trainer, pl_module, stage):
        if self.budget is not None:
            self.budget.__exit__(None, None, None)


def fit_two_ranks(model, out: str, size: str, budget: Callback, weights=None, **trainer_kwargs) -> None:
    """Fit ``model`` on 2 CPU ranks with AutoMicroBatchCallback (size ``none``: without it) and ``budget``; each rank
    saves ``OUT/rank<r>.pt``: its weights (``weights(model)``, default the state dict), the callback's state, its
    peak and parameter bytes (our meter)."""
    data = OrderedDigits(batch_size=PER_RANK_BATCH, dtype="float64")
    data.setup("fit")
    micro = AutoMicroBatchCallback(micro_batch_size=int(size) if size.isdigit() else "auto")
    report = MemoryReportCallback(stages=["fit"], print_table=False)
    trainer = quiet_trainer(
        devices=2,
        max_epochs=1,
        use_distributed_sampler=False,  # OrderedDigits shards itself, without shuffling
        limit_train_batches=BATCHES,
        limit_val_batches=0,
        callbacks=([] if size == "none" else [micro]) + [report, budget],
        **trainer_kwargs,
    )
    trainer.fit(model, datamodule=data)
    stats = report.reports["fit"]
    state = {"weights": (weights or (lambda m: m.state_dict()))(model), "micro": micro.state_dict()}
    state |= {"peak": stats.total, "params": stats.by_category["parameters"]}
    state["micro_batch_size"] = micro.micro_batch_size
    torch.save(state, f"{out}/rank{trainer.global_rank}.pt")


def main(out: str, size: str, limit: str) -> None:
    from tests.callbacks.test_auto_micro_batch import WideNet

    L.seed_everything(0)
    fit_two_ranks(WideNet(), out, size, RankOneBudget(int(limit)), strategy="ddp")


if __name__ == "__main__":
    main(*sys.argv[1:])
