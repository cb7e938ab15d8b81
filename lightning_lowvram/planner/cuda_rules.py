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
  attention dropout is on).
- **Autocast:** mixed precision follows CUDA autocast's policy op by op (``CUDA_AUTOCAST_POLICY``: the
  lower-precision, float32, float32-output-dtype and promote lists PyTorch registers for CUDA, the same for bf16 and
  fp16), applied by kernels at CPU autocast's place in the dispatcher while ``cuda_autocast_policy`` is active; CPU
  autocast's own lists differ (it keeps ``pow``, ``exp``, ``softmax``, ``layer_norm``, ``sum`` in bf16).
- **Kernel workspaces** the meta kernels do not allocate (``KernelWorkspaces``): flash backward's float32 ``dq``
  accumulator and ``softmax_d``, memory-efficient backward's ``delta``; cuBLAS's workspace, one per handle (the
  forward's and the backward's thread), kept from the first GEMM (``cublas_workspace_bytes``); a cuDNN workspace while
  each convolution runs (``CUDNN_WORKSPACE_CAP``; calibrated, see there). Grouped-query attention
  (``enable_gqa``, HF's attention without a mask) runs on flash and cuDNN with the key/value heads as they are, and
  flash's backward holds ``dk``/``dv`` for every query head (``flash_api.cpp``, ``mha_bwd``); the memory-efficient
  kernel refuses it, so PyTorch runs the math path there (keys repeated, the L x L matrix). Not modelled: the
  memory-efficient backward's gradient accumulators, split-KV forward buffers.

The attention rules follow PyTorch's ``sdp_utils.cpp`` and ``flash_api.cpp`` as read. Against the one GPU
measurement there is (an H200, issue 12) the estimates are -0.8 % to +1.7 % (``benchmarks/estimate_vs_h200.py``);
``benchmarks/gpu_validate_estimate.py`` checks more models where a GPU is lent.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import re
import warnings
import weakref
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map_only

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
    x = _Attention(query, key, value, attn_mask, dropout_p, is_causal, compute_capability)
    if not x.same_heads and not enable_gqa:
        return "math"
    return next((name for name, takes in _KERNELS if takes(x)), "math")


@dataclasses.dataclass(frozen=True)
class _Attention:
    """What the kernel rules read of one attention call."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    mask: torch.Tensor | None
    dropout_p: float
    is_causal: bool
    capability: tuple[int, int]

    @property
    def sm(self) -> int:
        return self.capability[0] * 10 + self.capability[1]

    @property
    def same_heads(self) -> bool:
        return self.query.shape[-3] == self.key.shape[-3] == self.value.shape[-3]

    @property
    def low_precision(self) -> bool:
        dtype = self.query.dtype
        return dtype == torch.float16 or (dtype == torch.bfloat16 and self.capability[0] >= 8)

    @property
    def heads(self) -> tuple[int, int, int]:
        """Head sizes of query, key and value."""
        return self.query.shape[-1], self.key.shape[-1], self.value.shape[-1]

    @property
    def strides(self) -> bool:
        return _last_stride_one(self.query, self.key, self.value)


def _cudnn(x: _Attention) -> bool:
    """The cuDNN kernel (first on sm90 / sm100): half precision, heads <= 128 and multiples of 8, dropout in 16ths."""
    d_qk, _, d_v = x.heads
    major, minor = x.capability
    return all([
        (major, minor) == (9, 0) or major == 10, x.low_precision, d_qk <= 128, d_v <= 128, d_qk % 8 == 0,
        d_v % 8 == 0, x.dropout_p * 16 == math.floor(x.dropout_p * 16), x.key.shape[-2] != 1, x.strides,
    ])  # fmt: skip


def _flash(x: _Attention) -> bool:
    """Flash (sm80-sm121): half precision, no mask, equal head sizes <= 256 (less for backward on some cards)."""
    d_qk, d_k, d_v = x.heads
    head = d_qk == d_k == d_v and d_qk <= 256
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x.query, x.key, x.value))
    if needs_grad and (86 <= x.sm <= 89 or 120 <= x.sm <= 121):  # flash's backward limits on these cards
        head = head and (d_qk <= 192 or (x.dropout_p == 0 and d_qk > 224))
    causal_square = not (x.is_causal and x.query.shape[-2] != x.key.shape[-2])
    return all([80 <= x.sm <= 121, x.low_precision, x.mask is None, head, causal_square, x.strides])


def _efficient(x: _Attention) -> bool:
    """Memory-efficient (sm50+): aligned head sizes and offsets, no grouped-query inputs.

    It takes no grouped-query inputs (``check_batch_size_and_num_heads_dense<false>``): GQA that neither cuDNN nor
    flash takes runs on the math path, which repeats the key/value heads.
    """
    d_qk, d_k, d_v = x.heads
    major = x.capability[0]
    dtype = x.query.dtype
    alignment = _gemm_alignment(dtype, major)
    dtypes = (torch.float16, torch.float32, torch.bfloat16) if major >= 8 else (torch.float16, torch.float32)
    aligned = d_qk == d_k and d_qk % alignment == 0 and d_v % alignment == 0
    if major >= 8:  # storage offsets too (q, k, v are often views into one projection)
        aligned = aligned and all(t.storage_offset() % alignment == 0 for t in (x.query, x.key, x.value))
    dense = x.same_heads and all(t.stride(-1) == 1 for t in (x.query, x.key, x.value))
    return all([x.sm >= 50, aligned, dtype in dtypes, dense])


# PyTorch's priority for dense inputs (sdp_utils.cpp): the first kernel whose constraints hold runs, else math
_KERNELS: tuple[tuple[SDPABackend, Callable[[_Attention], bool]], ...] = (
    ("cudnn", _cudnn),
    ("flash", _flash),
    ("efficient", _efficient),
)


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
    # flash and cuDNN take grouped-query inputs as they are (their meta kernels give the key/value heads' shapes)
    if backend == "math":
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
        return func(*args, **kwargs)


# CUDA autocast's policy, op by op, as PyTorch defines it for CUDA: the macros AT_FORALL_LOWER_PRECISION_FP,
# AT_FORALL_FP32, AT_FORALL_FP32_SET_OPT_DTYPE, AT_FORALL_DIFFERENT_REDISPATCH_SIGNATURE and AT_FORALL_PROMOTE of
# aten/src/ATen/autocast_mode.h, which autocast_mode.cpp registers for the AutocastCUDA key (torch 2.13's header,
# shipped in the wheel as torch/include/ATen/autocast_mode.h; tests/planner/test_cuda_rules.py compares this table with
# the installed header). The same lists serve bf16 and fp16: "lower_precision_fp" casts to the autocast dtype.
# An entry without an overload is the op's default overload, as in the header.
CUDA_AUTOCAST_POLICY: dict[str, tuple[str, ...]] = {
    "lower_precision_fp": (
        "_convolution.deprecated", "_convolution", "conv1d", "conv2d", "conv3d", "conv_tbc", "conv_transpose1d",
        "conv_transpose2d.input", "conv_transpose3d.input", "convolution", "prelu", "addmm", "addmv", "addr", "matmul",
        "einsum", "mm", "mv", "linalg_vecdot", "linear", "addbmm", "baddbmm", "bmm", "chain_matmul", "linalg_multi_dot",
        "_thnn_fused_lstm_cell", "_thnn_fused_gru_cell", "lstm_cell", "gru_cell", "rnn_tanh_cell", "rnn_relu_cell",
        "_scaled_dot_product_flash_attention", "scaled_dot_product_attention",
    ),
    "fp32": (
        "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt",
        "sinh", "tan", "pow.Tensor_Scalar", "pow.Tensor_Tensor", "pow.Scalar", "softplus", "layer_norm",
        "native_layer_norm", "rms_norm", "group_norm", "frobenius_norm.dim", "nuclear_norm", "nuclear_norm.dim",
        "cosine_similarity", "poisson_nll_loss", "cosine_embedding_loss", "nll_loss", "nll_loss2d",
        "hinge_embedding_loss", "kl_div", "l1_loss", "smooth_l1_loss", "huber_loss", "mse_loss", "margin_ranking_loss",
        "multilabel_margin_loss", "soft_margin_loss", "triplet_margin_loss", "multi_margin_loss",
        "binary_cross_entropy_with_logits", "dist", "pdist", "cdist", "renorm", "logsumexp", "upsample_nearest1d",
        "_upsample_nearest_exact1d", "upsample_nearest2d", "_upsample_nearest_exact2d", "upsample_nearest3d",
        "_upsample_nearest_exact3d", "upsample_linear1d", "upsample_bilinear2d", "_upsample_bilinear2d_aa",
        "upsample_trilinear3d", "upsample_bicubic2d", "_upsample_bicubic2d_aa",
    ),
    "fp32_set_opt_dtype": (
        "prod", "prod.dim_int", "softmax.int", "log_softmax.int", "cumprod", "cumsum", "linalg_vector_norm",
        "linalg_matrix_norm", "linalg_matrix_norm.str_ord", "sum", "sum.dim_IntList",
    ),
    "fp32_append_dtype": ("norm.Scalar", "norm.ScalarOpt_dim"),
    "promote": (
        "addcdiv", "addcmul", "atan2", "bilinear", "cross", "dot", "vdot", "grid_sampler", "index_put", "tensordot",
        "scatter_add",
    ),
}  # fmt: skip
# norm's fp32_append_dtype redispatch to the overload taking an output dtype (AT_FORALL_DIFFERENT_REDISPATCH_SIGNATURE)
_APPEND_DTYPE = {"norm.Scalar": "norm.ScalarOpt_dtype", "norm.ScalarOpt_dim": "norm.ScalarOpt_dim_dtype"}
_AUTOCAST_CPU = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)


def _overload(name: str) -> Any:
    op, _, overload = name.partition(".")
    return getattr(getattr(torch.ops.aten, op), overload or "default")


@functools.cache
def _cpu_autocast_ops() -> tuple[str, ...]:
    """The aten ops CPU autocast registers a kernel for (its own lists, which differ from CUDA's)."""
    names = torch._C._dispatch_get_all_op_names()
    return tuple(
        name.removeprefix("aten::")
        for name in names
        if name.startswith("aten::") and torch._C._dispatch_has_kernel_for_dispatch_key(name, "AutocastCPU")
    )


def _eligible(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64


class _CudaAutocast:
    """The kernels that make CPU autocast cast as CUDA autocast would (``cuda_autocast_policy``)."""

    def __init__(self) -> None:
        self.cache: dict[int, tuple[weakref.ref[torch.Tensor], torch.Tensor]] = {}

    def cast(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``cached_cast``: the lower-precision copy of a float32 leaf weight is kept until autocast exits."""
        if not _eligible(t) or t.dtype == dtype:
            return t
        cacheable = (
            dtype == torch.get_autocast_dtype("cpu")
            and t.dtype == torch.float32
            and t.requires_grad
            and t.is_leaf
            and not t._is_view()
            and torch.is_autocast_cache_enabled()
        )
        if cacheable and id(t) in self.cache and self.cache[id(t)][0]() is t:
            return self.cache[id(t)][1]
        out = t.to(dtype)
        if cacheable:
            self.cache[id(t)] = (weakref.ref(t), out)
        return out

    def kernel(self, name: str, policy: str) -> Callable[..., Any]:
        op = _overload(name)
        dtype_at = next((i for i, arg in enumerate(op._schema.arguments) if arg.name == "dtype"), None)

        def cast_all(dtype: torch.dtype, args: Any, kwargs: Any) -> Any:
            return tree_map_only(torch.Tensor, lambda t: self.cast(t, dtype), (args, kwargs))

        def run(*args: Any, **kwargs: Any) -> Any:
            with torch._C._ExcludeDispatchKeyGuard(_AUTOCAST_CPU):  # redispatch below autocast, as autocast does
                leaves = tree_leaves((args, kwargs))
                first = next((a for a in leaves if isinstance(a, torch.Tensor)), None)
                if policy == "lower_precision_fp":
                    args, kwargs = cast_all(torch.get_autocast_dtype("cpu"), args, kwargs)
                elif policy == "fp32":
                    args, kwargs = cast_all(torch.float32, args, kwargs)
                elif policy == "promote":
                    dtype = torch.get_autocast_dtype("cpu")
                    for t in leaves:
                        if _eligible(t):
                            dtype = torch.float32 if torch.float32 in (dtype, t.dtype) else dtype
                    args, kwargs = cast_all(dtype, args, kwargs)
                elif policy == "fp32_set_opt_dtype" and _eligible(first):
                    if dtype_at is not None and dtype_at < len(args):
                        args = (*args[:dtype_at], args[dtype_at] or torch.float32, *args[dtype_at + 1 :])
                    elif kwargs.get("dtype") is None:
                        kwargs = {**kwargs, "dtype": torch.float32}
                elif policy == "fp32_append_dtype" and _eligible(first):
                    args = args if len(args) > 1 else (*args, 2)  # norm's default p
                    return _overload(_APPEND_DTYPE[name])(*args, **kwargs, dtype=torch.float32)
                return op(*args, **kwargs)

        return run


@contextlib.contextmanager
def cuda_autocast_policy() -> Iterator[None]:
    """While active, ``torch.autocast("cpu", ...)`` casts as CUDA autocast does, op by op (``CUDA_AUTOCAST_POLICY``).

    The aten ops on CUDA's lists get ``AutocastCPU`` kernels that apply CUDA's policy (lower precision, float32,
    float32 output dtype, promotion), with CUDA's cache of weight casts; the ops only CPU autocast lists run uncast.
    The kernels sit at autocast's place in the dispatcher, so ops inside composite ops (``cross_entropy`` is
    ``log_softmax`` then ``nll_loss``) and forwards recomputed by activation checkpointing follow the policy too.
    Deliberate difference: ``binary_cross_entropy``, which CUDA autocast refuses, runs in float32 (as CPU autocast
    runs it), so a model using it is estimated as if it used the ``..._with_logits`` form.

    Example:
        >>> x = torch.ones(4, 8)
        >>> with cuda_autocast_policy(), torch.autocast("cpu", dtype=torch.bfloat16):
        ...     (x @ x.T).dtype, x.bfloat16().exp().dtype, torch.softmax(x.bfloat16(), -1).dtype
        (torch.bfloat16, torch.float32, torch.float32)

    """
    state = _CudaAutocast()
    policies = {name: policy for policy, names in CUDA_AUTOCAST_POLICY.items() for name in names}
    policies |= {name: None for name in _cpu_autocast_ops() if name not in policies}
    library = torch.library.Library("aten", "IMPL")
    clear = torch.clear_autocast_cache

    def clear_both() -> None:
        state.cache.clear()
        clear()

    try:
        with warnings.catch_warnings():  # "Overriding a previously registered kernel": the CPU lists, on purpose
            warnings.simplefilter("ignore", UserWarning)
            for name, policy in policies.items():
                with contextlib.suppress(AttributeError):  # an op this torch build does not have
                    # not on CUDA's lists: fall through to the op's own kernel (whose inner ops autocast sees)
                    kernel = torch.library.fallthrough_kernel if policy is None else state.kernel(name, policy)
                    library.impl(name, kernel, "AutocastCPU")
        torch.clear_autocast_cache = clear_both  # autocast's exit drops the cache of casts
        yield
    finally:
        torch.clear_autocast_cache = clear
        library._destroy()
        state.cache.clear()


def _round(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# cuBLAS's workspace per handle and stream, allocated through the caching allocator on a handle's first GEMM and kept:
# 32 MiB on compute capability 9.x, 10.x and 12.x, else ":4096:2:16:8" = 8 MiB + 128 KiB (PyTorch's
# aten/src/ATen/cuda/CublasHandlePool.cpp, parseChosenWorkspaceSize; CUBLAS_WORKSPACE_CONFIG overrides it). A training
# step has two, *inferred*, not measured directly: handles are per thread, and the forward's thread and the autograd
# engine's device thread each run GEMMs. Consistent with the H200 measurement: HF GPT-2's fp32 estimate was 66 MiB
# (2 x 32 MiB + rounding) low without them.
_CUBLAS_GEMMS = frozenset({
    _aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default, _aten._addmm_activation.default,
    _aten.addmv.default, _aten.mv.default, _aten.addbmm.default,
})  # fmt: skip
# cuDNN convolution workspace: cuDNN's heuristics pick the algorithm, and PyTorch (aten/src/ATen/native/cudnn/
# Conv_v8.cpp, try_plans) takes the first plan whose workspace the allocator can give, falling back to plans with
# smaller workspaces when it cannot, so the size depends on the card, the cuDNN version and free memory. Rule: each
# convolution (forward, or its backward) holds, while it runs, the explicit-GEMM algorithm's workspace (the im2col
# matrix) in float32, capped at CUDNN_WORKSPACE_CAP. Calibrated on the one measurement there is (issue 12: torchvision
# resnet18, batch 64 x 224^2 on an H200, after cuBLAS's two workspaces 40 MiB (fp32) and 37 MiB (bf16) stayed
# unexplained); at resnet18's peak the rule adds 55 MiB (both precisions: an over-estimate). On a card short of memory
# cuDNN takes smaller workspaces, so there the rule errs high.
CUDNN_WORKSPACE_CAP = 64 * 2**20


def cublas_workspace_bytes(compute_capability: tuple[int, int]) -> int:
    """PyTorch's default cuBLAS workspace on a card (bytes).

    Example:
        >>> cublas_workspace_bytes((9, 0)) // 2**20, cublas_workspace_bytes((8, 6))
        (32, 8519680)

    """
    if os.environ.get("CUBLAS_WORKSPACE_CONFIG"):
        pairs = re.findall(r":(\d+):(\d+)", os.environ["CUBLAS_WORKSPACE_CONFIG"])
        if pairs:
            return sum(int(size) * 1024 * int(count) for size, count in pairs)
    if compute_capability[0] in (9, 10, 12):
        return 4096 * 1024 * 8
    return 4096 * 1024 * 2 + 16 * 1024 * 8


def _im2col_bytes(input_shape: Any, weight_shape: Any, output_shape: Any) -> int:
    """float32 bytes of the convolution's im2col matrix: (batch x output positions) x (in channels x kernel)."""
    batch, spatial = input_shape[0], math.prod(output_shape[2:])
    return 4 * batch * spatial * math.prod(weight_shape[1:]) * (input_shape[1] // weight_shape[1])


class KernelWorkspaces(TorchDispatchMode):
    """Allocate the buffers CUDA's kernels allocate inside: attention backward's, cuDNN's and cuBLAS's workspaces.

    Attention (flash / memory-efficient backward) and convolution workspaces live while their kernel runs; cuBLAS's
    (``cublas_workspace_bytes``, one for the forward's thread and one for the backward's) stay from their first GEMM.
    Enter it inside the meter, so the meter sees these allocations.

    Args:
        compute_capability: The card's ``(major, minor)``: it sizes cuBLAS's workspace.

    """

    def __init__(self, compute_capability: tuple[int, int] = DEFAULT_CAPABILITY) -> None:
        super().__init__()
        self.cublas_bytes = cublas_workspace_bytes(tuple(compute_capability))
        self.cublas: dict[bool, torch.Tensor] = {}  # by "in backward"

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
            l_k, h_k = args[2].shape[-2], args[2].shape[-3]
            if h_k != h:  # grouped-query: dk and dv for every query head, summed into the key/value heads' after
                workspaces += [torch.empty(b, l_k, h, d, dtype=query.dtype, device=query.device) for _ in range(2)]
        elif func is _aten._scaled_dot_product_efficient_attention_backward.default:
            query = args[1]
            workspaces = [torch.empty(*query.shape[:-1], dtype=torch.float32, device=query.device)]  # delta
        elif func is _aten.convolution.default or func is _aten.convolution_backward.default:
            out = func(*args, **kwargs)
            forward = func is _aten.convolution.default
            data, weight, result = (args[0], args[1], out) if forward else (args[1], args[2], args[0])
            size = min(_im2col_bytes(data.shape, weight.shape, result.shape), CUDNN_WORKSPACE_CAP)
            workspace = torch.empty(size, dtype=torch.uint8, device=data.device)  # beside the outputs, as in the kernel
            del workspace
            return out
        elif func in _CUBLAS_GEMMS:
            backward = torch._C._current_autograd_node() is not None
            if backward not in self.cublas:
                self.cublas[backward] = torch.empty(self.cublas_bytes, dtype=torch.uint8, device=args[0].device)
        out = func(*args, **kwargs)
        del workspaces
        return out


@contextlib.contextmanager
def cuda_rounding(enabled: bool = True) -> Iterator[None]:
    """Count every storage as the CUDA caching allocator would: rounded up to 512 bytes."""
    if not enabled:
        yield
        return
    from torch.distributed._tools import mem_tracker

    from lightning_lowvram._patching import patched

    def rounded(self: Any) -> int:
        return _round(self.size * self.element_size, mem_tracker._PYTORCH_MIN_ALLOCATE)

    with patched(mem_tracker._WeakRefInfo, "_calculate_mem_consumed", rounded):
        yield
