"""Chunked linear + cross-entropy vs the plain HF loss: step peak (the meter) and step time, on this machine's CPU.

A tiny HF Llama body (2 layers, width 64) under a 32000-token vocabulary, batch 2 x 1024, AdamW: the logits dominate
the step, as they do in long-context LoRA. Rounds alternate plain and chunked; the ratio is the median of per-round
ratios.

    python -m benchmarks.chunked_ce
"""

from __future__ import annotations

import datetime
import platform
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_lowvram import MemoryMeter, apply_chunked_cross_entropy, format_bytes


def _model(chunked: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096,
    )  # fmt: skip
    model = LlamaForCausalLM(config).train()
    if chunked:
        apply_chunked_cross_entropy(model)
    return model


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict) -> float:
    optimizer.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def main(rounds: int = 7) -> None:
    print(f"# chunked_ce — {datetime.date.today()} — {platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")  # fmt: skip
    ids = torch.randint(0, 32000, (2, 1024), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    runs = {}
    for chunked in (False, True):
        model = _model(chunked)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        _step(model, optimizer, batch)  # optimizer state created
        with MemoryMeter(model, optimizer) as meter:
            loss = _step(model, optimizer, batch)
        runs[chunked] = (model, optimizer, meter.peak.total, loss)
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(rounds):
        for chunked in (False, True):
            model, optimizer, _, _ = runs[chunked]
            started = time.perf_counter()
            _step(model, optimizer, batch)
            times[chunked].append(time.perf_counter() - started)
    ratios = [c / p for p, c in zip(times[False], times[True], strict=True)]
    plain, chunked = runs[False], runs[True]
    print("\n| measure | plain HF loss | chunked CE | ratio chunked/plain |")
    print("|---|---|---|---|")
    peaks = f"{format_bytes(plain[2])} | {format_bytes(chunked[2])} | {chunked[2] / plain[2]:.3f}"
    print(f"| step peak (meter) | {peaks} |")
    print(f"| s/step (median of {rounds}) | {statistics.median(times[False]):.3f} | "
          f"{statistics.median(times[True]):.3f} | {statistics.median(ratios):.3f} |")  # fmt: skip
    print(f"| loss of the metered step | {plain[3]:.6f} | {chunked[3]:.6f} | |")


if __name__ == "__main__":
    main()
