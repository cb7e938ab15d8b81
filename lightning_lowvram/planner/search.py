"""Pick the cheapest mix of strategies whose predicted peak fits a GPU, from estimates alone (no GPU needed).

Candidates are ranked by a cost model (relative extra time per sample, from benchmarks/RESULTS.md and published
numbers): each halving of the micro-batch adds 3 % (bert-large: batch 1 x 4 ran at 0.87x of batch 4); mixed precision
is charged 5 % although it is usually faster on GPUs, because it changes the numerics and fp32 is kept when a split
suffices; activation checkpointing of repeated blocks adds about one forward pass (33 %). For each precision x
checkpointing choice the largest micro-batch that fits is found by bisection over halvings, and the cheapest fitting
candidate wins. 8-bit optimizer state (torchao, Adam/AdamW only; 5 %) and, when allowed, an int8 weight-only frozen
base (frozen Linear layers; 10 %) are modelled from the same trace: their bytes replace the traced float bytes.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Any

from torch import nn

from lightning_lowvram.batching import batch_size_of
from lightning_lowvram.memory.profiles import GPUProfile, format_bytes, gpu_profile
from lightning_lowvram.planner.estimate import MemoryEstimate, adam_optimizer, estimate_step_memory, with_8bit_optimizer

COST = {
    "micro_batch_halving": 0.03,
    "mixed_precision": 0.05,
    "optimizer_8bit": 0.05,
    "int8_frozen_base": 0.10,
    "activation_checkpointing": 0.33,
}


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One setting and its predicted peak."""

    precision: str
    micro_batch_size: int
    activation_checkpointing: bool
    optimizer_8bit: bool
    int8_base: bool
    estimate: MemoryEstimate
    fits: bool
    cost: float

    @property
    def label(self) -> str:
        parts = [self.precision, f"micro-batch {self.micro_batch_size}"]
        parts += ["8-bit optimizer"] if self.optimizer_8bit else []
        parts += ["int8 frozen base"] if self.int8_base else []
        parts += ["checkpointing"] if self.activation_checkpointing else []
        return ", ".join(parts)


@dataclasses.dataclass(frozen=True)
class Plan:
    """The candidates tried (plain setup first), the chosen one (``None``: nothing fits) and the card."""

    gpu: GPUProfile
    batch_size: int
    budget: int
    candidates: list[Candidate]
    chosen: Candidate | None

    def table(self) -> str:
        """The candidates as text, the chosen one marked."""
        lines = [
            f"plan for {self.gpu.name}: tensors must stay under {format_bytes(self.budget)} (the card minus its "
            f"context, with margin); batch {self.batch_size} kept",
            f"  {'':2}{'setting':60} {'tensor peak':>15} {'fits':>5} {'extra time':>10}",
        ]
        for c in self.candidates:
            mark = "->" if c is self.chosen else ""
            fits = "yes" if c.fits else "no"
            peak = format_bytes(c.estimate.peak - c.estimate.allowance)
            lines.append(f"  {mark:2}{c.label:60} {peak:>15} {fits:>5} {c.cost:>9.0%}")
        if self.chosen is None:
            smallest = min(self.candidates, key=lambda c: c.estimate.peak)
            need = format_bytes(int(smallest.estimate.peak / (self.budget / self.gpu.usable_bytes)))
            lines.append(
                f"  nothing fits: the smallest predicted peak is {format_bytes(smallest.estimate.peak)} "
                f"({smallest.label}); it needs a card of {need}, or fewer parameters (PruningCallback) or an int8 "
                "frozen base (DynamicQuantCallback(freeze_base=True))"
            )
        return "\n".join(lines)

    def trainer_kwargs(self) -> dict[str, Any]:
        """Trainer arguments of the chosen setting."""
        return {"precision": self.chosen.precision} if self.chosen else {}

    def overrides(self) -> list[str]:
        """The same as Hydra overrides of the `lowvram` app."""
        if self.chosen is None:
            return []
        nodes = ["lowvram_memory_report"]
        nodes += ["lowvram_auto_micro_batch"] if self.chosen.micro_batch_size < self.batch_size else []
        nodes += ["lowvram_activation_checkpointing"] if self.chosen.activation_checkpointing else []
        nodes += ["lowvram_optimizer_8bit"] if self.chosen.optimizer_8bit else []
        nodes += ["lowvram_dynamic_quant"] if self.chosen.int8_base else []
        out = [f"trainer.precision={self.chosen.precision}", f"callbacks=[{','.join(nodes)}]"]
        if "lowvram_auto_micro_batch" in nodes:
            out += [f"callbacks.lowvram_auto_micro_batch.micro_batch_size={self.chosen.micro_batch_size}"]
        if self.chosen.int8_base:
            out += ["callbacks.lowvram_dynamic_quant.freeze_base=true", "callbacks.lowvram_dynamic_quant.stages=[]"]
        return out


def plan(
    module: nn.Module, batch: Any, gpu: str | GPUProfile, *, margin: float = 0.1, allow_int8_base: bool = False
) -> Plan:
    """Choose the cheapest setting whose predicted peak fits ``gpu`` with ``margin``; the effective batch is kept.

    ``allow_int8_base``: frozen Linear layers (``requires_grad=False``) may be stored int8 (weight-only), as
    ``DynamicQuantCallback(freeze_base=True)`` does; off by default because it changes the base's numerics.

    Raises:
        ValueError: For an unknown GPU, a profile without memory (``cpu``), or a margin outside [0, 1).

    Example:
        >>> import torch
        >>> from lightning_lowvram.demo import DigitsMLP
        >>> p = plan(DigitsMLP(), (torch.zeros(64, 64), torch.zeros(64, dtype=torch.long)), "rtx3060_12gb")
        >>> p.chosen.label
        '32-true, micro-batch 64'

    """
    profile = gpu_profile(gpu) if isinstance(gpu, str) else gpu
    if profile.usable_bytes is None:
        raise ValueError(f"gpu {profile.name!r} has no memory size to plan for; pick a card, e.g. gpu=rtx3060_12gb")
    if not 0.0 <= margin < 1.0:
        raise ValueError(f"margin must be in [0, 1), got {margin!r}")
    budget = int(profile.usable_bytes * (1.0 - margin))  # for tensors: the card minus its context, capped by free
    n = batch_size_of(batch)
    precisions = ["32-true", "bf16-mixed" if profile.bf16 else "16-mixed"]
    checkpointing = [False, True] if _has_blocks(module) else [False]
    candidates: list[Candidate] = []

    eight_bit = [False, True] if adam_optimizer(module) is not None else [False]
    base_saving = _int8_base_saving(module) if allow_int8_base else 0
    int8_base = [False, True] if base_saving > 0 else [False]

    def candidate(precision: str, micro: int, ckpt: bool, optim8: bool, base8: bool) -> Candidate:
        key = (precision, micro, ckpt)
        if key not in traced:  # one trace serves every modelled variant (8-bit state, int8 base)
            traced[key] = estimate_step_memory(
                module, batch, micro_batch_size=micro, precision=precision, activation_checkpointing=ckpt, gpu=profile
            )
        estimate = with_8bit_optimizer(traced[key], module) if optim8 else traced[key]
        if base8:
            by_category = {**estimate.by_category, "parameters": estimate.by_category["parameters"] - base_saving}
            estimate = dataclasses.replace(estimate, peak=estimate.peak - base_saving, by_category=by_category)
        cost = COST["micro_batch_halving"] * math.log2(n / micro) + (COST["activation_checkpointing"] if ckpt else 0)
        cost += (COST["mixed_precision"] if precision != "32-true" else 0) + (COST["optimizer_8bit"] if optim8 else 0)
        cost += COST["int8_frozen_base"] if base8 else 0
        fits = estimate.peak - estimate.allowance <= budget
        found = Candidate(precision, micro, ckpt, optim8, base8, estimate, fits, round(cost, 4))
        candidates.append(found)
        return found

    traced: dict[tuple[str, int, bool], MemoryEstimate] = {}
    best: Candidate | None = None
    sizes = [n // 2**k for k in range(int(math.log2(n)) + 1)]  # n, n/2, ... 1 (halvings)
    for precision, ckpt, optim8, base8 in itertools.product(precisions, checkpointing, eight_bit, int8_base):
        fit = _largest_fit(sizes, functools.partial(candidate, precision, ckpt=ckpt, optim8=optim8, base8=base8))
        if fit is not None and (best is None or fit.cost < best.cost):
            best = fit
    ordered = sorted(candidates, key=lambda c: (c.cost, c.estimate.peak))
    return Plan(profile, n, budget, ordered, best)


def _largest_fit(sizes: list[int], run: Any) -> Candidate | None:
    """Bisection over decreasing sizes for the first (largest) that fits; estimates are monotone in the size."""
    lo, hi, found = 0, len(sizes) - 1, None
    first = run(sizes[0])
    if first.fits:
        return first
    last = run(sizes[-1])
    if not last.fits:
        return None
    found = last
    while hi - lo > 1:
        mid = (lo + hi) // 2
        result = run(sizes[mid])
        if result.fits:
            hi, found = mid, result
        else:
            lo = mid
    return found


def _int8_base_saving(module: nn.Module) -> int:
    """Bytes saved by storing the frozen Linear layers int8 weight-only (measured on a quantized copy of them)."""
    from lightning_lowvram.quantization import is_linear, linear_bytes, quantize_dynamic_int8

    frozen = [m for m in module.modules() if is_linear(m) and not any(p.requires_grad for p in m.parameters())]
    if not frozen:
        return 0
    box = nn.ModuleList(frozen)
    int8 = quantize_dynamic_int8(box, "torchao_weight_only", device="cpu")
    return linear_bytes(box) - linear_bytes(int8)


def _has_blocks(module: nn.Module) -> bool:
    from lightning_lowvram.checkpointing import repeated_blocks

    return bool(repeated_blocks(module))
