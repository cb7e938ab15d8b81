"""The built-in memory strategies, declared once each (:mod:`lightning_lowvram.registry`).

Each declaration names the callback, the dataclass of its arguments (the Hydra node under ``conf/callbacks`` and the
callback's signature are tested against it), its summary line, how it changes a step's estimate (``trace``: the
estimator's own flags, applied to the traced copy; ``model``: modelled on the traced bytes) and the values the
planner may try. The order is the plan label's and the callbacks' order.

The hooks import the cores when called, not here: this module is read by the planner itself.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from lightning_lowvram.registry import StepContext, Strategy, register

# -- the arguments of each callback (their defaults are the nodes' defaults) -----------------------------------------


@dataclasses.dataclass(frozen=True)
class MicroBatchConfig:
    """``AutoMicroBatchCallback``'s arguments (``slice_fn``: Python only)."""

    micro_batch_size: int | Literal["auto"] = "auto"
    eval_micro_batch_size: int | Literal["auto"] | None = "auto"
    min_micro_batch_size: int = 1
    count_fn: Literal["causal_lm_tokens", "label_tokens"] | None = None
    slice_fn: None = None


@dataclasses.dataclass(frozen=True)
class EightBitOptimizerConfig:
    """``EightBitOptimizerCallback`` takes no arguments."""


@dataclasses.dataclass(frozen=True)
class LowBitBaseConfig:
    """``LowBitBaseCallback``'s arguments."""

    bits: Literal[4, 8, 16] = 4


@dataclasses.dataclass(frozen=True)
class ActivationCheckpointingConfig:
    """``ActivationCheckpointingCallback``'s arguments."""

    blocks: list[str] | None = None
    offload: bool = False
    tile_mlp: bool = False


@dataclasses.dataclass(frozen=True)
class ChunkedCrossEntropyConfig:
    """``ChunkedCrossEntropyCallback``'s arguments."""

    chunk_size: int | None = None
    backend: Literal["auto", "chunked", "cce"] = "auto"


@dataclasses.dataclass(frozen=True)
class PruningConfig:
    """``PruningCallback``'s arguments (``schedule``: a callable in Python)."""

    amount: float = 0.5
    method: Literal["structured", "unstructured"] = "structured"
    criterion: Literal["magnitude", "random"] = "magnitude"
    schedule: Literal["once", "gradual"] = "gradual"
    start_step: int = 0
    end_step: int | None = None
    frequency: int | None = None
    scope: Literal["layer", "global"] = "layer"
    ignore: list[str] = dataclasses.field(default_factory=list)
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class DynamicQuantConfig:
    """``DynamicQuantCallback``'s arguments."""

    stages: list[Literal["validate", "test", "predict"]] = dataclasses.field(
        default_factory=lambda: ["test", "predict"]
    )
    compare: bool = True
    backend: Literal["auto", "measure", "torch_ao", "torchao_dynamic", "torchao_weight_only"] = "auto"
    save_path: str | None = None
    freeze_base: bool = False
    print_table: bool = True


@dataclasses.dataclass(frozen=True)
class WeightStreamingConfig:
    """``WeightStreamingCallback``'s arguments."""

    resident_blocks: int = 0
    blocks: list[str] | None = None
    stages: list[Literal["validate", "test", "predict"]] = dataclasses.field(
        default_factory=lambda: ["validate", "test", "predict"]
    )


@dataclasses.dataclass(frozen=True)
class MemoryReportConfig:
    """``MemoryReportCallback``'s arguments."""

    stages: list[Literal["fit", "validate", "test", "predict"]] = dataclasses.field(
        default_factory=lambda: ["fit", "validate", "test", "predict"]
    )
    print_table: bool = True
    steps: int | None = 3


@dataclasses.dataclass(frozen=True)
class FSDP2Config:
    """``FSDP2Strategy``'s arguments (the Trainer's strategy)."""

    reshard_after_forward: bool | None = None
    cpu_offload: bool = False
    data_parallel_size: int | Literal["auto"] = "auto"
    save_distributed_checkpoint: bool = True
    process_group_backend: str | None = None
    timeout_s: float = 1800.0


# -- how each changes the estimate, and what the planner tries -------------------------------------------------------


def _checkpointing_label(value: Any) -> str:
    parts = ["checkpointing"] + (["activations offloaded"] if value in ("offload", "tiled") else [])
    return ", ".join(parts + (["MLP tiled"] if value == "tiled" else []))


def _checkpointing_arguments(value: Any) -> dict[str, Any]:
    return {"offload": True} | ({"tile_mlp": True} if value == "tiled" else {}) if value in ("offload", "tiled") else {}


def _checkpointing_trace(value: Any) -> dict[str, Any]:
    return {"activation_checkpointing": True, "offload_activations": value in ("offload", "tiled"),
            "tiled_mlp": value == "tiled"}  # fmt: skip


def _adam_choices(ctx: StepContext) -> list[Any]:
    from lightning_lowvram.cores.optimizer_8bit import adam_optimizer

    if "adam" not in ctx.cache:
        ctx.cache["adam"] = adam_optimizer(ctx.module) is not None
    return [True] if ctx.unsharded and ctx.cache["adam"] else []


def _eight_bit_model(estimate: Any, value: Any, ctx: StepContext) -> Any:
    from lightning_lowvram.cores.optimizer_8bit import with_8bit_optimizer

    return with_8bit_optimizer(estimate, ctx.module, ctx.optimizer)


def _saving(ctx: StepContext, bits: int) -> dict[str, int]:
    """Bytes a ``bits``-bit frozen base takes off each phase's peak (``low_bit_base.low_bit_phases``), computed once."""
    key = ("low_bit_base", bits, ctx.chunked)
    if key not in ctx.cache:
        from lightning_lowvram.cores.low_bit_base import low_bit_phases

        ctx.cache[key] = low_bit_phases(ctx.module, bits, chunked_head=ctx.chunked)  # type: ignore[arg-type]
    return ctx.cache[key]


def _base_savings(ctx: StepContext) -> dict[int, dict[str, int]]:
    """Bits -> bytes a low-bit frozen base takes off each phase, for the bits the plan allows that save any."""
    allowed = [8] if ctx.options.get("allow_int8_base") else []
    allowed = [8, 4] if ctx.options.get("allow_low_bit_base") else allowed
    allowed += [16] if ctx.options.get("allow_bf16_base") and "bf16-mixed" in ctx.precisions else []
    savings = {bits: _saving(ctx, bits) for bits in allowed}
    return {bits: s for bits, s in savings.items() if s["optimizer"] > 0}


def _base_choices(ctx: StepContext) -> list[Any]:
    if not ctx.unsharded:
        return []
    # a bfloat16 base is exact under bf16 autocast only (LowBitBaseCallback refuses others)
    return [bits for bits in _base_savings(ctx) if bits != 16 or ctx.precision == "bf16-mixed"]


def _base_model(estimate: Any, value: Any, ctx: StepContext) -> Any:
    """An int8 / NF4 base modelled per phase: the saving less the dequantization running then; bf16 is traced."""
    if value == 16:
        return estimate
    off = _saving(ctx, value)
    by_phase = {p: v - off[p] for p, v in estimate.by_phase.items()}
    phase = max(by_phase, key=by_phase.__getitem__)
    saved = off["optimizer"]
    by_category = {**estimate.by_category, "parameters": estimate.by_category["parameters"] - saved}
    # the peak phase's categories, with its layer's dequantization as a temporary
    by_category["temporaries"] = by_category.get("temporaries", 0) + by_phase[phase] + saved - sum(
        estimate.by_category.values()
    )  # fmt: skip
    return dataclasses.replace(
        estimate, peak=by_phase[phase] + estimate.allowance, by_category=by_category, by_phase=by_phase
    )


def _base_label(value: Any) -> str:
    return {16: "bf16 frozen base", 8: "int8 frozen base", 4: "NF4 frozen base"}[value]


def _frozen_base(model: Any, callback: Any) -> None:
    from lightning_lowvram.cores.low_bit_base import require_frozen_base

    require_frozen_base(model, callback.bits)


def _causal_lm(model: Any, callback: Any) -> None:
    from lightning_lowvram.cores.chunked_cross_entropy_hf import require_chunkable

    require_chunkable(model)


def _streamable(model: Any, callback: Any) -> None:
    from lightning_lowvram.cores.streaming import check_streamable

    check_streamable(model, callback.resident_blocks, callback.blocks)


def _fsdp2_arguments(value: Any) -> dict[str, Any]:
    sharding, offload = value
    return {"reshard_after_forward": sharding == "full", "cpu_offload": offload != "none"}


def _fsdp2_overrides(value: Any) -> list[str]:
    sharding, offload = value
    out = [f"strategy={'fsdp2_offload' if offload != 'none' else 'fsdp2'}"]
    return out + ([] if sharding == "full" else ["strategy.trainer_strategy.reshard_after_forward=false"])


MICRO_BATCH = register(Strategy(
    name="micro_batch", node="lowvram_auto_micro_batch",
    target="lightning_lowvram.callbacks.auto_micro_batch.AutoMicroBatchCallback", config=MicroBatchConfig,
    summary="split each batch into the largest micro-batches that fit and accumulate: the effective batch is kept",
    off=None, axis=True, changes=lambda value: 0, arguments=lambda value: {"micro_batch_size": value},
))  # fmt: skip
OPTIMIZER_8BIT = register(Strategy(
    name="optimizer_8bit", target="lightning_lowvram.callbacks.optimizer_8bit.EightBitOptimizerCallback",
    config=EightBitOptimizerConfig,
    summary="Adam/AdamW moments in 8 bits (torchao): optimizer state 0.51x of the parameters instead of 2.0x",
    choices=_adam_choices, model=_eight_bit_model, label=lambda value: "8-bit optimizer",
))  # fmt: skip
LOW_BIT_BASE = register(Strategy(
    name="low_bit_base", target="lightning_lowvram.callbacks.low_bit_base.LowBitBaseCallback", config=LowBitBaseConfig,
    summary="frozen Linear weights in 4 (NF4), 8 or 16 bits under trainable adapters: QLoRA-style fine-tuning",
    off=0, choices=_base_choices, trace=lambda value: {"bf16_base": value == 16}, model=_base_model,
    label=_base_label, changes=lambda value: 1 if value == 16 else 2,  # changed numerics (int8, NF4) count twice
    arguments=lambda value: {"bits": value},
    plan_options={"allow_int8_base": False, "allow_low_bit_base": False, "allow_bf16_base": True},
    requires=_frozen_base,
))  # fmt: skip
ACTIVATION_CHECKPOINTING = register(Strategy(
    name="activation_checkpointing",
    target="lightning_lowvram.callbacks.activation_checkpointing.ActivationCheckpointingCallback",
    config=ActivationCheckpointingConfig,
    summary="recompute repeated blocks' activations in backward; optionally their inputs in host memory, MLPs tiled",
    axis=True, trace=_checkpointing_trace, label=_checkpointing_label,
    changes=lambda value: {True: 1, "offload": 2, "tiled": 3}[value], arguments=_checkpointing_arguments,
))  # fmt: skip
CHUNKED_CROSS_ENTROPY = register(Strategy(
    name="chunked_cross_entropy",
    target="lightning_lowvram.callbacks.chunked_cross_entropy.ChunkedCrossEntropyCallback",
    config=ChunkedCrossEntropyConfig,
    summary="a Hugging Face causal LM's head and cross-entropy in chunks: the [tokens, vocab] logits never exist whole",
    axis=True, trace=lambda value: {"chunked_cross_entropy": True}, label=lambda value: "chunked CE",
    requires=_causal_lm,
))  # fmt: skip
FSDP2 = register(Strategy(
    name="fsdp2", node="fsdp2", kind="trainer_strategy", target="lightning_lowvram.strategies.fsdp2.FSDP2Strategy",
    config=FSDP2Config, summary="parameters, gradients and optimizer state sharded over the ranks (FSDP2) or offloaded",
    off=("none", "none"), axis=True, arguments=_fsdp2_arguments, overrides=_fsdp2_overrides,
    changes=lambda value: (value[0] != "none") + (value[1] != "none"),
))  # fmt: skip
PRUNING = register(Strategy(
    name="pruning", target="lightning_lowvram.callbacks.pruning.PruningCallback", config=PruningConfig,
    summary="prune while training: structured removes neurons/channels/head dims, unstructured masks weights",
))  # fmt: skip
DYNAMIC_QUANT = register(Strategy(
    name="dynamic_quant", target="lightning_lowvram.callbacks.dynamic_quant.DynamicQuantCallback",
    config=DynamicQuantConfig, summary="int8 Linear layers for evaluation stages, compared with the float model",
))  # fmt: skip
WEIGHT_STREAMING = register(Strategy(
    name="weight_streaming", target="lightning_lowvram.callbacks.weight_streaming.WeightStreamingCallback",
    config=WeightStreamingConfig,
    summary="evaluation: repeated blocks' weights in host memory, each brought to the card for its forward",
    label=lambda value: f"streamed, {value} blocks resident", arguments=lambda value: {"resident_blocks": value},
    requires=_streamable,
))  # fmt: skip
MEMORY_REPORT = register(Strategy(
    name="memory_report", target="lightning_lowvram.callbacks.memory_report.MemoryReportCallback",
    config=MemoryReportConfig, summary="peak memory per stage and category, to the loggers and printed as a table",
))  # fmt: skip
