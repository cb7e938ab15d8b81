"""Lightning callbacks: thin shells over the functional cores."""

from lightning_lowvram.callbacks.activation_checkpointing import ActivationCheckpointingCallback
from lightning_lowvram.callbacks.auto_micro_batch import AutoMicroBatchCallback
from lightning_lowvram.callbacks.dynamic_quant import DynamicQuantCallback, load_quantized
from lightning_lowvram.callbacks.memory_report import MemoryReportCallback
from lightning_lowvram.callbacks.optimizer_8bit import EightBitOptimizerCallback
from lightning_lowvram.callbacks.pruning import PruningCallback, load_pruned

__all__ = [
    "ActivationCheckpointingCallback",
    "AutoMicroBatchCallback",
    "DynamicQuantCallback",
    "EightBitOptimizerCallback",
    "MemoryReportCallback",
    "load_quantized",
    "PruningCallback",
    "load_pruned",
]
