"""Measure memory, emulate a smaller device, recognise OOM errors, describe GPUs."""

from lightning_lowvram.memory.budget import active_budget, memory_budget
from lightning_lowvram.memory.meter import MemoryMeter, MemoryStats, memory_table
from lightning_lowvram.memory.oom import is_oom_error
from lightning_lowvram.memory.profiles import GPUProfile, detect_gpu, format_bytes, gpu_profile, known_gpus
from lightning_lowvram.memory.tracker import host_memory

__all__ = [
    "GPUProfile",
    "MemoryMeter",
    "MemoryStats",
    "active_budget",
    "detect_gpu",
    "format_bytes",
    "gpu_profile",
    "host_memory",
    "is_oom_error",
    "known_gpus",
    "memory_budget",
    "memory_table",
]
