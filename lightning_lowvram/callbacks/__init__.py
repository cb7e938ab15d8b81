"""Lightning callbacks: thin shells over the functional cores."""

from lightning_lowvram.callbacks.auto_micro_batch import AutoMicroBatchCallback
from lightning_lowvram.callbacks.memory_report import MemoryReportCallback

__all__ = ["AutoMicroBatchCallback", "MemoryReportCallback"]
