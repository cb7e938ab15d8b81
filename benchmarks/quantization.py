"""fp32 vs every int8 backend available here, on a Linear-heavy MLP and the trained digits MLP; one run, one table.

Rows: fp32; ours (``quantize_dynamic_int8``, backend ``auto``, what DynamicQuantCallback runs); every backend of
``lightning_lowvram.cores.dynamic_quant.BACKENDS`` that runs on this device; and the blog recipe users copy,
``torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)``. Bytes of the Linear layers (from
tensors), median latency per batch, and accuracy (digits: test accuracy; the random 4 x 1024 MLP: agreement of the
argmax with fp32).

Run: ``python benchmarks/quantization.py`` (under a minute on 2 CPU cores).
"""

from __future__ import annotations

import copy
import logging
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from datetime import date

import lightning as L
import torch
from torch import nn

from lightning_lowvram.cores.dynamic_quant import (
    available_backends,
    choose_backend,
    linear_bytes,
    quantize_dynamic_int8,
)
from lightning_lowvram.demo import DigitsDataModule, DigitsMLP


def latency_ms(model: nn.Module, x: torch.Tensor, repeats: int = 50) -> float:
    with torch.inference_mode():
        for _ in range(5):
            model(x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def blog_recipe(model: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)


def variants(model: nn.Module) -> list[tuple[str, nn.Module]]:
    rows = [("fp32", model), (f"ours, auto (= {choose_backend('cpu')})", quantize_dynamic_int8(model))]
    rows += [(f"backend {name}", quantize_dynamic_int8(model, name)) for name in available_backends("cpu")]
    if hasattr(torch.ao.quantization, "quantize_dynamic"):
        rows.append(("blog: torch.ao quantize_dynamic(model, {nn.Linear}, qint8)", blog_recipe(model)))
    return rows


def table(title: str, model: nn.Module, x: torch.Tensor, accuracy: Callable[[nn.Module], float]) -> None:
    model.eval()
    base_bytes, base_ms = linear_bytes(model), latency_ms(model, x)
    print(f"\n{title}\n")
    print("| model | Linear bytes | vs fp32 | latency/batch (ms) | vs fp32 | accuracy |")
    print("|---|---|---|---|---|---|")
    for name, variant in variants(model):
        size, ms = linear_bytes(variant), latency_ms(variant, x)
        print(
            f"| {name} | {size:,} | {size / base_bytes:.3f}x | {ms:.3f} | {ms / base_ms:.2f}x | "
            f"{accuracy(variant):.4f} |"
        )


def main() -> None:
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    print(
        f"# quantization benchmark — {date.today()} — {platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, lightning {L.__version__}"
    )

    torch.manual_seed(0)
    heavy = nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(1024, 1024), nn.ReLU())])
    x = torch.randn(64, 1024)
    with torch.inference_mode():
        reference = heavy(x).argmax(-1)

    def agreement(model: nn.Module) -> float:
        with torch.inference_mode():
            return float((model(x).argmax(-1) == reference).float().mean())

    table("Linear-heavy MLP: 4 x Linear(1024, 1024), batch 64", heavy, x, agreement)

    L.seed_everything(0)
    digits, data = DigitsMLP(hidden=128), DigitsDataModule(batch_size=64)
    L.Trainer(
        max_epochs=8,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    ).fit(digits, datamodule=data)
    test_x, test_y = data.splits["test"].tensors

    def test_accuracy(model: nn.Module) -> float:
        with torch.inference_mode():
            return float((model(test_x).argmax(-1) == test_y).float().mean())

    table(
        "digits MLP 64-128-128-10 (trained 8 epochs), the 269 test samples as one batch", digits, test_x, test_accuracy
    )


if __name__ == "__main__":
    main()
