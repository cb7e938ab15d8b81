"""Showcase: full fine-tuning of a GPT-2-small-sized model (124M, sequence 1024, effective batch 32) on an 8 GB card.

The plain setup's predicted peak next to the plan for an RTX 3070 8 GB, from estimates alone (no GPU). The model is
built from code (random init): the byte-level TinyGPT with GPT-2 small's vocabulary, width, depth, tied embeddings
and dropout 0.1.

Run: ``python -m benchmarks.plan_showcase`` (about a minute on 2 CPU cores).
"""

from __future__ import annotations

import platform
import time
import warnings
from datetime import date

import torch

from benchmarks.estimate_speed import GPT2Small
from lightning_lowvram.planner import estimate_step_memory, plan


def main() -> None:
    warnings.filterwarnings("ignore")
    batch = (torch.zeros(32, 1024, dtype=torch.long), torch.zeros(32, 1024, dtype=torch.long))
    start = time.perf_counter()
    result = plan(GPT2Small(), batch, "rtx3070_8gb")
    seconds = time.perf_counter() - start
    print(f"# plan showcase — {date.today()} — {platform.machine()}, torch {torch.__version__}")
    print(f"GPT-2 small sized (124M), sequence 1024, batch 32, AdamW, fp32 weights; planned in {seconds:.0f} s\n")
    print("```")
    print(result.table())
    print("```")
    print("\noverrides: " + " ".join(result.overrides()))
    cpu = estimate_step_memory(GPT2Small(), batch)
    print(
        f"\nthe plain setup traced under CPU rules (no CUDA emulation): {cpu}\n"
        f"(the CPU runs attention with dropout on its math path, keeping the 1024 x 1024 matrices per head)"
    )


if __name__ == "__main__":
    main()
