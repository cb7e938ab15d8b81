"""Lightning callbacks: thin shells over the functional cores."""

from lightning_lowvram.callbacks.memory_report import MemoryReportCallback

__all__ = ["MemoryReportCallback"]
