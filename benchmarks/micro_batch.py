"""AutoMicroBatchCallback vs the peers, one run, one table (paste it into benchmarks/RESULTS.md).

(a) steady-state throughput: ours (loader batch 1024 split into 4 micro-batches of 256) vs plain Lightning with the same
    micro-batch and accumulation set by hand (loader batch 256, ``accumulate_grad_batches=4``);
(b) settling under the same emulated memory budget (``memory_budget``): ours from ``"auto"`` vs Lightning's
    ``BatchSizeFinder(mode="binsearch")`` — time to the first real optimizer step, extra steps;
(c) the effective batch each ends with (the user asked for 1024);
(d) (a) with the user's own accumulation (loader 512, ``accumulate_grad_batches=2``: inside a window ours keeps a host
    copy of the gradients to restore after an OOM) vs loader 256 + ``accumulate_grad_batches=4``.

Run: ``python benchmarks/micro_batch.py`` (about a minute on 2 CPU cores; ``--repeats`` for more rounds).
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import time
import warnings
from contextlib import ExitStack
from datetime import date

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import BatchSizeFinder, Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.common import quiet_trainer
from lightning_lowvram import AutoMicroBatchCallback, MemoryReportCallback, memory_budget

BATCH, MICRO, FEATURES, WIDTH, SAMPLES = 1024, 256, 64, 1024, 16384


class Net(L.LightningModule):
    """An MLP whose memory is dominated by activations at these batch sizes: 64 -> 1024 -> 1024 -> 10, SGD."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(FEATURES, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, 10)
        )
        self.optimizer_steps = 0  # counted by the module hook: survives BatchSizeFinder's callback swap

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def on_before_optimizer_step(self, optimizer):
        self.optimizer_steps += 1

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class Data(L.LightningDataModule):
    """Generated data (no download); ``batch_size`` is the attribute BatchSizeFinder scales."""

    def __init__(self, batch_size: int) -> None:
        super().__init__()
        self.batch_size = batch_size
        g = torch.Generator().manual_seed(0)
        self.dataset = TensorDataset(torch.randn(SAMPLES, FEATURES, generator=g), torch.randint(0, 10, (SAMPLES,)))

    def train_dataloader(self):
        return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=True)


class Clock(Callback):
    """perf_counter at the end of every optimizer step (every batch that closes an accumulation window)."""

    def __init__(self) -> None:
        self.start, self.steps = 0.0, []

    def on_train_start(self, trainer, pl_module):
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if (batch_idx + 1) % trainer.accumulate_grad_batches == 0:
            self.steps.append(time.perf_counter())


def _trainer(callbacks, **kwargs) -> L.Trainer:
    return quiet_trainer(callbacks=callbacks, **kwargs)


def _fit(loader_batch: int, callbacks: list, budget: int | None = None, **kwargs) -> tuple[Net, Data, float]:
    L.seed_everything(0)
    model, data = Net(), Data(loader_batch)
    trainer = _trainer(callbacks, **kwargs)
    with ExitStack() as stack:
        if budget is not None:
            stack.enter_context(memory_budget(budget, device="cpu"))
        start = time.perf_counter()
        trainer.fit(model, datamodule=data)
    return model, data, start


def throughput(steps: int, warmup: int, reverse: bool = False, accumulate: int = 1) -> dict[str, float]:
    """Samples per second over optimizer steps warmup..steps (same samples per step for both); ``reverse`` runs the
    peer first, so alternating rounds cancel any drift of the machine. ``accumulate``: the user's own
    ``accumulate_grad_batches`` (ours gets a loader batch of ``BATCH // accumulate``)."""
    loader = BATCH // accumulate
    ours = {"max_steps": steps, "accumulate_grad_batches": accumulate}
    runs = {
        "ours": lambda c: _fit(loader, [AutoMicroBatchCallback(micro_batch_size=MICRO), c], **ours),
        "hand": lambda c: _fit(MICRO, [c], max_steps=steps, accumulate_grad_batches=BATCH // MICRO),
    }
    rate = {}
    for name, run in sorted(runs.items(), reverse=reverse):
        clock = Clock()
        run(clock)
        rate[name] = (steps - warmup) * BATCH / (clock.steps[-1] - clock.steps[warmup - 1])
    return rate


def own_time(steps: int) -> tuple[float, float]:
    """Milliseconds per optimizer step spent in lightning_lowvram's own code (cProfile tottime), and a step's time."""
    import cProfile
    import pstats

    profile, clock = cProfile.Profile(), Clock()
    profile.enable()
    _fit(BATCH, [AutoMicroBatchCallback(micro_batch_size=MICRO), clock], max_steps=steps)
    profile.disable()
    stats = pstats.Stats(profile).stats  # (file, line, name) -> (calls, primitive calls, tottime, cumtime, callers)
    own = sum(row[2] for (file, _, _), row in stats.items() if "lightning_lowvram" in file)
    return own / steps * 1e3, (clock.steps[-1] - clock.steps[0]) / (steps - 1) * 1e3


def peak(micro: int) -> int:
    report = MemoryReportCallback(stages=["fit"], print_table=False)
    _fit(BATCH, [AutoMicroBatchCallback(micro_batch_size=micro), report], max_steps=1)
    return report.reports["fit"].total


def settle(budget: int) -> dict[str, dict[str, float]]:
    """Both start from the user's batch of 1024 under the same budget; time to the first real optimizer step."""
    clock, micro = Clock(), AutoMicroBatchCallback()
    model, data, start = _fit(BATCH, [micro, clock], budget=budget, max_steps=1)
    ours = {
        "seconds": clock.steps[0] - start,
        "extra_steps": model.optimizer_steps - 1,
        "failed_attempts": micro.oom_retries,
        "effective_batch": data.batch_size,
        "micro": micro.sizes["train"],
    }
    results = {"ours": ours}
    # as shipped (init_val=2), and started at the user's batch: Lightning 2.6's first trial runs on the loader that
    # already exists (the user's batch) while it believes it tries init_val, so the defaults can settle on 1
    for name, init_val in (("binsearch", 2), ("binsearch_init", BATCH)):
        clock, finder = Clock(), BatchSizeFinder(mode="binsearch", init_val=init_val)
        model, data, start = _fit(BATCH, [finder, clock], budget=budget, max_steps=1)
        results[name] = {
            "seconds": clock.steps[0] - start,
            "extra_steps": model.optimizer_steps - 1,  # trial steps (the finder restores the weights afterwards)
            "effective_batch": data.batch_size,
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10, help="throughput rounds (median reported)")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per throughput run")
    args = parser.parse_args()
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(torch.get_num_threads())

    rounds = [throughput(args.steps, warmup=3, reverse=i % 2 == 1) for i in range(args.repeats)]
    ours = statistics.median(r["ours"] for r in rounds)
    hand = statistics.median(r["hand"] for r in rounds)
    ratio = statistics.median(r["ours"] / r["hand"] for r in rounds)  # per round: both ran back to back
    per_round = ", ".join(f"{r['ours'] / r['hand']:.2f}" for r in rounds)
    acc_rounds = [throughput(args.steps, warmup=3, reverse=i % 2 == 1, accumulate=2) for i in range(args.repeats)]
    acc_ratio = statistics.median(r["ours"] / r["hand"] for r in acc_rounds)
    acc_ours = statistics.median(r["ours"] for r in acc_rounds)
    acc_hand = statistics.median(r["hand"] for r in acc_rounds)
    own_ms, step_ms = own_time(args.steps)
    peaks = {m: peak(m) for m in (MICRO, 2 * MICRO)}
    budget = (peaks[MICRO] + peaks[2 * MICRO]) // 2
    s = settle(budget)

    print(
        f"# micro_batch benchmark — {date.today()} — {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, lightning {L.__version__}"
    )
    print(
        f"model: MLP {FEATURES}-{WIDTH}-{WIDTH}-10 fp32, SGD; user batch {BATCH}; budget {budget / 2**20:.1f} MiB "
        f"(between the metered peaks of micro-batch {MICRO} and {2 * MICRO})\n"
    )
    o, b, c = s["ours"], s["binsearch"], s["binsearch_init"]
    print("| measure | ours (AutoMicroBatchCallback) | peer | ratio ours/peer |")
    print("|---|---|---|---|")
    print(
        f"| (a) steady samples/s, micro {MICRO} x {BATCH // MICRO} vs plain Lightning, loader {MICRO} + "
        f"accumulate_grad_batches={BATCH // MICRO} (median of {args.repeats}) | {ours:.0f} | {hand:.0f} | "
        f"{ratio:.3f} (median of per-round ratios {per_round}) |"
    )
    print(
        f"| (a) time in lightning_lowvram's own code per optimizer step (cProfile, not wall-clock noise) | "
        f"{own_ms:.2f} ms of a {step_ms:.1f} ms step | | {own_ms / step_ms:.3f} of the step |"
    )
    for label, peer in (
        ("BatchSizeFinder binsearch, defaults", b),
        (f"BatchSizeFinder binsearch, init_val={BATCH}", c),
    ):
        print(
            f"| (b) seconds to the first real optimizer step under the budget, vs {label} | {o['seconds']:.2f} | "
            f"{peer['seconds']:.2f} | {o['seconds'] / peer['seconds']:.3f} |"
        )
        print(
            f"| (b) extra optimizer/trial steps before it, vs {label} | {o['extra_steps']} "
            f"({o['failed_attempts']} OOM attempts redone smaller) | {peer['extra_steps']} | |"
        )
        print(
            f"| (c) effective batch (asked {BATCH}), vs {label} | {o['effective_batch']} (micro-batch {o['micro']}) "
            f"| {peer['effective_batch']} | |"
        )
    print(
        f"| (d) steady samples/s with the user's accumulate_grad_batches=2 (loader {BATCH // 2}, micro {MICRO}: host "
        f"copy of the gradients inside the window) vs loader {MICRO} + accumulate_grad_batches={BATCH // MICRO} "
        f"(median of {args.repeats}) | {acc_ours:.0f} | {acc_hand:.0f} | {acc_ratio:.3f} |"
    )


if __name__ == "__main__":
    main()
