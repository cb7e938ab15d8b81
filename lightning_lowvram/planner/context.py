"""How long a context fits a card: the longest sequence whose predicted training step stays under the budget.

The question long-context fine-tuners ask ("how many tokens fit my 12 GB card?"), answered from estimates alone.
``longest_sequence`` stretches the example batch along its sequence dimension, traces the step at three lengths
(fake tensors: a meta-device model works, nothing is allocated), fits the peak as ``a + b L + c L^2`` (linear where
the fused attention kernels run, quadratic where the math kernel or an ``L x L`` mask is kept), solves for the budget
then traces around that guess (a bracket of 2 % that doubles until one side fits and the other does not) and bisects
to ``step`` tokens, so the answer is a traced length that fits and one ``step`` more is one that does not (unless
``max_tokens`` is reached).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from lightning_lowvram._progress import progress
from lightning_lowvram.memory.profiles import GPUProfile, format_bytes, gpu_profile
from lightning_lowvram.planner.estimate import MemoryEstimate, estimate_step_memory


@dataclasses.dataclass(frozen=True)
class ContextFit:
    """The longest sequence that fits, and the estimate there (``tokens == 0``: not even ``step`` tokens fit)."""

    tokens: int
    estimate: MemoryEstimate | None
    budget: int
    setting: str
    tensor_peak: int = 0  # the predicted tensor bytes at ``tokens`` (a low-bit base's saving, if given, taken off)

    def __str__(self) -> str:
        if not self.tokens:
            return f"no sequence of {self.setting} fits {format_bytes(self.budget)}"
        assert self.estimate is not None
        peak = self.tensor_peak
        return f"{self.tokens} tokens ({self.setting}): tensor peak {format_bytes(peak)} of {format_bytes(self.budget)}"


def with_sequence(batch: Any, length: int, example: int | None = None, dim: int = 1) -> Any:
    """``batch`` with its sequence dimension (``dim`` of every tensor as long as ``example``) stretched to ``length``.

    ``dim=0`` stretches the batch dimension instead (every tensor's first dimension).

    Example:
        >>> b = with_sequence({"input_ids": torch.ones(2, 8, dtype=torch.long), "labels": torch.ones(2)}, 20)
        >>> b["input_ids"].shape, b["labels"].shape
        (torch.Size([2, 20]), torch.Size([2]))

    """
    example = example or _sequence_length(batch, dim)

    def stretch(t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or t.dim() <= dim or t.shape[dim] != example:
            return t
        reps = [1] * t.dim()
        reps[dim] = -(-length // example)
        return t.repeat(*reps).narrow(dim, 0, length).contiguous()

    return torch.utils._pytree.tree_map(stretch, batch)


def _sequence_length(batch: Any, dim: int = 1) -> int:
    leaves = torch.utils._pytree.tree_leaves(batch)
    lengths = [t.shape[dim] for t in leaves if isinstance(t, torch.Tensor) and t.dim() > dim]
    if not lengths:
        raise ValueError(f"batch: no tensor with a {'sequence' if dim else 'batch'} dimension (dim {dim}) to stretch")
    return max(lengths)


def longest_sequence(
    module: nn.Module,
    batch: Any,
    gpu: str | GPUProfile,
    *,
    margin: float = 0.1,
    step: int = 256,
    max_tokens: int = 2**20,
    saving: int | dict[str, int] = 0,
    dim: int = 1,
    **estimate_kwargs: Any,
) -> ContextFit:
    """The longest sequence (a multiple of ``step``) whose step fits ``gpu`` with ``margin``, at these settings.

    Args:
        module: The LightningModule (a meta-device model inside works).
        batch: An example batch; every tensor whose dim 1 is its sequence length is stretched.
        gpu: The card.
        margin: Fraction of the card's tensor memory kept free (as ``plan``).
        step: Granularity of the answer, in tokens.
        max_tokens: Search no further.
        saving: Bytes taken off every estimate, or off each phase's peak (a low-bit frozen base modelled apart:
            ``low_bit_base.low_bit_phases``).
        dim: 1: stretch the sequence; 0: the batch (the largest batch at the example's sequence, ``step`` samples).
        **estimate_kwargs: Settings for :func:`estimate_step_memory` (precision, activation_checkpointing,
            chunked_cross_entropy, optimizer_8bit, micro_batch_size...).

    Raises:
        ValueError: For a card without a memory size, a margin outside [0, 1) or ``step`` < 1.

    """
    profile = gpu_profile(gpu) if isinstance(gpu, str) else gpu
    if profile.usable_bytes is None:
        raise ValueError(f"gpu {profile.name!r} has no memory size; pick a card, e.g. gpu=rtx3060_12gb")
    if not 0.0 <= margin < 1.0:
        raise ValueError(f"margin must be in [0, 1), got {margin!r}")
    if step < 1:
        raise ValueError(f"step must be >= 1 token, got {step!r}")
    budget = int(profile.usable_bytes * (1.0 - margin))
    example = _sequence_length(batch, dim)
    setting = ", ".join(k.replace("_", " ") if v is True else f"{v}" for k, v in estimate_kwargs.items() if v)

    def peak(tokens: int) -> tuple[int, MemoryEstimate]:
        stretched = with_sequence(batch, tokens, example, dim)
        estimate = estimate_step_memory(module, stretched, gpu=profile, **estimate_kwargs)
        job.advance(f"{tokens} tokens")
        if isinstance(saving, dict):
            return max(v - saving.get(p, 0) for p, v in estimate.by_phase.items()), estimate
        return estimate.peak - estimate.allowance - saving, estimate

    with progress(f"longest sequence on {profile.name}", unit="trace") as job:
        lengths = [step, step * 2, step * 4] if dim == 0 else [step * 4, step * 8, step * 16]
        peaks = [peak(n)[0] for n in lengths]
        guess = min(_solve(lengths, peaks, budget), max_tokens)  # inf where the peak does not grow with the length
        tokens = max(step, int(guess) // step * step)
        fits: dict[int, tuple[int, MemoryEstimate]] = {}  # traced lengths that fit (their tensor peak and estimate)

        def fit(n: int) -> bool:
            bytes_, estimate = peak(n)
            if bytes_ <= budget:
                fits[n] = bytes_, estimate
            return bytes_ <= budget

        # bracket the answer around the fitted guess (windows of 2 %, doubling), then bisect to ``step`` tokens
        window = max(step, tokens // 50 // step * step)
        lo, hi = (tokens, tokens + window) if fit(tokens) else (tokens - window, tokens)
        while lo > 0 and not fit(lo):
            lo, hi, window = max(0, lo - 2 * window), lo, 2 * window
        while hi <= max_tokens and fit(hi):
            lo, hi, window = hi, hi + 2 * window, 2 * window
        hi = min(hi, max_tokens + step)
        while hi - lo > step:
            middle = (lo + hi) // 2 // step * step
            lo, hi = (middle, hi) if fit(middle) else (lo, middle)
        bytes_, estimate = fits.get(lo, (0, None))
    return ContextFit(lo, estimate, budget, setting or "as given", bytes_)  # lo == 0: nothing fits


def frugal_settings(module: nn.Module, profile: GPUProfile) -> dict[str, Any]:
    """The settings that keep a step smallest, of those ``module`` and the card allow (for a "max context" report).

    Mixed precision (bf16 where the card has it), activation checkpointing (repeated blocks), their inputs offloaded
    (a card with ``pcie_gbs``) with the blocks' MLPs tiled, and the chunked cross-entropy (a HF causal LM it
    reproduces).
    """
    from lightning_lowvram.cores.activation_checkpointing import repeated_blocks
    from lightning_lowvram.cores.chunked_cross_entropy_hf import is_chunkable
    from lightning_lowvram.cores.tiled_mlp import mlp_modules

    blocks = bool(repeated_blocks(module))
    offload = blocks and profile.pcie_gbs is not None
    try:
        mlps = bool(mlp_modules(module))
    except ValueError:
        mlps = False
    return {
        "precision": "bf16-mixed" if profile.bf16 else "16-mixed",
        "activation_checkpointing": blocks,
        "offload_activations": offload,
        "tiled_mlp": offload and mlps,
        "chunked_cross_entropy": is_chunkable(module),
    }


def _solve(lengths: list[int], peaks: list[int], budget: int) -> float:
    """The length where ``a + b L + c L^2`` through the three points reaches ``budget`` (at least 0)."""
    (x1, x2, x3), (y1, y2, y3) = lengths, peaks
    c = ((y3 - y2) / (x3 - x2) - (y2 - y1) / (x2 - x1)) / (x3 - x1)
    b = (y2 - y1) / (x2 - x1) - c * (x1 + x2)
    a = y1 - b * x1 - c * x1 * x1
    if abs(c) * x3 * x3 < 1e-6 * max(1, abs(y3)):  # linear
        return (budget - a) / b if b > 0 else math.inf
    disc = b * b - 4 * c * (a - budget)
    if disc < 0:
        return 0.0
    return (-b + math.sqrt(disc)) / (2 * c) if c > 0 else (-b - math.sqrt(disc)) / (2 * c)
