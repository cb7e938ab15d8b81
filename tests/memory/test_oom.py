import pytest
import torch

from lightning_lowvram import is_oom_error

CASES = [
    (torch.OutOfMemoryError("anything"), True),
    (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 11.76 GiB total capacity)"), True),
    (RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported"), True),
    (RuntimeError("HIP out of memory. Tried to allocate 20.00 MiB"), True),
    (RuntimeError("MPS backend out of memory (MPS allocated: 8.00 GB, other allocations: 1.00 GB)"), True),
    (RuntimeError("XPU out of memory. Tried to allocate 1.00 GiB"), True),
    (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"), True),
    (
        RuntimeError(
            "cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you passed in a non-contiguous input."
        ),
        True,
    ),
    (
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to allocate 1"
        ),
        True,
    ),
    (RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 1"), True),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 4x5)"), False),
    (RuntimeError("CUDA error: device-side assert triggered"), False),
    (ValueError("CUDA out of memory"), False),
    (MemoryError(), False),
    (KeyboardInterrupt(), False),
]


@pytest.mark.parametrize(("exc", "expected"), CASES, ids=[f"{type(e).__name__}-{i}" for i, (e, _) in enumerate(CASES)])
def test_is_oom_error(exc, expected):
    assert is_oom_error(exc) is expected


def test_the_budget_error_is_detected():
    from lightning_lowvram import memory_budget

    with memory_budget(10, device="cpu"):
        try:
            torch.zeros(100)
        except RuntimeError as err:
            assert is_oom_error(err)
        else:
            pytest.fail("no OOM raised")
