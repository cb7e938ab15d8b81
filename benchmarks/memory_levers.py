"""What activation checkpointing and 8-bit optimizer state save and cost, measured with the meter on the CPU.

The demo GPT (TinyGPT d_model 256, 4 layers, sequence 128, batch 32, AdamW) fits 20 steps; the fit's peak by
category is ``MemoryReportCallback``'s (the first 3 steps metered), the step time the median of steps 6-20 (the 8-bit
optimizer's first step compiles). One run per setting, back to back in one process.

Run: ``python -m benchmarks.memory_levers`` (about two minutes on 2 CPU cores).
"""

from __future__ import annotations

import logging
import platform
import statistics
import warnings
from datetime import date

import lightning as L
import torch

from benchmarks.common import quiet_trainer
from benchmarks.meter_overhead import StepTimer
from lightning_lowvram import ActivationCheckpointingCallback, EightBitOptimizerCallback, MemoryReportCallback
from lightning_lowvram.demo import TinyGPT, TinyTextDataModule

STEPS, SKIP = 20, 5
SETTINGS = {
    "plain": [],
    "activation checkpointing": [ActivationCheckpointingCallback],
    "8-bit optimizer state": [EightBitOptimizerCallback],
}


def run(name: str) -> tuple[dict[str, int], float]:  # (peak bytes by category and 'total', s / step)
    L.seed_everything(0)
    timer, report = StepTimer(), MemoryReportCallback(stages=["fit"], print_table=False, steps=3)
    callbacks = [timer, report, *(make() for make in SETTINGS[name])]
    trainer = quiet_trainer(max_steps=STEPS, callbacks=callbacks, limit_val_batches=0)
    trainer.fit(TinyGPT(seq_len=128, d_model=256, n_head=4, n_layer=4), TinyTextDataModule(batch_size=32))
    peak = report.reports["fit"]
    return {**peak.by_category, "total": peak.total}, statistics.median(timer.times[SKIP:])


def main() -> None:
    logging.getLogger("lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    results = {name: run(name) for name in SETTINGS}
    base, base_time = results["plain"]
    mib = 2**20
    print(f"# memory levers — {date.today()} — {platform.machine()}, torch {torch.__version__}")
    print("| setting | fit peak (MiB) | vs plain | activations (MiB) | optimizer state (MiB) | s / step | vs plain |")
    print("|---|---|---|---|---|---|---|")
    for name, (peak, seconds) in results.items():
        print(
            f"| {name} | {peak['total'] / mib:.2f} | {peak['total'] / base['total']:.2f}x | "
            f"{peak.get('activations', 0) / mib:.2f} | {peak.get('optimizer', 0) / mib:.2f} | {seconds:.3f} | "
            f"{seconds / base_time:.2f}x |"
        )


if __name__ == "__main__":
    main()
