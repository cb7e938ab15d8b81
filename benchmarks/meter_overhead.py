"""What MemoryReportCallback costs per training step: sampled (the default) and metering every step, vs none.

A small GPT (TinyGPT d_model 128, 4 layers, sequence 64, batch 32, AdamW) fits 40 steps on the CPU; the median step
time of steps 6-40 (after the sampled steps) is compared, 3 rounds in rotating order, medians of the per-round
ratios; and the reported peaks of the two metered runs.

Run: ``python -m benchmarks.meter_overhead`` (about a minute on 2 CPU cores).
"""

from __future__ import annotations

import logging
import platform
import statistics
import time
import warnings
from datetime import date

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from lightning_lowvram import MemoryReportCallback
from lightning_lowvram.demo import TinyGPT, TinyTextDataModule

STEPS, SKIP = 40, 5


class StepTimer(Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter() - self.start)


def run(kind: str) -> tuple[float, int | None]:
    L.seed_everything(0)
    timer = StepTimer()
    callbacks: list[Callback] = [timer]
    report = None
    if kind != "none":
        report = MemoryReportCallback(stages=["fit"], print_table=False, steps=None if kind == "every step" else 3)
        callbacks.append(report)
    trainer = L.Trainer(max_steps=STEPS, callbacks=callbacks, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)  # fmt: skip
    trainer.fit(TinyGPT(seq_len=64, d_model=128, n_head=4, n_layer=4), TinyTextDataModule(batch_size=32))
    return statistics.median(timer.times[SKIP:]), report.reports["fit"].total if report else None


def main() -> None:
    logging.getLogger("lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    kinds = ["none", "sampled (default, steps=3)", "every step"]
    ratios: dict[str, list[float]] = {k: [] for k in kinds[1:]}
    peaks: dict[str, int | None] = {}
    for r in range(3):
        order = kinds[r:] + kinds[:r]
        times = {}
        for kind in order:
            times[kind], peaks[kind] = run(kind)
        for kind in kinds[1:]:
            ratios[kind].append(times[kind] / times["none"])
    print(f"# meter overhead — {date.today()} — {platform.machine()}, torch {torch.__version__}")
    print("| MemoryReportCallback | step time / no callback (median of 3 rounds) | rounds | reported fit peak |")
    print("|---|---|---|---|")
    for kind in kinds[1:]:
        rounds = ", ".join(f"{x:.3f}" for x in ratios[kind])
        print(f"| {kind} | {statistics.median(ratios[kind]):.3f} | {rounds} | {peaks[kind]:,} B |")


if __name__ == "__main__":
    main()
