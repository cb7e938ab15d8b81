"""Predict the peak memory of an evaluation step (validate, test, predict) without the GPU, streamed or not.

``estimate_eval_memory`` runs the module's ``validation_step``, ``test_step`` or ``predict_step`` on a fake-tensor copy
as Lightning's loops run them: in ``eval()`` mode under ``torch.inference_mode()`` (no gradients, no optimizer state),
with the step's output alive at its end (the loop holds it until the next step; the predict loop moves what it keeps
to the host), under the same CUDA rules as the training estimate (:mod:`.cuda_rules`: allocation rounding, the
attention kernel the card runs, autocast's op lists, the context allowance) and the same block extrapolation
(:mod:`.blocks`). Within 5 % of the meter's real CPU run on HF GPT-2, Llama, BERT, a Conv+BatchNorm net and the demos
(``tests/planner/test_evaluation.py``).

Weights streamed from host memory (:mod:`lightning_lowvram.cores.streaming`, ``resident_blocks=``) are modelled on the
trace: the streamed blocks' parameters leave the peak and one block's (two on CUDA, the prefetch) come back, the safe
side (the real peak may fall where no block is on the card); their bytes are ``host``, and every forward moves them
over PCIe (``streamed``, priced by :meth:`MemoryEstimate.step_time` at the profile's ``pcie_gbs``, not overlapped
with compute: the time errs slow). A low-bit base (``strategies={"low_bit_base": 4}``, every Linear layer frozen for
evaluation) is modelled as in the training estimate: its saving, less the largest layer's dequantization.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import torch
from torch import nn
from torch.utils._pytree import tree_map_only

from lightning_lowvram.cores.batches import batch_size_of, slice_batch
from lightning_lowvram.memory.meter import MemoryMeter, MemoryStats
from lightning_lowvram.memory.profiles import MiB
from lightning_lowvram.planner.blocks import affine, block_stack, extrapolate_ops, keep_blocks
from lightning_lowvram.planner.cuda_rules import KernelWorkspaces
from lightning_lowvram.planner.estimate import (
    _UNTRACEABLE,
    PRECISIONS,
    MemoryEstimate,
    Precision,
    _autocast,
    _detached_copy,
    _target,
    _trace_rules,
    call_step,
    to_dtype,
)
from lightning_lowvram.planner.timing import StepWork, WorkCounter
from lightning_lowvram.planner.tracing import has_meta_tensors, unpacked, unpadded

Stage = Literal["validate", "test", "predict"]
STAGES: dict[str, str] = {"validate": "validation_step", "test": "test_step", "predict": "predict_step"}


def estimate_eval_memory(
    module: nn.Module,
    batch: Any,
    stage: Stage = "validate",
    *,
    micro_batch_size: int | None = None,
    precision: Precision = "32-true",
    gpu: str | Any | None = None,
    device: Literal["cpu", "cuda"] | None = None,
    resident_blocks: int | None = None,
    strategies: Mapping[str, Any] | None = None,
    extrapolate_blocks: bool = True,
) -> MemoryEstimate:
    """Predict the peak memory of ``module``'s ``stage`` step on ``batch``, without running it for real.

    Args:
        module: A LightningModule (or any module with the stage's step method: ``validation_step``, ``test_step``,
            ``predict_step``).
        batch: An example batch as the stage's dataloader yields it.
        stage: ``"validate"``, ``"test"`` or ``"predict"``.
        micro_batch_size: The eval micro-batch (``AutoMicroBatchCallback(eval_micro_batch_size=...)``); ``None``:
            the whole batch.
        precision: As the Trainer's (``bf16-true``: bfloat16 weights; the mixed ones: autocast).
        gpu: A GPU profile or its name (CUDA's rules and its context allowance apply).
        device: Force the allocation rules, as in :func:`~lightning_lowvram.estimate_step_memory`.
        resident_blocks: Stream the repeated blocks after the first ``resident_blocks`` from host memory
            (``WeightStreamingCallback``); ``None``: not streamed.
        strategies: ``{"low_bit_base": 4 | 8}``: the Linear layers' weights in NF4 or int8 (``LowBitBaseCallback``
            with the model frozen for evaluation).
        extrapolate_blocks: Trace 2p and 3p of the repeated blocks and extrapolate (:mod:`.blocks`).

    Raises:
        ValueError: An unknown stage or precision, a non-positive micro-batch, a module without the stage's step, a
            batch the step rejects (its error), ``resident_blocks`` out of range, an unknown strategy.

    Example:
        >>> from lightning_lowvram.demo import DigitsMLP
        >>> estimate = estimate_eval_memory(DigitsMLP(), (torch.zeros(64, 64), torch.zeros(64, dtype=torch.long)))
        >>> estimate.by_category["parameters"], estimate.by_category["gradients"]
        (104488, 0)

    """
    step = _check(module, stage, precision, micro_batch_size, strategies)
    profile, capability = _target(gpu, device)
    n = batch_size_of(batch)
    micro = slice_batch(batch, 0, min(micro_batch_size or n, n), n)
    if resident_blocks is not None:
        from lightning_lowvram.cores.streaming import streamable_blocks

        streamable_blocks(module)  # refuses a model without blocks to stream, naming what it could stream
    run = (module, micro, step, precision, capability, resident_blocks is not None)
    try:
        stats, work, traced = _traced(run, extrapolate_blocks)
        method = "fake"
    except _UNTRACEABLE as err:
        if has_meta_tensors(module):
            raise ValueError(
                f"{type(module).__name__} is on the meta device and its {step} cannot be traced on fake tensors "
                f"({str(err).splitlines()[0]}): estimate a module with real weights"
            ) from err
        warnings.warn(
            f"estimate_eval_memory: {type(module).__name__}.{step} cannot be traced on fake tensors; it runs once for "
            "real on this machine's CPU instead (method='measured')",
            stacklevel=2,
        )
        stats, work = _run(*run, fake=False)
        method, traced = "measured", None
    cuda = capability is not None
    allowance = int(profile.context_mib * MiB) if cuda and profile is not None else 0
    by_category = dict(stats.by_category)
    estimate = MemoryEstimate(
        peak=stats.total + allowance, by_category=by_category, by_phase={"forward": stats.total}, allowance=allowance,
        device="cuda" if cuda else "cpu", gpu=profile.name if profile is not None else None, method=method,
        work=work, traced_blocks=traced, stage=stage,
    )  # fmt: skip
    bits = (strategies or {}).get("low_bit_base", 0)
    if bits:
        estimate = with_low_bit(estimate, module, bits)
    if resident_blocks is not None:
        estimate = with_resident(estimate, module, resident_blocks, precision)
    return estimate


def with_resident(
    estimate: MemoryEstimate, module: nn.Module, resident: int, precision: str = "32-true"
) -> MemoryEstimate:
    """An all-streamed estimate (``resident_blocks=0``) with the first ``resident`` blocks kept on the card instead.

    Their weights join the peak (the safe side: the traced peak's block on the card may be one of them) and leave the
    host bytes and the PCIe traffic; the planner prices every resident count from one streamed trace this way.

    Raises:
        ValueError: ``resident`` out of range (naming the model's block count).

    """
    from lightning_lowvram.cores.streaming import check_streamable

    per_block = _block_bytes(module, check_streamable(module, resident), 2 if precision == "bf16-true" else 0)
    kept = sum(per_block[:resident])
    left = per_block[resident:]
    # CUDA: the next block's copy (the prefetch) is on the card beside the current one's
    prefetch = max(left, default=0) if estimate.device == "cuda" and len(left) > 1 else 0
    change = kept + prefetch
    by_category = {**estimate.by_category, "parameters": estimate.by_category["parameters"] + change}
    return dataclasses.replace(
        estimate, peak=estimate.peak + change, by_category=by_category,
        by_phase={p: v + change for p, v in estimate.by_phase.items()}, host=sum(left), streamed=sum(left),
        resident_blocks=resident,
    )  # fmt: skip


def _block_bytes(module: nn.Module, names: list[str], size: int) -> list[int]:
    return [sum(p.numel() * (size or p.element_size()) for p in module.get_submodule(n).parameters()) for n in names]


def with_low_bit(estimate: MemoryEstimate, module: nn.Module, bits: int) -> MemoryEstimate:
    """``estimate`` with every Linear layer's weight in ``bits`` bits (``LowBitBaseCallback`` on the frozen model).

    Its saving, less the largest layer's dequantization held while it runs (``low_bit_base.low_bit_saving``).
    """
    from lightning_lowvram.cores.low_bit_base import low_bit_saving

    with _frozen(module):
        saved, transient = low_bit_saving(module, bits)  # type: ignore[arg-type]
    change = transient - saved
    by_category = {
        **estimate.by_category,
        "parameters": estimate.by_category["parameters"] - saved,
        "temporaries": estimate.by_category.get("temporaries", 0) + transient,
    }
    return dataclasses.replace(
        estimate, peak=estimate.peak + change, by_category=by_category,
        by_phase={p: v + change for p, v in estimate.by_phase.items()},
    )  # fmt: skip


@contextlib.contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    """Every parameter frozen for the block (evaluation trains nothing), then as it was."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _check(module: nn.Module, stage: str, precision: str, micro: int | None, strategies: Any) -> str:
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {', '.join(map(repr, STAGES))}, got {stage!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(map(repr, PRECISIONS))}, got {precision!r}")
    if micro is not None and (isinstance(micro, bool) or not isinstance(micro, int) or micro < 1):
        raise ValueError(f"micro_batch_size must be >= 1, got {micro!r}")
    unknown = set(strategies or {}) - {"low_bit_base"}
    if unknown:
        raise ValueError(f"strategies: {sorted(unknown)[0]!r} has no evaluation estimate; known: 'low_bit_base'")
    bits = (strategies or {}).get("low_bit_base", 0)
    if bits not in (0, 4, 8):
        raise ValueError(f"strategies.low_bit_base={bits!r}: evaluation takes 4 or 8")
    step = STAGES[stage]
    if not callable(getattr(module, step, None)):
        raise ValueError(f"{type(module).__name__} has no {step}: it cannot {stage}")
    return step


def _traced(run: tuple[Any, ...], extrapolate: bool) -> tuple[MemoryStats, StepWork, tuple[int, int, int] | None]:
    """The fake step of the whole model, or of 2p and 3p of its blocks extrapolated to all (:mod:`.blocks`)."""
    stack = block_stack(run[0]) if extrapolate else None
    if stack is None:
        return (*_run(*run, fake=True), None)
    low_count, high_count = stack.samples()
    (low, low_work), (high, high_work) = (_run(*run, fake=True, blocks=(stack, c)) for c in (low_count, high_count))
    steps = (stack.count - high_count) // stack.period
    ops = extrapolate_ops(low_work.micro, high_work.micro, steps)
    if low.total > high.total or ops is None:
        warnings.warn(
            "estimate_eval_memory: the 2- and 3-block traces are not two points of one line; the whole model is "
            "traced instead (slower)",
            stacklevel=3,
        )
        return (*_run(*run, fake=True), None)
    categories = {k: affine(low.by_category.get(k, 0), v, steps) for k, v in high.by_category.items()}
    stats = MemoryStats(affine(low.total, high.total, steps), categories)
    return stats, StepWork(ops, ()), (low_count, high_count, stack.count)


def _streamed_copy(copied: nn.Module) -> None:
    """The copy's blocks streamed as :mod:`~lightning_lowvram.cores.streaming` streams them, for the trace.

    accelerate's hooks cannot rebuild a fake tensor's parameter (``type(param)(...)`` needs the fake mode), so the
    trace does what they do with plain hooks: between forwards a block's parameters are meta placeholders (nothing on
    the card), its forward pre-hook sets copies of the host weights (counted) and its post-hook drops them. Checked
    against the meter's run through the real hooks (``tests/planner/test_evaluation.py``).
    """
    from lightning_lowvram.cores.streaming import streamable_blocks

    for name in streamable_blocks(copied):
        block = copied.get_submodule(name)
        entries = [(m, key, p) for m in block.modules() for key, p in m._parameters.items() if p is not None]
        placeholders = [nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"), False) for *_, p in entries]

        def onload(module: nn.Module, args: Any, entries: list[Any] = entries) -> None:
            for owner, key, host in entries:
                # the copy's bytes without a kernel: on the card it is a host-to-card copy, priced as PCIe traffic
                owner._parameters[key] = nn.Parameter(torch.empty_like(host), requires_grad=False)

        def offload(module: nn.Module, args: Any, out: Any, entries: Any = entries, held: Any = placeholders) -> None:
            for (owner, key, _), placeholder in zip(entries, held, strict=True):
                owner._parameters[key] = placeholder

        offload(block, (), None)
        block.register_forward_pre_hook(onload)
        block.register_forward_hook(offload)


def _run(
    module: nn.Module, batch: Any, step: str, precision: str, capability: tuple[int, int] | None, stream: bool,
    fake: bool, blocks: Any = None,
) -> tuple[MemoryStats, StepWork]:  # fmt: skip
    """One evaluation step of a copy of ``module`` (fake tensors when ``fake``), metered; its work counted.

    ``stream``: every repeated block streamed (:func:`~lightning_lowvram.cores.streaming.stream_blocks` on the copy,
    one block's weights on the card at a time).
    """
    mode = torch._subclasses.fake_tensor.FakeTensorMode(allow_non_fake_inputs=False) if fake else None
    copied = _detached_copy(module, mode)
    if blocks is not None:
        keep_blocks(copied, *blocks)
    if precision == "bf16-true":
        to_dtype(copied, torch.bfloat16)
    if stream:
        _streamed_copy(copied)
    copied.eval()
    inputs = tree_map_only(torch.Tensor, mode.from_tensor, batch) if mode else batch
    masks = (fake and unpadded(batch), fake and unpacked(batch))
    counter = WorkCounter()
    workspaces = KernelWorkspaces(capability) if capability is not None else contextlib.nullcontext()
    with contextlib.ExitStack() as rules:
        for context in _trace_rules(mode, capability, masks):
            rules.enter_context(context)
        with MemoryMeter(copied) as meter, workspaces, counter, torch.inference_mode(), _autocast(precision):
            output = call_step(copied, step, inputs)
            del output  # alive until here: the loop holds a step's output until the next step
    return meter.peak, StepWork(counter.take(), ())
