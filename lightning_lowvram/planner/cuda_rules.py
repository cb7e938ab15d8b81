"""What a CUDA training step allocates that a CPU trace of the same step does not.

The planner traces a step on fake *CPU* tensors (fake CUDA tensors with autograd abort the process on a CPU build),
then applies these rules so the trace allocates what the card would:

- **Allocator rounding:** every block is a multiple of 512 bytes (``cuda_rounding``).
- **Dropout:** CUDA runs ``native_dropout``, which keeps a bool mask for backward; the CPU kernel keeps one in the
  input's dtype (``CudaKernels``).
- **Fused attention:** ``F.scaled_dot_product_attention`` runs the kernel PyTorch's CUDA dispatcher would choose for
  the card (``sdpa_backend``: cuDNN, flash, memory-efficient or math, by compute capability, dtype, head size, mask,
  dropout and causality), through the same aten ops, so autograd saves what CUDA saves: the output and the
  log-sum-exp, not the L x L matrix (the CPU picks its own kernels: the math path, with the L x L matrix, whenever
  attention dropout is on). Autocast casts the inputs as CUDA autocast would (``CudaKernels``).
- **Autocast's float32 ops:** the ops CUDA autocast runs in float32 (``CUDA_AUTOCAST_FP32``: its ``AT_FORALL_FP32``
  and ``AT_FORALL_FP32_SET_OPT_DTYPE`` lists, e.g. ``pow``, ``exp``, ``softmax``, ``layer_norm``, ``sum``, the
  losses) get float32 inputs; CPU autocast would keep a bf16/fp16 input's dtype. Its lower-precision list matches the
  CPU's for the ops models use (matmuls, convolutions, linear, attention); its promote list follows from type
  promotion.
- **Kernel workspaces** the meta kernels do not allocate: flash backward's float32 ``dq`` accumulator and
  ``softmax_d``, memory-efficient backward's ``delta`` (``KernelWorkspaces``). Other workspaces (cuDNN's, the
  memory-efficient backward's gradient accumulators, split-KV forward buffers) are not modelled, and grouped-query
  attention is traced on the math path (an over-estimate).

The rules follow PyTorch's ``sdp_utils.cpp`` and ``flash_api.cpp`` as read, not measured: no GPU was available to
validate them (``benchmarks/gpu_validate_estimate.py`` does that where one is).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only

SDPABackend = Literal["cudnn", "flash", "efficient", "math"]
DEFAULT_CAPABILITY = (8, 0)  # an A100 when no card is named
_HALF = (torch.float16, torch.bfloat16)
_aten = torch.ops.aten


def _last_stride_one(*tensors: torch.Tensor) -> bool:
    return all(t.stride(-1) == 1 or t.shape[-1] == 1 for t in tensors)


def _gemm_alignment(dtype: torch.dtype, major: int) -> int:
    """Elements the memory-efficient kernel's GEMMs need the head size (and storage offsets) aligned to."""
    half = dtype in _HALF
    tensor_cores = major >= 8 or (major >= 7 and half)
    alignment = 4 if major >= 8 else 1
    return max(alignment, 128 // (16 if half else 32)) if tensor_cores else alignment


def sdpa_backend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    enable_gqa: bool = False,
    compute_capability: tuple[int, int] = DEFAULT_CAPABILITY,
) -> SDPABackend:
    """The attention kernel CUDA's ``scaled_dot_product_attention`` picks for these inputs on a card.

    Follows PyTorch's priority (cuDNN first on sm90/sm100, then flash, memory-efficient, math) and each kernel's
    constraints for dense inputs.

    Example:
        >>> q = torch.zeros(2, 12, 1024, 64, dtype=torch.bfloat16)
        >>> sdpa_backend(q, q, q, is_causal=True, compute_capability=(8, 6))
        'flash'
        >>> sdpa_backend(q.float(), q.float(), q.float(), is_causal=True, compute_capability=(8, 6))
        'efficient'

    """
    if not query.dim() == key.dim() == value.dim() == 4:  # the fused kernels take (batch, heads, seq, head) only
        return "math"
    major, minor = compute_capability
    sm = major * 10 + minor
    dtype, d_qk, d_v = query.dtype, query.shape[-1], value.shape[-1]
    l_q, l_k = query.shape[-2], key.shape[-2]
    same_heads = query.shape[-3] == key.shape[-3] == value.shape[-3]
    if not same_heads and not enable_gqa:
        return "math"
    low_precision = dtype == torch.float16 or (dtype == torch.bfloat16 and major >= 8)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    strides = _last_stride_one(query, key, value)

    cudnn_card = (major == 9 and minor == 0) or major == 10
    if (
        cudnn_card
        and low_precision
        and d_qk <= 128
        and d_v <= 128
        and d_qk % 8 == 0
        and d_v % 8 == 0
        and dropout_p * 16 == math.floor(dropout_p * 16)
        and l_k != 1
        and strides
    ):
        return "cudnn"

    flash_head = d_qk == key.shape[-1] == d_v and d_qk <= 256
    if needs_grad and (86 <= sm <= 89 or 120 <= sm <= 121):  # flash's backward limits on these cards
        flash_head = flash_head and (d_qk <= 192 or (dropout_p == 0 and d_qk > 224))
    if (
        80 <= sm <= 121
        and low_precision
        and attn_mask is None
        and flash_head
        and not (is_causal and l_q != l_k)
        and strides
    ):
        return "flash"

    alignment = _gemm_alignment(dtype, major)
    efficient_dtypes = (torch.float16, torch.float32, torch.bfloat16) if major >= 8 else (torch.float16, torch.float32)
    aligned = d_qk == key.shape[-1] and d_qk % alignment == 0 and d_v % alignment == 0
    if major >= 8:  # storage offsets too (q, k, v are often views into one projection)
        aligned = aligned and all(t.storage_offset() % alignment == 0 for t in (query, key, value))
    if sm >= 50 and aligned and dtype in efficient_dtypes and all(t.stride(-1) == 1 for t in (query, key, value)):
        return "efficient"
    return "math"


def cuda_sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    compute_capability: tuple[int, int] = DEFAULT_CAPABILITY,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` through the aten op CUDA would run (its meta kernel gives CUDA's shapes)."""
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
    if dtype is not None:  # CUDA autocast runs attention in the low precision
        query, key, value = (t.to(dtype) if t.is_floating_point() else t for t in (query, key, value))
        if attn_mask is not None and attn_mask.is_floating_point():
            attn_mask = attn_mask.to(dtype)
    backend = sdpa_backend(
        query,
        key,
        value,
        attn_mask=attn_mask,
        dropout_p=dropout_p,
        is_causal=is_causal,
        enable_gqa=enable_gqa,
        compute_capability=compute_capability,
    )
    # grouped-query attention is traced on the math path (an over-estimate: CUDA's fused kernels support it)
    if backend == "math" or (enable_gqa and query.shape[-3] != key.shape[-3]):
        with torch.autocast("cpu", enabled=False):
            return _aten._scaled_dot_product_attention_math(
                query, key, value, attn_mask, dropout_p, is_causal, None, scale=scale, enable_gqa=enable_gqa
            )[0]
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    if backend == "flash":
        head = query.shape[-1]
        pad = -head % 8  # flash pads the head size to a multiple of 8 (copies of q, k, v)
        if pad:
            query, key, value = (F.pad(t, (0, pad)) for t in (query, key, value))
        out = _aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal, False, scale=scale)[0]
        return out[..., :head] if pad else out
    mask = _additive_mask(attn_mask, query, key) if attn_mask is not None else None
    if backend == "cudnn":
        return _aten._scaled_dot_product_cudnn_attention(
            query, key, value, mask, needs_grad, dropout_p, is_causal, False, scale=scale
        )[0]
    return _aten._scaled_dot_product_efficient_attention(
        query, key, value, mask, needs_grad, dropout_p, is_causal, scale=scale
    )[0]


def _additive_mask(mask: torch.Tensor, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """The mask as CUDA's dispatcher hands it to a fused kernel: additive, expanded, last dim padded to 16."""
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=query.dtype, device=mask.device).masked_fill_(~mask, -math.inf)
    shape = (*query.shape[:-1], key.shape[-2])
    mask = mask.expand(shape)
    pad = -shape[-1] % 16
    return F.pad(mask, (0, pad))[..., : shape[-1]] if pad else mask


class CudaKernels(torch.overrides.TorchFunctionMode):
    """Run dropout and attention as CUDA would on ``compute_capability`` (see the module docstring).

    A mode is off while it handles a call, ``loss.backward()`` included, so forwards that activation checkpointing
    recomputes during backward would miss these rules: the planner runs backward on the autograd engine directly.

    Args:
        compute_capability: The card's ``(major, minor)``; default: an A100's.
        attention: Emulate the fused attention kernels (needs fake tensors: CUDA's aten ops have no CPU kernel).

    """

    def __init__(self, compute_capability: tuple[int, int] | None = None, attention: bool = True) -> None:
        super().__init__()
        self.compute_capability = tuple(compute_capability or DEFAULT_CAPABILITY)
        self.attention = attention

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is F.dropout:
            params = dict(zip(("input", "p", "training", "inplace"), args, strict=False)) | kwargs
            if params.get("training", True) and params.get("p", 0.5) > 0:
                return torch.native_dropout(params["input"], params.get("p", 0.5), True)[0]
        if func is F.scaled_dot_product_attention and self.attention:
            return cuda_sdpa(*args, **kwargs, compute_capability=self.compute_capability)
        if torch.is_autocast_enabled("cpu") and _cuda_runs_in_float32(func, kwargs):
            args, kwargs = tree_map_only(torch.Tensor, _to_float32, (args, kwargs))
        return func(*args, **kwargs)


# CUDA autocast's float32 policy, from PyTorch's aten/src/ATen/autocast_mode.h (AT_FORALL_FP32 and
# AT_FORALL_FP32_SET_OPT_DTYPE, the lists AutocastCUDA registers): these ops run in float32 whatever the input's dtype.
# CPU autocast's lists differ (e.g. pow, exp, softmax, layer_norm, sum keep a bf16 input's dtype there), so during a
# mixed-precision trace under CUDA rules their Python entry points get float32 inputs, as CUDA would give them.
CUDA_AUTOCAST_FP32 = frozenset({
    # AT_FORALL_FP32
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt", "sinh",
    "tan", "pow", "softplus", "layer_norm", "native_layer_norm", "group_norm", "frobenius_norm", "nuclear_norm",
    "cosine_similarity", "poisson_nll_loss", "cosine_embedding_loss", "nll_loss", "nll_loss2d",
    "hinge_embedding_loss", "kl_div", "l1_loss", "smooth_l1_loss", "huber_loss", "mse_loss", "margin_ranking_loss",
    "multilabel_margin_loss", "soft_margin_loss", "triplet_margin_loss", "multi_margin_loss",
    "binary_cross_entropy_with_logits", "dist", "pdist", "cdist", "renorm", "logsumexp",
    # AT_FORALL_FP32_SET_OPT_DTYPE (computed and returned in float32 when no dtype is asked for)
    "prod", "softmax", "log_softmax", "cumprod", "cumsum", "linalg_vector_norm", "linalg_matrix_norm", "sum",
    # Python-level entry points whose aten ops are on the lists above: cross_entropy is log_softmax + nll_loss
    "__pow__", "__rpow__", "cross_entropy", "norm",
})  # fmt: skip
_SET_OPT_DTYPE = frozenset({"prod", "softmax", "log_softmax", "cumprod", "cumsum", "sum", "linalg_vector_norm"})


def _cuda_runs_in_float32(func: Any, kwargs: dict[str, Any]) -> bool:
    name = getattr(func, "__name__", "")
    if name not in CUDA_AUTOCAST_FP32:
        return False
    return not (name in _SET_OPT_DTYPE and kwargs.get("dtype") is not None)  # an explicit dtype is kept


def _to_float32(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in _HALF else t


def _round(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class KernelWorkspaces(TorchDispatchMode):
    """Allocate, for the duration of an attention backward kernel, the buffers CUDA's kernel allocates inside.

    Enter it inside the meter, so the meter sees these allocations.
    """

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        workspaces = []
        if func is _aten._scaled_dot_product_flash_attention_backward.default:
            query = args[1]  # (batch, heads, seq, head) as the op sees it
            b, h, l_q, d = query.shape
            l_r = _round(l_q, 128)
            d_r = _round(d, 32 if d <= 128 else 64)
            f32 = {"dtype": torch.float32, "device": query.device}
            workspaces = [torch.empty(b, h, l_r, **f32), torch.empty(b, l_r, h, d_r, **f32)]  # softmax_d, dq_accum
        elif func is _aten._scaled_dot_product_efficient_attention_backward.default:
            query = args[1]
            workspaces = [torch.empty(*query.shape[:-1], dtype=torch.float32, device=query.device)]  # delta
        out = func(*args, **kwargs)
        del workspaces
        return out


@contextlib.contextmanager
def cuda_rounding(enabled: bool = True) -> Iterator[None]:
    """Count every storage as the CUDA caching allocator would: rounded up to 512 bytes."""
    if not enabled:
        yield
        return
    from unittest import mock

    from torch.distributed._tools import mem_tracker

    def rounded(self: Any) -> int:
        return _round(self.size * self.element_size, mem_tracker._PYTORCH_MIN_ALLOCATE)

    with mock.patch.object(mem_tracker._WeakRefInfo, "_calculate_mem_consumed", rounded):
        yield
