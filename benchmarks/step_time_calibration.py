"""Fit and check the step-time model's constants against step times measured on an NVIDIA H200.

Measured (ANCHORS.md, 2026-11-27, torch 2.11 + CUDA 13, HF GPT-2 small, AdamW):
- unconstrained, batch 32 x 512: bf16-mixed 0.35x the fp32 step; micro-batches of 4 (of 32) 1.20x; per-block
  activation checkpointing 1.19x;
- under an 8 GB cap, batch 32 x 1024, seconds per step: fp32 micro 2 0.798; bf16 micro 2 0.581; bf16 micro 4 0.529;
  fp32 micro 4 + checkpointing 0.869; bf16 micro 8 + checkpointing 0.516.

The same settings are traced here (fake tensors, the H200's CUDA rules) and priced by
``lightning_lowvram.planner.timing`` for a grid of the three constants; the fit (least squares on log ratios) uses the
three unconstrained ratios; the five capped settings are held out and only checked (as ratios to fp32 micro 2: their
order is what the planner needs). It prints the best fit and the table for the constants the module ships with.

Run: ``python -m benchmarks.step_time_calibration`` (about a minute; needs transformers).
"""

from __future__ import annotations

import itertools
import math
import warnings

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from lightning_lowvram.demo.hf import HFModule
from lightning_lowvram.memory.profiles import gpu_profile
from lightning_lowvram.planner import estimate_step_memory, timing

H200 = gpu_profile("h200_141gb")
RATIOS_512 = {"bf16-mixed": 0.35, "micro 4": 1.20, "checkpointing": 1.19}  # vs fp32, whole batch
SECONDS_1024 = {  # (precision, micro, checkpointing): seconds per step under the 8 GB cap
    ("32-true", 2, False): 0.798,
    ("bf16-mixed", 2, False): 0.581,
    ("bf16-mixed", 4, False): 0.529,
    ("32-true", 4, True): 0.869,
    ("bf16-mixed", 8, True): 0.516,
}


def gpt2_small(seq: int) -> tuple[HFModule, dict]:
    torch.manual_seed(0)
    module = HFModule(GPT2LMHeadModel(GPT2Config(n_positions=1024, bos_token_id=0, eos_token_id=0)), optimizer="adamw")
    ids = torch.randint(0, 50257, (32, seq))
    return module, {"input_ids": ids, "labels": ids}


def trace(module, batch, precision, micro, ckpt):
    return estimate_step_memory(
        module, batch, micro_batch_size=micro, precision=precision, activation_checkpointing=ckpt, gpu=H200
    ).work


def predictions(works512, works1024) -> dict[str, tuple[float, float]]:
    base = works512[("32-true", 32, False)].seconds(H200, 1)
    out = {
        "bf16-mixed": (works512[("bf16-mixed", 32, False)].seconds(H200, 1) / base, RATIOS_512["bf16-mixed"]),
        "micro 4": (works512[("32-true", 4, False)].seconds(H200, 8) / base, RATIOS_512["micro 4"]),
        "checkpointing": (works512[("32-true", 32, True)].seconds(H200, 1) / base, RATIOS_512["checkpointing"]),
    }
    ref = works1024[("32-true", 2, False)].seconds(H200, 16)
    for (precision, micro, ckpt), seconds in SECONDS_1024.items():
        predicted = works1024[(precision, micro, ckpt)].seconds(H200, 32 // micro)
        label = f"{precision} micro {micro}{' ckpt' if ckpt else ''} (8 GB cap)"
        out[label] = (predicted / ref, seconds / SECONDS_1024[("32-true", 2, False)])
    return out


def main() -> None:
    warnings.filterwarnings("ignore")
    module, batch = gpt2_small(512)
    works512 = {k: trace(module, batch, *k) for k in [("32-true", 32, False), ("bf16-mixed", 32, False),
                                                      ("32-true", 4, False), ("32-true", 32, True)]}  # fmt: skip
    module, batch = gpt2_small(1024)
    works1024 = {k: trace(module, batch, *k) for k in SECONDS_1024}
    shipped = (timing.MATMUL_EFFICIENCY, timing.BANDWIDTH_EFFICIENCY, timing.LAUNCH_S)
    best = None
    grid = ((0.5, 0.6, 0.7, 0.8, 0.9, 1.0), (0.2, 0.3, 0.4, 0.5, 0.6, 0.7), (5e-6, 1e-5, 1.5e-5, 2e-5, 3e-5))
    for eff, bw, launch in itertools.product(*grid):
        timing.MATMUL_EFFICIENCY, timing.BANDWIDTH_EFFICIENCY, timing.LAUNCH_S = eff, bw, launch
        fitted = [v for k, v in predictions(works512, works1024).items() if k in RATIOS_512]
        err = sum(math.log(p / m) ** 2 for p, m in fitted)
        if best is None or err < best[0]:
            best = (err, eff, bw, launch)
    print(f"best fit: MATMUL_EFFICIENCY={best[1]}, BANDWIDTH_EFFICIENCY={best[2]}, LAUNCH_S={best[3]:g} "
          f"(sum of squared log errors {best[0]:.3f})")  # fmt: skip
    timing.MATMUL_EFFICIENCY, timing.BANDWIDTH_EFFICIENCY, timing.LAUNCH_S = shipped
    print(f"shipped: MATMUL_EFFICIENCY={shipped[0]}, BANDWIDTH_EFFICIENCY={shipped[1]}, LAUNCH_S={shipped[2]:g}")
    print("| setting (H200, GPT-2 small) | predicted ratio | measured ratio | used for |")
    print("|---|---|---|---|")
    for label, (p, m) in predictions(works512, works1024).items():
        print(f"| {label} | {p:.2f} | {m:.2f} | {'fit' if label in RATIOS_512 else 'check (held out)'} |")
    seconds = works1024[("32-true", 2, False)].seconds(H200, 16)
    print(f"fp32 micro 2 at 32 x 1024: predicted {seconds:.3f} s, measured {SECONDS_1024[('32-true', 2, False)]} s")


if __name__ == "__main__":
    main()
