"""How long one ``estimate_step_memory`` takes for a GPT-2-small-sized model (124M parameters) at sequence 1024.

The model is built from code (random init; byte-level TinyGPT with GPT-2's vocabulary, width, depth, tied
embeddings and dropout 0.1); the estimate runs forward, backward and two AdamW steps on fake tensors: nothing real is
allocated.

Run: ``python benchmarks/estimate_speed.py`` (goal: one estimate in ≤ 10 s on 2 CPU cores).
"""

from __future__ import annotations

import platform
import time
import warnings
from datetime import date

import torch

from lightning_lowvram.demo import TinyGPT
from lightning_lowvram.planner import estimate_step_memory


class GPT2Small(TinyGPT):
    """GPT-2 small's shape: vocabulary 50257, 12 layers, width 768, 12 heads, tied embeddings, dropout 0.1."""

    vocab_size = 50257

    def __init__(self) -> None:
        super().__init__(seq_len=1024, d_model=768, n_head=12, n_layer=12, dropout=0.1)
        self.head.weight = self.tok.weight


def main() -> None:
    warnings.filterwarnings("ignore")
    model = GPT2Small()
    batch = (torch.zeros(8, 1024, dtype=torch.long), torch.zeros(8, 1024, dtype=torch.long))
    print(
        f"# estimate speed — {date.today()} — {platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}"
    )
    print(f"GPT-2 small sized: {sum(p.numel() for p in model.parameters()):,} parameters, sequence 1024, batch 8\n")
    print("| setting | seconds | predicted peak |")
    print("|---|---|---|")
    settings = {
        "fp32, whole batch, CPU rules": {},
        "fp32, whole batch, rtx3070_8gb rules": {"gpu": "rtx3070_8gb"},
        "bf16-mixed, micro-batch 2, checkpointed blocks, rtx3070_8gb rules": {
            "precision": "bf16-mixed",
            "micro_batch_size": 2,
            "activation_checkpointing": True,
            "gpu": "rtx3070_8gb",
        },
    }
    for name, kwargs in settings.items():
        start = time.perf_counter()
        estimate = estimate_step_memory(model, batch, **kwargs)
        print(f"| {name} | {time.perf_counter() - start:.2f} | {estimate} |")


if __name__ == "__main__":
    main()
