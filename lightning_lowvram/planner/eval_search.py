"""Plan an evaluation stage: the fastest setting whose step fits the card (micro-batch, low-bit weights, streaming).

``plan_eval`` traces the stage's step (:func:`.evaluation.estimate_eval_memory`) at eval micro-batches of 1 and 2,
whole and with every block streamed, and reads every other setting off those four traces: peaks and ops are affine
in the micro-batch size (as the training planner extrapolates them), a resident-block count adds its blocks' weights
to the streamed trace (:func:`.evaluation.with_resident`), a low-bit base is modelled. Each setting is priced by the
step-time model for one batch (its micro-batches, and every streamed block's weights over PCIe once per
micro-batch at the profile's ``pcie_gbs``); the fastest that fits wins, ties going to the setting that changes least
(streaming changes nothing in the numbers, int8/NF4 weights change them and are tried only when allowed). The time
model does not charge a low-bit layer's dequantization (it prices the float matmul): with low-bit weights allowed, they
win over streaming by time whenever both fit, which errs fast for them.

Streaming and a low-bit base are alternatives here, not combined: one streamed block's low-bit weights would need the
low-bit tensors moved by accelerate's hooks, which nothing has tested.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from torch import nn

from lightning_lowvram.cores.batches import batch_size_of
from lightning_lowvram.memory.profiles import GPUProfile, format_bytes, gpu_profile
from lightning_lowvram.planner.blocks import affine, extrapolate_ops
from lightning_lowvram.planner.estimate import MemoryEstimate
from lightning_lowvram.planner.evaluation import Stage, estimate_eval_memory, with_low_bit, with_resident
from lightning_lowvram.planner.timing import StepWork


@dataclasses.dataclass(frozen=True)
class EvalCandidate:
    """One evaluation setting and its prediction.

    Attributes:
        micro_batch_size: The eval micro-batch.
        batch_size: The batch it splits.
        bits: Weights in 4 (NF4) or 8 (int8) bits; 0: as they are.
        resident_blocks: With streaming, the blocks kept on the card; ``None``: not streamed.
        estimate: The predicted peak (``estimate.peak``), host bytes and PCIe traffic.
        seconds: Predicted seconds of one batch.
        fits: Whether the peak fits the card with the margin.

    """

    micro_batch_size: int
    batch_size: int
    bits: int
    resident_blocks: int | None
    estimate: MemoryEstimate
    seconds: float
    fits: bool

    @property
    def tensor_peak(self) -> int:
        """The predicted peak of tensors (the estimate less the card's context allowance): what the budget holds."""
        return self.estimate.peak - self.estimate.allowance

    @property
    def label(self) -> str:
        """The setting in words (the plan table's first column)."""
        parts = [f"eval micro-batch {self.micro_batch_size}"]
        parts += [{4: "NF4 weights", 8: "int8 weights"}[self.bits]] if self.bits else []
        if self.resident_blocks is not None:
            parts.append(f"streamed, {self.resident_blocks} blocks resident")
        return ", ".join(parts)

    def callbacks(self) -> dict[str, dict[str, Any]]:
        """The registry strategies (by name) and their arguments that run this setting (what it changes only)."""
        out: dict[str, dict[str, Any]] = {}
        if self.micro_batch_size < self.batch_size:
            out["micro_batch"] = {"eval_micro_batch_size": self.micro_batch_size}
        if self.bits:
            out["low_bit_base"] = {"bits": self.bits}
        if self.resident_blocks is not None:
            out["weight_streaming"] = {"resident_blocks": self.resident_blocks}
        return out


@dataclasses.dataclass(frozen=True)
class EvalPlan:
    """The settings tried for an evaluation stage and the chosen one (``None``: nothing fits)."""

    stage: str
    gpu: GPUProfile
    batch_size: int
    candidates: list[EvalCandidate]
    chosen: EvalCandidate | None
    budget: int

    def overrides(self) -> list[str]:
        """The Hydra overrides that run the chosen setting without the planner (``callbacks=[...]`` and keys)."""
        from lightning_lowvram.registry import as_override, get

        if self.chosen is None:
            return []
        chosen = self.chosen.callbacks()
        nodes = [get(name).node for name in chosen]
        keys = [f"callbacks.{get(n).node}.{k}={as_override(v)}" for n, args in chosen.items() for k, v in args.items()]
        return ([f"callbacks=[lowvram_memory_report,{','.join(nodes)}]"] if nodes else []) + keys

    def table(self) -> str:
        """The candidates as a table: tensor peak, host bytes, predicted s per batch, fits, the chosen one marked."""
        head = f"{self.stage} plan for {self.gpu.name}: budget {format_bytes(self.budget)} for tensors, batch "
        lines = [head + f"{self.batch_size}; times are predictions of the step-time model", ""]
        lines.append(f"  {'setting':54} {'peak':>11} {'host':>11} {'s/batch':>9}  fits")
        for c in self.candidates:
            mark = "->" if c is self.chosen else "  "
            host = format_bytes(c.estimate.host) if c.estimate.host else "-"
            lines.append(
                f"{mark}{c.label:54} {format_bytes(c.tensor_peak):>11} {host:>11} {c.seconds:>9.3f}  "
                f"{'yes' if c.fits else 'no'}"
            )
        if self.chosen is None:
            lines.append("  nothing fits: a smaller batch, int8/NF4 weights (allow_low_bit_base=true) or a larger card")
        return "\n".join(lines)


def plan_eval(
    module: nn.Module,
    batch: Any,
    gpu: str | GPUProfile,
    stage: Stage = "validate",
    *,
    precision: str = "32-true",
    margin: float = 0.1,
    allow_low_bit_base: bool = False,
    stream: bool = True,
) -> EvalPlan:
    """The fastest evaluation setting of ``module`` on ``batch`` that fits ``gpu`` (see the module docstring).

    Args:
        module: The LightningModule (or module with the stage's step), with weights or on the meta device.
        batch: One batch as the stage's dataloader yields it.
        gpu: The card's profile or name.
        stage: ``"validate"``, ``"test"`` or ``"predict"``.
        precision: The Trainer's precision.
        margin: Fraction of the card's tensor memory kept free.
        allow_low_bit_base: Also try the Linear weights in int8 and NF4 (``LowBitBaseCallback``: changes numerics).
        stream: Also try streaming the repeated blocks from host memory (where the model has them).

    Raises:
        ValueError: A profile without a memory size or the throughput the time model needs, or what
            :func:`~.evaluation.estimate_eval_memory` refuses.

    Example:
        >>> from lightning_lowvram.demo import DigitsMLP
        >>> import torch
        >>> chosen = plan_eval(DigitsMLP(), (torch.zeros(64, 64), torch.zeros(64, dtype=torch.long)), "rtx3060_12gb")
        >>> chosen.chosen.label
        'eval micro-batch 64'

    """
    profile = gpu_profile(gpu) if isinstance(gpu, str) else gpu
    if profile.usable_bytes is None:
        raise ValueError(f"gpu={profile.name!r} has no memory size to plan for; pick a card, e.g. rtx3060_12gb")
    budget = profile.usable_bytes
    n = batch_size_of(batch)
    sizes = sorted({min(n, 2**k) for k in range(int(math.log2(n)) + 1)} | {n}, reverse=True)

    def traced(resident: int | None) -> tuple[MemoryEstimate, MemoryEstimate | None]:
        one = estimate_eval_memory(module, batch, stage, micro_batch_size=1, precision=precision, gpu=profile,
                                   resident_blocks=resident)  # type: ignore[arg-type]  # fmt: skip
        two = estimate_eval_memory(module, batch, stage, micro_batch_size=2, precision=precision, gpu=profile,
                                   resident_blocks=resident) if n > 1 else None  # type: ignore[arg-type]  # fmt: skip
        return one, two

    blocks = _block_count(module) if stream else 0
    plain = traced(None)
    streamed = traced(0) if blocks else None
    candidates: list[EvalCandidate] = []
    for size in sizes:
        at = _at(*plain, size)
        for bits in (0, 8, 4) if allow_low_bit_base else (0,):
            estimate = at if not bits else with_low_bit(at, module, bits)
            candidates.append(_candidate(estimate, size, bits, None, n, profile, budget, margin))
        if streamed is not None:
            base = _at(*streamed, size)
            for resident in range(blocks, -1, -1):  # the most resident blocks that fit: the fastest streamed
                c = _candidate(with_resident(base, module, resident, precision), size, 0, resident, n, profile,
                               budget, margin)  # fmt: skip
                if c.fits or resident == 0:
                    candidates.append(c)
                    break
    fitting = [c for c in candidates if c.fits]
    chosen = min(fitting, key=_rank, default=None)
    return EvalPlan(stage, profile, n, candidates, chosen, budget)


def _rank(c: EvalCandidate) -> tuple[float, int]:
    changes = 2 * bool(c.bits) + (c.resident_blocks is not None)
    return round(c.seconds, 4), changes


def _candidate(
    estimate: MemoryEstimate, size: int, bits: int, resident: int | None, n: int, profile: GPUProfile, budget: int,
    margin: float,
) -> EvalCandidate:  # fmt: skip
    seconds = estimate.step_time(profile, micro_batches=math.ceil(n / size))
    fits = estimate.peak - estimate.allowance <= budget * (1.0 - margin)  # the budget is the card less its context
    return EvalCandidate(size, n, bits, resident, estimate, seconds, fits)


def _at(one: MemoryEstimate, two: MemoryEstimate | None, size: int) -> MemoryEstimate:
    """The estimate at micro-batch ``size`` from those at 1 and 2 (affine in the micro-batch)."""
    if two is None or size == 1:
        return one
    if size == 2:
        return two
    steps = size - 2
    ops = extrapolate_ops(one.work.micro, two.work.micro, steps) if one.work and two.work else None
    by_category = {k: affine(one.by_category.get(k, 0), v, steps) for k, v in two.by_category.items()}
    peak = affine(one.peak, two.peak, steps)
    return dataclasses.replace(
        two, peak=peak, by_category=by_category, by_phase={"forward": peak - two.allowance},
        work=StepWork(ops, ()) if ops is not None else two.work,
    )  # fmt: skip


def _block_count(module: nn.Module) -> int:
    from lightning_lowvram.cores.streaming import streamable_blocks

    try:
        return len(streamable_blocks(module))
    except ValueError:
        return 0
