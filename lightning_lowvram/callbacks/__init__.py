"""Lightning callbacks: thin shells over the functional cores."""

from lightning_lowvram.callbacks.activation_checkpointing import ActivationCheckpointingCallback
from lightning_lowvram.callbacks.auto_micro_batch import AutoMicroBatchCallback
from lightning_lowvram.callbacks.chunked_cross_entropy import ChunkedCrossEntropyCallback
from lightning_lowvram.callbacks.dynamic_quant import DynamicQuantCallback
from lightning_lowvram.callbacks.low_bit_base import LowBitBaseCallback
from lightning_lowvram.callbacks.memory_report import MemoryReportCallback
from lightning_lowvram.callbacks.optimizer_8bit import EightBitOptimizerCallback
from lightning_lowvram.callbacks.pruning import PruningCallback
from lightning_lowvram.callbacks.weight_streaming import WeightStreamingCallback

__all__ = [
    "ActivationCheckpointingCallback",
    "AutoMicroBatchCallback",
    "ChunkedCrossEntropyCallback",
    "DynamicQuantCallback",
    "EightBitOptimizerCallback",
    "LowBitBaseCallback",
    "MemoryReportCallback",
    "PruningCallback",
    "WeightStreamingCallback",
]
