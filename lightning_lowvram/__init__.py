"""lightning-lowvram: train and run models that are too big for your GPU, with Lightning."""

from lightning_lowvram.callbacks import (
    ActivationCheckpointingCallback,
    AutoMicroBatchCallback,
    ChunkedCrossEntropyCallback,
    DynamicQuantCallback,
    EightBitOptimizerCallback,
    LowBitBaseCallback,
    MemoryReportCallback,
    PruningCallback,
    WeightStreamingCallback,
)
from lightning_lowvram.compose import plan_callbacks
from lightning_lowvram.cores.batches import merge_outputs, split_batch
from lightning_lowvram.cores.chunked_cross_entropy import linear_cross_entropy
from lightning_lowvram.cores.chunked_cross_entropy_hf import apply_chunked_cross_entropy
from lightning_lowvram.cores.dynamic_quant import load_quantized
from lightning_lowvram.cores.fsdp2 import apply_fsdp2
from lightning_lowvram.cores.pruning import load_pruned
from lightning_lowvram.memory import (
    GPUProfile,
    MemoryMeter,
    MemoryStats,
    format_bytes,
    gpu_profile,
    is_oom_error,
    known_gpus,
    memory_budget,
)
from lightning_lowvram.planner import (
    EvalPlan,
    MemoryEstimate,
    Plan,
    estimate_eval_memory,
    estimate_step_memory,
    plan,
    plan_eval,
)
from lightning_lowvram.strategies import FSDP2Strategy

__version__ = "0.1.0"

__all__ = [
    "ActivationCheckpointingCallback",
    "AutoMicroBatchCallback",
    "ChunkedCrossEntropyCallback",
    "DynamicQuantCallback",
    "EightBitOptimizerCallback",
    "FSDP2Strategy",
    "GPUProfile",
    "LowBitBaseCallback",
    "MemoryEstimate",
    "MemoryMeter",
    "MemoryReportCallback",
    "Plan",
    "PruningCallback",
    "WeightStreamingCallback",
    "EvalPlan",
    "estimate_eval_memory",
    "plan_eval",
    "MemoryStats",
    "format_bytes",
    "apply_chunked_cross_entropy",
    "apply_fsdp2",
    "estimate_step_memory",
    "gpu_profile",
    "is_oom_error",
    "known_gpus",
    "linear_cross_entropy",
    "load_pruned",
    "load_quantized",
    "memory_budget",
    "merge_outputs",
    "plan",
    "plan_callbacks",
    "split_batch",
]
