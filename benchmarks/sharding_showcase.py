"""Showcase (prediction): full fine-tuning of a 1.1B-parameter Llama-style model at sequence 2048, beyond one card.

The model of ``benchmarks.lora_showcase`` (TinyLlama-1.1B's configuration, random init) with every weight trained,
AdamW, activation checkpointing, one sequence of 2048 tokens per rank. One rank's predicted peak on a
single ``rtx4090_24gb``, on 4 x ``rtx3090_24gb`` with FSDP2 (full and grad_op sharding), and on one ``rtx4090_24gb``
with FSDP2's CPU offload: ``estimate_step_memory(devices=..., sharding=..., offload=...)`` traces rank 0's FSDP2 step
over a fake process group with the cards' CUDA rules. No GPU, nothing allocated.

Then the plans (``plan(..., devices=N)``) for 4 sequences a rank: which setting each set of cards would run, its
per-rank and host memory and its predicted step time (collectives at the card's interconnect, offload at PCIe).

Run: ``python -m benchmarks.sharding_showcase`` (about ten minutes on 2 CPU cores).
"""

from __future__ import annotations

import platform
import time
import warnings
from datetime import date

import torch

from benchmarks.lora_showcase import SEQ, Llama1B
from lightning_lowvram.memory.profiles import format_bytes, gpu_profile
from lightning_lowvram.planner import estimate_step_memory, plan

CASES = [  # (setup, card, devices, sharding, offload, precision)
    ("one card, fp32", "rtx4090_24gb", 1, "none", "none", "32-true"),
    ("one card", "rtx4090_24gb", 1, "none", "none", "bf16-mixed"),
    ("4 cards, FSDP2 full shard", "rtx3090_24gb", 4, "full", "none", "bf16-mixed"),
    ("4 cards, FSDP2 grad_op shard", "rtx3090_24gb", 4, "grad_op", "none", "bf16-mixed"),
    ("one card, FSDP2 CPU offload", "rtx4090_24gb", 1, "full", "params", "bf16-mixed"),
]
PLANS = [("rtx4090_24gb", 1), ("rtx3090_24gb", 4), ("rtx4080_16gb", 1), ("rtx4080_16gb", 2)]  # (card, devices)
PLAN_BATCH = 4  # sequences a rank


def main() -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    module = Llama1B(lora=False)
    batch = {"input_ids": torch.zeros(1, SEQ, dtype=torch.long), "labels": torch.zeros(1, SEQ, dtype=torch.long)}
    params = sum(p.numel() for p in module.parameters())
    print(f"# sharding_showcase — {date.today()} — {platform.machine()}, torch {torch.__version__}")
    print(f"{params / 1e9:.2f}B parameters, all trained (AdamW), checkpointing, 1 x {SEQ} tokens a rank\n")
    print("| setup | card | precision | tensor peak, a rank | card tensor memory | fits, 10 % margin | host, a rank |")
    print("|---|---|---|---|---|---|---|")
    for setup, card, devices, sharding, offload, precision in CASES:
        start = time.perf_counter()
        e = estimate_step_memory(
            module, batch, precision=precision, activation_checkpointing=True, gpu=card,
            devices=devices, sharding=sharding, offload=offload,
        )  # fmt: skip
        usable = gpu_profile(card).usable_bytes
        tensors = e.peak - e.allowance  # the card's context is outside its usable tensor memory
        fits = "yes" if tensors <= usable * 0.9 else "no"
        host = format_bytes(e.host) if e.host else "-"
        cells = [setup, f"{devices} x {card}", precision, format_bytes(tensors), format_bytes(usable), fits, host]
        print("| " + " | ".join(cells) + f" | <!-- {time.perf_counter() - start:.0f} s, {e.method} -->")

    ids = torch.zeros(PLAN_BATCH, SEQ, dtype=torch.long)
    rows, tables = [], []
    for card, devices in PLANS:
        start = time.perf_counter()
        result = plan(module, {"input_ids": ids, "labels": ids}, card, devices=devices)
        tables.append(result.table())
        c = result.chosen
        if c is None:
            rows.append([f"{devices} x {card}", "nothing fits", "-", "-", "-", "-"])
            continue
        host = format_bytes(c.estimate.host) if c.estimate.host else "-"
        peak = format_bytes(c.estimate.peak - c.estimate.allowance)
        kwargs = {k: v if isinstance(v, int | str) else type(v).__name__ for k, v in result.trainer_kwargs().items()}
        cells = [f"{devices} x {card}", c.label, peak, host, f"{c.step_time:.2f}", str(kwargs)]
        rows.append(cells + [f"<!-- {time.perf_counter() - start:.0f} s -->"])
    print(f"\nplans, {PLAN_BATCH} x {SEQ} tokens a rank (effective batch: {PLAN_BATCH} x devices):\n")
    print("| cards | chosen setting | tensor peak, a rank | host, a rank | predicted s/step | Trainer kwargs |")
    print("|---|---|---|---|---|---|")
    for cells in rows:
        print("| " + " | ".join(cells[:6]) + " |" + (f" {cells[6]}" if len(cells) > 6 else ""))
    for table in tables:
        print("\n" + table)


if __name__ == "__main__":
    main()
