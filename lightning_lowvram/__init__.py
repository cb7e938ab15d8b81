"""lightning-lowvram: train and run models that are too big for your GPU, with Lightning."""

from lightning_lowvram.batching import merge_outputs, split_batch
from lightning_lowvram.callbacks import (
    ActivationCheckpointingCallback,
    AutoMicroBatchCallback,
    ChunkedCrossEntropyCallback,
    DynamicQuantCallback,
    EightBitOptimizerCallback,
    LowBitBaseCallback,
    MemoryReportCallback,
    PruningCallback,
    plan_callbacks,
)
from lightning_lowvram.chunked_ce import linear_cross_entropy
from lightning_lowvram.chunked_ce_hf import apply_chunked_cross_entropy
from lightning_lowvram.fsdp2 import FSDP2Strategy, apply_fsdp2
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
from lightning_lowvram.planner import MemoryEstimate, Plan, estimate_step_memory, plan
from lightning_lowvram.pruning import load_pruned
from lightning_lowvram.quantization import load_quantized

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
