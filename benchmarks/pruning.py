"""PruningCallback (structured and unstructured) vs Lightning's ModelPruning at the same amount, one run, one table.

Same model (digits MLP 64-1024-1024-1024-10, AdamW), same data, same seed, 12 epochs; every method prunes 50 % after
the first epoch (Lightning's ModelPruning at its first epoch end; ours from optimizer step 20, the same point).
Measured: state bytes during training (parameters + buffers + gradients + optimizer state, counted from tensors, at
the last training batch, before anything is made permanent; our bool masks included), median train-step time over
the last 4 epochs, inference
time of the test set (median of 20), test accuracy.

Three rounds (order reversed every other round), medians reported.

Run: ``python benchmarks/pruning.py`` (about a minute on 2 CPU cores).
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
from lightning.pytorch.callbacks import Callback, ModelPruning

from lightning_lowvram import PruningCallback
from lightning_lowvram.demo import DigitsDataModule, DigitsMLP

EPOCHS, AMOUNT, PRUNE_AT = 12, 0.5, 20  # 20 optimizer steps = one epoch of digits at batch 64


class Probe(Callback):
    """Step times (last 4 epochs) and state bytes at the last training batch."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.bytes = 0
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch >= EPOCHS - 4:
            self.times.append(time.perf_counter() - self._start)
        tensors = [*pl_module.parameters(), *pl_module.buffers()]  # ModelPruning's float masks are buffers
        tensors += [m for cb in trainer.callbacks if isinstance(cb, PruningCallback) for m in cb.masks.values()]
        tensors += [p.grad for p in pl_module.parameters() if p.grad is not None]
        tensors += [t for o in trainer.optimizers for s in o.state.values() for t in s.values() if torch.is_tensor(t)]
        self.bytes = sum(t.nbytes for t in tensors)


def run(name: str, callbacks: list[Callback]) -> dict[str, float]:
    L.seed_everything(0)
    model, data = DigitsMLP(hidden=1024, depth=3), DigitsDataModule(batch_size=64)
    probe = Probe()
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=EPOCHS,
        limit_val_batches=0,
        callbacks=[*callbacks, probe],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=data)
    accuracy = trainer.test(model, datamodule=data, verbose=False)[0]["test/acc"]
    x = data.splits["test"].tensors[0]
    model.eval()
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        latencies = []
        for _ in range(20):
            start = time.perf_counter()
            model(x)
            latencies.append(time.perf_counter() - start)
    return {
        "name": name,
        "state_mib": probe.bytes / 2**20,
        "step_ms": statistics.median(probe.times) * 1e3,
        "infer_ms": statistics.median(latencies) * 1e3,
        "accuracy": accuracy,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def main() -> None:
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    def at_step(step: int) -> float:
        return AMOUNT if step >= PRUNE_AT else 0.0

    configs = [
        ("no pruning", lambda: []),
        ("ours structured", lambda: [PruningCallback(AMOUNT, schedule=at_step)]),
        ("ours unstructured (bool masks)", lambda: [PruningCallback(AMOUNT, method="unstructured", schedule=at_step)]),
        (
            "Lightning ModelPruning l1_unstructured",
            lambda: [ModelPruning("l1_unstructured", amount=lambda epoch: AMOUNT if epoch == 0 else 0, verbose=0)],
        ),
    ]
    # timings on a shared machine drift: three rounds, the order reversed every other round, medians reported
    runs: dict[str, list[dict[str, float]]] = {name: [] for name, _ in configs}
    for i in range(3):
        for name, make in configs if i % 2 == 0 else configs[::-1]:
            runs[name].append(run(name, make()))
    rows = [
        {**results[0], **{k: statistics.median(r[k] for r in results) for k in ("step_ms", "infer_ms")}}
        for results in runs.values()
    ]
    base = rows[0]
    print(
        f"# pruning benchmark — {date.today()} — {platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, lightning {L.__version__}"
    )
    print(f"digits MLP 64-1024-1024-1024-10, AdamW, batch 64, {EPOCHS} epochs, amount {AMOUNT} after step {PRUNE_AT}\n")
    print(
        "| method | state bytes in training (MiB) | vs none | train step (ms) | vs none | inference, 269 samples "
        "(ms) | vs none | test accuracy | parameters after |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['name']} | {r['state_mib']:.2f} | {r['state_mib'] / base['state_mib']:.2f}x | {r['step_ms']:.2f} | "
            f"{r['step_ms'] / base['step_ms']:.2f}x | {r['infer_ms']:.2f} | {r['infer_ms'] / base['infer_ms']:.2f}x | "
            f"{r['accuracy']:.4f} | {r['parameters']:,} |"
        )


if __name__ == "__main__":
    main()
