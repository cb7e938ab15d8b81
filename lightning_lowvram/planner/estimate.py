"""Predict a training step's peak memory without the GPU: the step runs on fake tensors, nothing is allocated.

``estimate_step_memory`` copies the module onto fake tensors (``FakeTensorMode``), creates the optimizer state, runs
its ``training_step`` and backward on one micro-batch (with the step's gradients present when the batch splits) and
the optimizer step under the project's memory meter, and reports the peak by category and by phase, and the step's
work for the step-time model. For ``device="cpu"`` it is within 5 % of the meter's real CPU run (tested on the demo
models and on HF GPT-2, Llama, BERT and a ResNet-style net). For a CUDA card it also applies ``planner.cuda_rules``:
512-byte allocation rounding, the multi-tensor (``foreach``) optimizer implementation CUDA uses by default, dropout's
bool mask, the fused attention kernel the card would run (flash / memory-efficient / cuDNN / math, chosen by
PyTorch's rules for its compute capability) with the workspaces its backward allocates, and the card's
context/workspace allowance (``GPUProfile.context_mib``), CUDA autocast's op lists for mixed precision, and cuBLAS's
and cuDNN's workspaces. Against the one GPU measurement there is (an H200, issue 12: HF GPT-2 small whole,
micro-batched, checkpointed, fp32 and bf16; resnet18 fp32 and bf16) the estimates are -0.8 % to +1.7 %
(``benchmarks/estimate_vs_h200``); other families and cards are unverified on a GPU.

A model with one stack of repeated blocks (a transformer's layers) is traced cut to two and three of them and
extrapolated to all (:mod:`.blocks`: the same bytes and work, tested against whole traces); an example batch's masks
are read first, so the trace builds the attention masks the real step builds and no others (:mod:`.tracing`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import warnings
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from torch import nn
from torch.utils._pytree import tree_map_only

from lightning_lowvram._patching import patch
from lightning_lowvram.cores.activation_checkpointing import checkpoint_blocks, host_offload
from lightning_lowvram.cores.batches import batch_size_of, slice_batch
from lightning_lowvram.cores.chunked_cross_entropy_hf import apply_chunked_cross_entropy
from lightning_lowvram.cores.optimizer_8bit import module_optimizer
from lightning_lowvram.cores.tiled_mlp import tile_mlps
from lightning_lowvram.memory.meter import MemoryMeter, MemoryStats
from lightning_lowvram.memory.profiles import GPUProfile, MiB, format_bytes, gpu_profile
from lightning_lowvram.planner.blocks import BlockStack, affine, block_stack, extrapolate_ops, keep_blocks
from lightning_lowvram.planner.cuda_rules import (
    DEFAULT_CAPABILITY,
    CudaKernels,
    KernelWorkspaces,
    cuda_autocast_policy,
    cuda_rounding,
)
from lightning_lowvram.planner.sharding import Offload, Sharding, ShardSpec, fake_world, offloaded, shard, shard_spec
from lightning_lowvram.planner.timing import StepWork, Traffic, WorkCounter
from lightning_lowvram.planner.tracing import (
    ScalarPlaceholders,
    has_meta_tensors,
    hf_masks_as_run,
    materialize_meta,
    unpacked,
    unpadded,
)
from lightning_lowvram.registry import StepContext, Strategy, settings_of

Precision = Literal["32-true", "bf16-mixed", "16-mixed", "bf16-true"]
PRECISIONS: tuple[str, ...] = ("32-true", "bf16-mixed", "16-mixed", "bf16-true")
PHASES = ("forward", "backward", "optimizer")


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """A training step's predicted peak.

    Attributes:
        peak: Bytes of live tensors at the peak (plus ``allowance``).
        by_category: The peak split into parameters, buffers, gradients, optimizer, activations, temporaries, other.
        by_phase: Peak bytes of tensors during forward, backward and the optimizer step.
        allowance: Bytes outside tensors added for the target (CUDA context and workspaces).
        device: ``"cpu"`` or ``"cuda"``: whose allocation rules were applied.
        gpu: The GPU profile's name, if one was given.
        method: ``"fake"`` (traced on fake tensors) or ``"measured"`` (a step fake tensors cannot trace, run for real on
            this machine's CPU and metered).
        work: What one micro-batch and one optimizer step do (FLOPs, bytes, kernels), for
            :meth:`step_time`.
        devices: Ranks of the step (``peak`` is one rank's).
        host: Bytes one rank keeps in host memory instead (offload), not in ``peak``.
        offloaded_activations: The part of ``host`` that is checkpointed blocks' saved inputs (``offload_activations``):
            copied to the host in forward and back in backward.
        traced_blocks: ``(low, high, count)`` when the step was traced with ``low`` and ``high`` of the model's
            ``count`` repeated blocks and extrapolated (:mod:`.blocks`); ``None``: the whole model was traced.
        stage: ``"fit"`` (a training step) or the evaluation stage (:func:`~.evaluation.estimate_eval_memory`).
        streamed: Bytes of weights streamed from host memory over PCIe per micro-batch (in ``host`` too).
        resident_blocks: With streaming, the blocks kept on the card; ``None``: not streamed.

    """

    peak: int
    by_category: dict[str, int]
    by_phase: dict[str, int]
    allowance: int
    device: str
    gpu: str | None = None
    method: str = "fake"
    work: StepWork | None = dataclasses.field(default=None, repr=False, compare=False)
    devices: int = 1
    host: int = 0
    offloaded_activations: int = 0  # of ``host``: checkpointed blocks' inputs kept in host memory (copied out and in)
    traced_blocks: tuple[int, int, int] | None = None  # (low, high, all): traced with low and high blocks, extrapolated
    stage: str = "fit"
    streamed: int = 0
    resident_blocks: int | None = None

    def fits(self, budget: int, margin: float = 0.1) -> bool:
        """Whether the peak stays below ``budget`` with a ``margin`` (fraction of the budget) to spare."""
        return self.peak <= budget * (1.0 - margin)

    def step_time(self, gpu: str | GPUProfile, micro_batches: int = 1) -> float:
        """Predicted seconds of one optimizer step of ``micro_batches`` micro-batches on ``gpu``.

        An evaluation estimate's: of one batch, streamed weights' copies included.
        The step-time model of :mod:`lightning_lowvram.planner.timing`.
        """
        assert self.work is not None
        traffic = Traffic(pcie=self.streamed) if self.streamed else None
        return self.work.seconds(gpu_profile(gpu), micro_batches, traffic)

    def __str__(self) -> str:
        parts = ", ".join(f"{k} {format_bytes(v)}" for k, v in self.by_category.items() if v)
        extra = f" + {format_bytes(self.allowance)} context" if self.allowance else ""
        extra += f"; {format_bytes(self.host)} in host memory" if self.host else ""
        rank = f" per rank of {self.devices}" if self.devices > 1 else ""
        return f"{format_bytes(self.peak)}{rank} on {self.gpu or self.device} ({parts}{extra})"


def estimate_step_memory(
    module: nn.Module,
    batch: Any,
    *,
    micro_batch_size: int | None = None,
    precision: Precision = "32-true",
    optimizer: Callable[..., torch.optim.Optimizer] | None = None,
    activation_checkpointing: bool = False,
    optimizer_8bit: bool = False,
    chunked_cross_entropy: bool = False,
    offload_activations: bool = False,
    bf16_base: bool = False,
    tiled_mlp: bool = False,
    gpu: str | GPUProfile | None = None,
    device: Literal["cpu", "cuda"] | None = None,
    devices: int = 1,
    sharding: Sharding = "none",
    offload: Offload = "none",
    extrapolate_blocks: bool = True,
    strategies: Mapping[str, Any] | None = None,
    modelled: bool = True,
) -> MemoryEstimate:
    """Predict the peak memory of ``module``'s training step on ``batch``, without running it for real.

    Args:
        module: A LightningModule (its ``training_step`` and ``configure_optimizers`` are used) or any module whose
            ``training_step(batch, batch_idx)`` returns a loss.
        batch: An example batch (tensors, tuples, dicts...) as the dataloader yields it.
        micro_batch_size: Split the batch as AutoMicroBatchCallback would; ``None``: the whole batch.
        precision: ``"32-true"``, ``"bf16-mixed"``, ``"16-mixed"`` (autocast) or ``"bf16-true"`` (bf16 weights).
        optimizer: An optimizer class or factory ``f(params) -> Optimizer``; ``None``: the module's
            ``configure_optimizers``.
        activation_checkpointing: Checkpoint repeated blocks (as ActivationCheckpointingCallback does).
        optimizer_8bit: Adam/AdamW state in 8 bits (as EightBitOptimizerCallback does). *Modelled*, not traced: the
            traced float32 moments are replaced by torchao's layout, byte for byte (tested against torchao on CPU).
        chunked_cross_entropy: A Hugging Face causal LM's head and loss in chunks (as ChunkedCrossEntropyCallback
            does), traced: the chunked loss runs on the fake copy.
        offload_activations: With ``activation_checkpointing``, the checkpointed blocks' saved inputs in host memory
            (``ActivationCheckpointingCallback(offload=True)``), traced: their bytes are in ``host``, not ``peak``.
        bf16_base: Frozen float32 Linear layers stored in bfloat16 (``LowBitBaseCallback(bits=16)``), traced on the
            copy; ``bf16-mixed`` only (where it computes the same step).
        tiled_mlp: Each repeated block's MLP a tile of the sequence at a time, recomputed per tile in backward
            (``ActivationCheckpointingCallback(tile_mlp=True)``, :mod:`lightning_lowvram.cores.tiled_mlp`), traced.
        gpu: A GPU profile or its name: CUDA allocation rules and its context allowance apply.
        device: Force the allocation rules (``"cpu"`` or ``"cuda"``); default: ``"cuda"`` when ``gpu`` names a card.
            ``"cuda"`` without a ``gpu`` picks attention kernels as on an A100 (compute capability 8.0).
        devices: Ranks: the estimate is one rank's step (``batch`` is one rank's batch, as each rank's loader
            yields it); sharded, traced with FSDP2 over a fake process group (:mod:`.sharding`).
        sharding: ``"full"`` (FSDP2, parameters resharded after forward), ``"grad_op"`` (kept unsharded until
            backward, ZeRO-2-like) or ``"none"`` (one device; with ``devices`` > 1 DDP: one device's step plus its
            gradient buckets, :func:`ddp_bucket_bytes`).
        offload: ``"params"`` (FSDP2's CPU offload: sharded parameters, gradients and optimizer state, and the
            optimizer step, in host memory) or ``"optimizer"`` (its state and step only): those bytes move from
            ``peak`` to ``host`` (modelled per phase, :func:`.sharding.offloaded`).
        extrapolate_blocks: Trace the model cut to 2 and 3 of its repeated blocks (2p and 3p for a pattern of
            period p) and extrapolate to all of them (:mod:`.blocks`; the same bytes, several times faster on deep
            models); ``False``, or blocks that do not repeat: trace the whole model.
        strategies: Registered strategies' values by name (:mod:`lightning_lowvram.registry`), e.g.
            ``{"low_bit_base": 4}`` or a strategy of your own: each is traced on the copy or modelled, as it
            declares. The flags above are the built-ins' spellings of the same.
        modelled: ``False``: the traced strategies only (the planner models the others per candidate).

    Raises:
        ValueError: For an unknown precision or GPU, a non-positive micro-batch size, or a batch the module's
            ``training_step`` rejects (with its error).

    Example:
        >>> from lightning_lowvram.demo import DigitsMLP
        >>> estimate = estimate_step_memory(DigitsMLP(), (torch.zeros(64, 64), torch.zeros(64, dtype=torch.long)))
        >>> estimate.by_category["parameters"], estimate.device
        (104488, 'cpu')

    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(map(repr, PRECISIONS))}, got {precision!r}")
    chosen = _strategies({**(strategies or {}), **({"optimizer_8bit": True} if optimizer_8bit else {})})
    applied = _applied(chosen, precision, activation_checkpointing, chunked_cross_entropy, offload_activations,
                       bf16_base, tiled_mlp)  # fmt: skip
    spec = shard_spec(devices, sharding, offload)
    profile, capability = _target(gpu, device)
    n = batch_size_of(batch)
    if micro_batch_size is not None and micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    micro = min(micro_batch_size or n, n)
    split = micro < n  # later micro-batches of a step run with the step's gradients already there
    step = (module, slice_batch(batch, 0, micro, n), split, precision, optimizer, applied, capability, spec)
    try:
        per_phase, work, state, moved, traced = _traced(step, extrapolate_blocks)
        method = "fake"
    except _UNTRACEABLE as err:
        # an op fake tensors cannot run (data-dependent shapes...): measure the same step for real on this machine
        _real_run_instead(module, err)
        per_phase, work, state, moved = _run(*step, fake=False)
        method, traced = "measured", None
    cuda = capability is not None
    device_phases, host = offloaded(per_phase, spec.offload if spec else "none", *state)
    buckets = ddp_bucket_bytes(module, precision, cuda) if spec and spec.sharding == "none" else 0
    estimate = _assembled(device_phases, buckets, int(profile.context_mib * MiB) if cuda and profile else 0)
    estimate = dataclasses.replace(
        estimate, device="cuda" if cuda else "cpu", gpu=profile.name if profile is not None else None, method=method,
        work=work, devices=spec.devices if spec else 1, host=host + moved, offloaded_activations=moved,
        traced_blocks=traced,
    )  # fmt: skip
    if not modelled:
        return estimate
    ctx = StepContext(module, precision, (precision,), spec is None or spec.sharding == "none", applied[1], {}, {},
                      optimizer)  # fmt: skip
    for strategy, value in chosen:
        estimate = strategy.model(estimate, value, ctx) if strategy.model is not None else estimate
    return estimate


def _applied(
    chosen: list[tuple[Strategy, Any]], precision: str, checkpointing: bool, chunked: bool, offload: bool,
    bf16_base: bool, tiled: bool,
) -> tuple[Any, ...]:  # fmt: skip
    """What the traced copy gets: the flags, or the same from registered strategies' ``trace``, and their ``prepare``.

    Raises:
        ValueError: Offloaded activations without checkpointing, a bfloat16 base under another precision.

    """
    flags = {k: v for s, value in chosen if s.trace is not None for k, v in s.trace(value).items() if v}
    checkpointing = checkpointing or flags.get("activation_checkpointing", False)
    offload = offload or flags.get("offload_activations", False)
    if offload and not checkpointing:
        raise ValueError(
            "offload_activations=True moves checkpointed blocks' inputs to host memory: it needs "
            "activation_checkpointing=True (ActivationCheckpointingCallback(offload=True))"
        )
    bf16_base = bf16_base or flags.get("bf16_base", False)
    if bf16_base:
        from lightning_lowvram.cores.low_bit_base import check_precision

        check_precision(16, precision)
    chunked = chunked or flags.get("chunked_cross_entropy", False)
    tiled = tiled or flags.get("tiled_mlp", False)
    prepared = tuple((s.prepare, value) for s, value in chosen if s.prepare is not None)
    return checkpointing, chunked, offload, bf16_base, tiled, prepared


def _target(gpu: str | GPUProfile | None, device: str | None) -> tuple[GPUProfile | None, tuple[int, int] | None]:
    """The card's profile and, where CUDA's rules apply, its compute capability (``None``: the CPU's rules)."""
    profile = gpu_profile(gpu) if isinstance(gpu, str) else gpu
    cuda = device == "cuda" or (device is None and profile is not None and profile.memory_gib is not None)
    if not cuda:
        return profile, None
    return profile, (profile.compute_capability if profile is not None else None) or DEFAULT_CAPABILITY


def _assembled(device_phases: dict[str, dict[str, int]], buckets: int, allowance: int) -> MemoryEstimate:
    """The estimate's bytes: the peak phase's categories (DDP's buckets among the gradients), each phase's peak."""
    peak_phase = max(device_phases, key=lambda p: sum(device_phases[p].values()))
    by_category = dict(device_phases[peak_phase])
    by_category["gradients"] = by_category.get("gradients", 0) + buckets
    return MemoryEstimate(
        peak=sum(by_category.values()) + allowance,
        by_category=by_category,
        by_phase={phase: sum(device_phases[phase].values()) + buckets for phase in PHASES},
        allowance=allowance,
        device="cpu",
    )


def _strategies(values: Mapping[str, Any]) -> list[tuple[Strategy, Any]]:
    """The registered strategies ``values`` names and their values, in registry order."""
    try:
        return list(settings_of(values))
    except KeyError as err:
        raise ValueError(f"strategies: {err.args[0]}") from err


def parameter_bytes(module: nn.Module, precision: str = "32-true", trainable: bool = False) -> int:
    """Bytes of ``module``'s parameters as a step at ``precision`` stores them (``bf16-true``: 2 a value).

    Example:
        >>> parameter_bytes(nn.Linear(10, 10), "bf16-true")
        220

    """
    size = 2 if precision == "bf16-true" else None
    params = [p for p in module.parameters() if p.requires_grad or not trainable]
    return sum(p.numel() * (size or p.element_size()) for p in params)


def ddp_bucket_bytes(module: nn.Module, precision: str = "32-true", cuda: bool = False) -> int:
    """Bytes of DDP's gradient buckets on each rank: one more copy of the trainable parameters' gradients.

    DDP's reducer allocates flat buckets for all gradients at construction and keeps them (PyTorch's DDP docs,
    ``gradient_as_bucket_view``: "the saved memory size will be equal to the total gradients size" when set;
    Lightning's ``DDPStrategy`` leaves it ``False``). Checked against the meter on a real 2-process gloo DDP run
    (``tests/callbacks/test_auto_micro_batch.py``).

    Example:
        >>> ddp_bucket_bytes(nn.Linear(10, 10))  # 110 float32 gradients
        440

    """
    total = parameter_bytes(module, precision, trainable=True)
    return -(-total // 512) * 512 if cuda else total  # one allocation per bucket; rounding it is noise


def check_batch(module: nn.Module, batch: Any) -> None:
    """Run ``module.training_step`` once on fake tensors (nothing allocated, weights untouched) to see the batch fits.

    Catches a model paired with the wrong data before any training step. Steps fake tensors cannot run are not checked.

    Raises:
        ValueError: The batch does not fit ``training_step`` (its error's first line), or no loss tensor came back.

    Example:
        >>> from lightning_lowvram.demo import DigitsMLP
        >>> check_batch(DigitsMLP(), (torch.zeros(4, 64), torch.zeros(4, dtype=torch.long)))
        >>> check_batch(DigitsMLP(), (torch.zeros(4, 10), torch.zeros(4, dtype=torch.long)))
        Traceback (most recent call last):
        ...
        ValueError: the example batch does not fit DigitsMLP.training_step: a and b must have same reduction dim, ...

    """
    mode = torch._subclasses.fake_tensor.FakeTensorMode(allow_non_fake_inputs=False)
    copied = _detached_copy(module, mode)
    log = logging.getLogger("torch._subclasses.fake_tensor")  # it logs a failing meta kernel's traceback
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        with mode, torch.no_grad(), ScalarPlaceholders():
            _loss(copied, tree_map_only(torch.Tensor, mode.from_tensor, batch))
    except _UNTRACEABLE:
        return
    finally:
        log.setLevel(level)


def to_dtype(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``module.to(dtype)`` (what Lightning's ``bf16-true`` does) that keeps tied parameters tied, in place.

    ``Module.to`` swaps each parameter for its converted copy, which fails on fake tensors when a parameter is shared
    (HF's tied embeddings: "Couldn't swap Embedding.weight"); here each distinct floating-point parameter is
    converted once and put back wherever it was, and floating-point buffers are converted as ``to`` converts them.

    Example:
        >>> tied = nn.Sequential(nn.Embedding(4, 2), nn.Linear(2, 4, bias=False))
        >>> tied[1].weight = tied[0].weight
        >>> to_dtype(tied, torch.bfloat16)[1].weight is tied[0].weight, tied[0].weight.dtype
        (True, torch.bfloat16)

    """
    converted: dict[int, nn.Parameter] = {}
    for mod in module.modules():
        for name, param in list(mod._parameters.items()):
            if param is None or not param.is_floating_point():
                continue
            if id(param) not in converted:
                converted[id(param)] = nn.Parameter(param.detach().to(dtype), requires_grad=param.requires_grad)
            mod._parameters[name] = converted[id(param)]
        for name, buffer in list(mod._buffers.items()):
            if buffer is not None and buffer.is_floating_point():
                mod._buffers[name] = buffer.to(dtype)
    return module


def _real_run_instead(module: nn.Module, err: Exception) -> None:
    """Announce the measured fallback (or refuse it for a module without weights): what it costs and why."""
    name = type(module).__name__
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    if has_meta_tensors(module):
        raise ValueError(
            f"{name} is on the meta device (no weights) and its training_step cannot be traced on fake tensors "
            f"({reason}), so it cannot be estimated; a branch on a tensor's value (if loss > x, bool(t)) is the usual "
            "cause: estimate a module with real weights, or move the branch out of training_step"
        ) from err
    warnings.warn(
        f"estimate_step_memory: {name}.training_step cannot be traced on fake tensors ({reason}); it runs once for "
        "real on this machine's CPU instead (its memory and time here, CPU kernels and no CUDA attention rules): "
        "method='measured'",
        stacklevel=3,
    )


def _detached_copy(module: nn.Module, mode: Any) -> nn.Module:
    """A copy of ``module`` (on fake tensors when ``mode`` is a ``FakeTensorMode``) whose logging goes nowhere.

    Meta-device weights become fake CPU tensors (``tracing.materialize_meta``): a module built without its weights
    traces as the real module does.
    """
    with torch._subclasses.fake_tensor.FakeCopyMode(mode) if mode else contextlib.nullcontext():
        copied = copy.deepcopy(module)
    if mode:
        materialize_meta(copied, mode)
    for name in ("log", "log_dict"):  # no Trainer to log to; a copy, so never undone
        patch(copied, name, lambda *args, **kwargs: None)
    return copied


_UNTRACEABLE = (
    torch._subclasses.fake_tensor.DynamicOutputShapeException,
    torch._subclasses.fake_tensor.DataDependentOutputException,
    torch._subclasses.fake_tensor.UnsupportedOperatorException,
    torch._subclasses.fake_tensor.UnsupportedFakeTensorException,
)


def _traced(step: tuple[Any, ...], extrapolate: bool) -> tuple[Any, StepWork, Any, int, tuple[int, int, int] | None]:
    """``_run`` on fake tensors: of the whole model, or of 2p and 3p of its blocks and extrapolated (:mod:`.blocks`).

    Falls back to the whole model where the two traces are not two points of one line (a phase's bytes fall with
    more blocks, or the fewer blocks' ops are not part of the more blocks' ops).
    """
    stack = block_stack(step[0]) if extrapolate else None
    if stack is None:
        return (*_run(*step, fake=True), None)
    low_count, high_count = stack.samples()
    low = _run(*step, fake=True, blocks=(stack, low_count))
    high = _run(*step, fake=True, blocks=(stack, high_count))
    steps = (stack.count - high_count) // stack.period
    per_phase: dict[str, MemoryStats] = {}
    for phase, stats in high[0].items():
        before = low[0].get(phase)
        if before is None or before.total > stats.total:
            return (*_run(*step, fake=True), None)
        categories = {k: affine(before.by_category.get(k, 0), v, steps) for k, v in stats.by_category.items()}
        per_phase[phase] = MemoryStats(affine(before.total, stats.total, steps), categories)
    micro = extrapolate_ops(low[1].micro, high[1].micro, steps)
    updates = extrapolate_ops(low[1].optimizer, high[1].optimizer, steps)
    if micro is None or updates is None:
        return (*_run(*step, fake=True), None)
    (p_low, g_low, _), (p_high, g_high, largest) = low[2], high[2]
    state = (affine(p_low, p_high, steps), affine(g_low, g_high, steps), largest)
    moved = affine(low[3], high[3], steps)
    return per_phase, StepWork(micro, updates), state, moved, (low_count, high_count, stack.count)


def _run(
    module: nn.Module,
    batch: Any,
    accumulating: bool,
    precision: str,
    optimizer: Any,
    strategies: tuple[Any, ...],
    capability: tuple[int, int] | None,
    spec: ShardSpec | None,
    fake: bool,
    blocks: tuple[BlockStack, int] | None = None,
) -> tuple[dict[str, Any], StepWork, tuple[int, int, int], int]:
    """Two optimizer steps of a copy of ``module``, metered per phase; the second's work counted.

    Returns the meter's stats at each phase's peak, the work, one rank's parameter and gradient bytes and its
    largest trainable parameter's, and the peak host bytes of offloaded activations.

    The first step only creates the optimizer state (from zero gradients); the second runs one micro-batch (with the
    gradients of earlier micro-batches present when ``accumulating``, i.e. the batch splits) and the update.

    ``strategies``: activation checkpointing, chunked cross-entropy, activation offload, a bfloat16 frozen base,
    tiled MLPs, and registered strategies' ``(prepare, value)`` pairs.
    ``capability``: the CUDA
    card's compute capability, whose rules apply; ``None``: the CPU's. ``spec``: rank 0 of
    an FSDP2 job over a fake process group. ``blocks``: cut the copy to that many of the stack's blocks.
    """
    cuda = capability is not None
    mode = torch._subclasses.fake_tensor.FakeTensorMode(allow_non_fake_inputs=False) if fake else None
    copied = _prepared_copy(module, mode, precision, strategies, blocks)
    inputs = tree_map_only(torch.Tensor, mode.from_tensor, batch) if mode else batch
    sharded = spec is not None and spec.sharding != "none"
    masks = (fake and unpadded(batch), fake and unpacked(batch))  # read on the real batch, before the fake mode
    with contextlib.ExitStack() as rules:
        mesh = rules.enter_context(fake_world(spec.devices)) if sharded and spec is not None else None
        for context in _trace_rules(mode, capability, masks):
            rules.enter_context(context)
        # FSDP2 warns of in-place ops on a unit's view outputs, once per trace; the real run warns the user itself
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        if sharded:
            shard(copied, mesh, spec)
        opt = module_optimizer(copied, optimizer)
        if cuda:
            for group in opt.param_groups:
                if "foreach" in group:
                    group["foreach"] = True  # CUDA's default: one parameter-sized temporary per update
        per_phase, work = _two_steps(copied, opt, inputs, accumulating, precision, capability)
        rank = _rank_bytes(copied)
    offload = host_offload(copied)
    return per_phase, work, rank, offload.peak if offload else 0


def _prepared_copy(
    module: nn.Module, mode: Any, precision: str, strategies: tuple[Any, ...], blocks: tuple[BlockStack, int] | None
) -> nn.Module:
    """The copy of ``module`` to trace: cut to ``blocks``, in ``precision``'s dtype, with ``strategies`` applied."""
    copied = _detached_copy(module, mode)
    if blocks is not None:
        keep_blocks(copied, *blocks)
    if precision == "bf16-true":
        to_dtype(copied, torch.bfloat16)
    activation_checkpointing, chunked_cross_entropy, offload_activations, bf16_base, tiled, prepared = strategies
    if bf16_base:
        from lightning_lowvram.cores.low_bit_base import quantize_frozen_base

        quantize_frozen_base(copied, 16)
    for prepare, value in prepared:  # registered strategies that change the model
        prepare(copied, value)
    if tiled:
        tile_mlps(copied)
    if activation_checkpointing:
        checkpoint_blocks(copied, offload=offload_activations)
    if chunked_cross_entropy:
        apply_chunked_cross_entropy(copied)
    return copied.train()


def _trace_rules(mode: Any, capability: tuple[int, int] | None, masks: tuple[bool, bool]) -> list[Any]:
    """The contexts a step runs under: fake tensors, the card's rules, logged scalars, HF's masks as for real."""
    cuda = capability is not None
    rules: list[Any] = [mode] if mode else []
    rules += [cuda_rounding(cuda)]
    rules += [CudaKernels(capability, attention=mode is not None), cuda_autocast_policy()] if cuda else []
    rules += [ScalarPlaceholders()] if mode else []
    return [*rules, hf_masks_as_run(*masks), warnings.catch_warnings()]


def _two_steps(
    copied: nn.Module,
    opt: torch.optim.Optimizer,
    inputs: Any,
    accumulating: bool,
    precision: str,
    capability: tuple[int, int] | None,
) -> tuple[dict[str, Any], StepWork]:
    """The two optimizer steps of :func:`_run`, metered: each phase's highest peak, and the second step's work."""
    per_phase: dict[str, Any] = {}  # the meter's stats at each phase's highest peak

    def record(phase: str) -> None:
        stats = meter.peak
        if phase not in per_phase or stats.total > per_phase[phase].total:
            per_phase[phase] = stats
        meter.reset_peak()

    counter = WorkCounter()
    workspaces = KernelWorkspaces(capability) if capability is not None else contextlib.nullcontext()
    with MemoryMeter(copied, opt) as meter, workspaces:
        # the first step only creates the optimizer state: zero gradients stand in for a forward and backward
        for group in opt.param_groups:
            for param in group["params"]:
                if param.requires_grad:
                    param.grad = torch.zeros_like(param)
        opt.step()
        record("optimizer")
        # the second step, as in steady state: when the batch splits, every micro-batch after the first of a step
        # runs with the step's gradients already there (the peak), which the kept zero gradients stand for.
        # Unsplit, Lightning's closure runs training_step *before* zero_grad (set_to_none): the previous step's
        # gradients are still there during the forward and freed before the backward (ANCHORS.md, mechanics).
        if accumulating:
            opt.zero_grad(set_to_none=False)
        with counter:
            meter.reset_peak()
            with _autocast(precision):
                loss = _loss(copied, inputs)
            record("forward")
            if not accumulating:
                opt.zero_grad(set_to_none=True)
            _backward(loss)
            del loss
            record("backward")
        micro = counter.take()
        with counter:
            opt.step()
        opt.zero_grad(set_to_none=True)
        record("optimizer")
        updates = counter.take()
    return per_phase, StepWork(micro, updates)


def _rank_bytes(copied: nn.Module) -> tuple[int, int, int]:
    """One rank's parameter, gradient and largest trainable parameter bytes (a DTensor's local shard).

    What CPU offload keeps in host memory.
    """
    local = [(getattr(p, "_local_tensor", p), p.requires_grad) for p in copied.parameters()]
    params = sum(t.numel() * t.element_size() for t, _ in local)
    grads = sum(t.numel() * t.element_size() for t, trained in local if trained)
    largest = max((t.numel() * t.element_size() for t, trained in local if trained), default=0)
    return params, grads, largest


def _backward(loss: torch.Tensor) -> None:
    """``loss.backward()`` that keeps torch-function modes (``CudaKernels``) active for the whole backward.

    ``loss.backward()`` is itself dispatched to the active mode, and a mode is off while it handles a call, so
    forwards recomputed by activation checkpointing would run without the CUDA rules (and save other tensors).
    """
    run = getattr(torch.autograd.graph, "_engine_run_backward", None)
    if run is None:  # pragma: no cover - older torch
        loss.backward()
        return
    run((loss,), (torch.ones_like(loss),), False, False, (), allow_unreachable=True, accumulate_grad=True)


def call_step(module: nn.Module, step: str, batch: Any) -> Any:
    """``module.<step>(batch, 0)``, shared by the training and the evaluation estimates.

    A batch the step rejects is one ``ValueError`` naming the step; untraceable ops pass through (the measured run).
    """
    try:
        return getattr(module, step)(batch, 0)
    except _UNTRACEABLE:
        raise
    except (RuntimeError, TypeError, ValueError, IndexError, AssertionError) as err:
        raise ValueError(
            f"the example batch does not fit {type(module).__name__}.{step}: {str(err).splitlines()[0]}"
        ) from err


def _loss(module: nn.Module, batch: Any) -> torch.Tensor:
    output = call_step(module, "training_step", batch)
    loss = output["loss"] if isinstance(output, dict) else output
    if not isinstance(loss, torch.Tensor):
        raise ValueError(f"{type(module).__name__}.training_step must return a loss tensor to estimate a step")
    return loss


def _autocast(precision: str) -> contextlib.AbstractContextManager[Any]:
    if precision in ("bf16-mixed", "16-mixed"):
        dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float16
        return torch.autocast("cpu", dtype=dtype)
    return contextlib.nullcontext()
