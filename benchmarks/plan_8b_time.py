"""How long ``plan`` takes for Llama-3.1-8B's shape, built on the meta device (issue 23, item 5: ≤ 60 s on 2 cores).

The QLoRA module of ``benchmarks.long_context`` (bf16 base, peft LoRA r=32 on all linear layers), one batch of
2048 tokens, ``allow_low_bit_base=True``, ``rtx3060_12gb``. Prints the plan's seconds inside the process, its peak
RSS (the bf16 weights would be 15 GiB), and with ``--whole`` the same plan tracing the whole model (no block
extrapolation) for comparison. Run as ``/usr/bin/time -v python -m benchmarks.plan_8b_time`` for the seconds
including Python's start and imports.
"""

from __future__ import annotations

import datetime
import platform
import resource
import sys
import time
import warnings

import torch

from benchmarks.long_context import llama_8b
from lightning_lowvram.planner import estimate as estimate_module
from lightning_lowvram.planner import plan


def main(whole: bool = False) -> None:
    warnings.filterwarnings("ignore")
    if whole:  # every estimate of the plan traces all 32 blocks
        original = estimate_module._traced
        estimate_module._traced = lambda step, extrapolate: original(step, False)
    module = llama_8b()
    batch = {"input_ids": torch.zeros(1, 2048, dtype=torch.long), "labels": torch.zeros(1, 2048, dtype=torch.long)}
    started = time.perf_counter()
    result = plan(module, batch, "rtx3060_12gb", allow_low_bit_base=True)
    seconds = time.perf_counter() - started
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    print(f"# plan_8b_time — {datetime.date.today()} — {platform.machine()}, {torch.get_num_threads()} threads")
    print(f"{'whole model' if whole else 'blocks extrapolated'}: plan {seconds:.1f} s, peak RSS {rss:.2f} GiB")
    print(f"chosen: {result.chosen.label if result.chosen else None}")
    print(result.table())


if __name__ == "__main__":
    main("--whole" in sys.argv[1:])
