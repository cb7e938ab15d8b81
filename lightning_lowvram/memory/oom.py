"""Is this exception an out-of-memory error? One table, every backend."""

from __future__ import annotations

import torch

#: Substrings of error messages that mean "out of memory" on backends that do not raise ``torch.OutOfMemoryError``.
OOM_MESSAGES: tuple[str, ...] = (
    "CUDA out of memory",
    "CUDA error: out of memory",
    "HIP out of memory",
    "HIP error: out of memory",
    "MPS backend out of memory",
    "XPU out of memory",
    "XPU error: out of memory",
    "CUBLAS_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_ALLOC_FAILED",
    # cuDNN reports some allocation failures as "not supported" (pytorch/pytorch#4107)
    "cuDNN error: CUDNN_STATUS_NOT_SUPPORTED",
    "CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you passed in a non-contiguous input",
    "DefaultCPUAllocator: can't allocate memory",
    "DefaultCPUAllocator: not enough memory",
)


def is_oom_error(exc: BaseException) -> bool:
    """Whether ``exc`` reports an out-of-memory condition.

    ``torch.OutOfMemoryError`` first; then a ``RuntimeError`` whose message matches :data:`OOM_MESSAGES`. Anything
    else (including a ``MemoryError`` from Python objects) is not a device OOM.

    Example:
        >>> is_oom_error(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
        True
        >>> is_oom_error(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
        False

    """
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    message = str(exc)
    return any(pattern in message for pattern in OOM_MESSAGES)
