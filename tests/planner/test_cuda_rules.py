import contextlib
import re
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from benchmarks.estimate_vs_h200 import ROWS, estimate_mib
from lightning_lowvram import MemoryMeter
from lightning_lowvram.planner import estimate_step_memory
from lightning_lowvram.planner.cuda_rules import (
    CUDA_AUTOCAST_POLICY,
    CUDNN_WORKSPACE_CAP,
    CudaKernels,
    KernelWorkspaces,
    cublas_workspace_bytes,
    cuda_autocast_policy,
    cuda_sdpa,
    sdpa_backend,
)

B, H, SEQ, HEAD = 2, 4, 200, 64


def _qkv(dtype=torch.bfloat16, head=HEAD, seq=SEQ, grad=True):
    return [torch.zeros(B, H, seq, head, dtype=dtype, requires_grad=grad) for _ in range(3)]


@pytest.mark.parametrize(
    ("dtype", "capability", "kwargs", "backend"),
    [
        (torch.bfloat16, (8, 6), {}, "flash"),  # RTX 30xx, bf16 autocast
        (torch.float16, (8, 9), {}, "flash"),
        (torch.float32, (8, 6), {}, "efficient"),  # flash has no fp32 kernel
        (torch.float16, (7, 5), {}, "efficient"),  # Turing: no flash
        (torch.bfloat16, (7, 5), {}, "math"),  # Turing: no bf16 kernel at all
        (torch.bfloat16, (9, 0), {}, "cudnn"),  # H100 prefers cuDNN
        (torch.float32, (9, 0), {}, "efficient"),
        (torch.bfloat16, (8, 0), {"attn_mask": torch.ones(SEQ, SEQ, dtype=torch.bool)}, "efficient"),
        (torch.bfloat16, (8, 0), {"head": 6}, "flash"),  # flash pads the head size
        (torch.float32, (8, 0), {"head": 6}, "math"),  # efficient needs the head size aligned to 4
        (torch.bfloat16, (8, 6), {"head": 200}, "efficient"),  # flash cannot train head 193-224 on sm86
        (torch.bfloat16, (8, 0), {"head": 200}, "flash"),
        (torch.bfloat16, (8, 0), {"head": 320}, "efficient"),
        (torch.bfloat16, (8, 0), {"dropout_p": 0.1, "is_causal": True}, "flash"),
    ],
)
def test_the_attention_kernel_is_chosen_as_cuda_chooses_it(dtype, capability, kwargs, backend):
    kwargs = dict(kwargs)
    q, k, v = _qkv(dtype, head=kwargs.pop("head", HEAD))
    assert sdpa_backend(q, k, v, compute_capability=capability, **kwargs) == backend


@pytest.mark.parametrize(
    ("dtype", "capability", "backend"),
    [
        (torch.bfloat16, (8, 6), "flash"),  # flash takes GQA (check_batch_size_and_num_heads_dense<true>)
        (torch.bfloat16, (9, 0), "cudnn"),  # so does cuDNN (requires_same_num_heads=false)
        (torch.float32, (8, 6), "math"),  # memory-efficient does not (<false>): PyTorch falls back to math
        (torch.float16, (7, 5), "math"),
    ],
)
def test_grouped_query_attention_takes_the_kernels_pytorch_allows_it(dtype, capability, backend):
    q = torch.zeros(B, H, SEQ, HEAD, dtype=dtype, requires_grad=True)
    k, v = (torch.zeros(B, H // 2, SEQ, HEAD, dtype=dtype, requires_grad=True) for _ in range(2))
    assert sdpa_backend(q, k, v, is_causal=True, enable_gqa=True, compute_capability=capability) == backend
    assert sdpa_backend(q, k, v, is_causal=True, compute_capability=capability) == "math"  # without enable_gqa: error
    with FakeTensorMode():  # the op CUDA runs gives the key/value heads' gradients
        q, k, v = (torch.zeros(t.shape, dtype=dtype, requires_grad=True) for t in (q, k, v))
        out = cuda_sdpa(q, k, v, is_causal=True, enable_gqa=True, compute_capability=capability)
        out.float().sum().backward()
    assert out.shape == q.shape and k.grad.shape == k.shape


class _GQA(L.LightningModule):
    """One attention layer whose keys and values have ``kv_heads`` heads (8 query heads of 64), as HF calls SDPA."""

    def __init__(self, kv_heads):
        super().__init__()
        self.kv_heads = kv_heads
        self.q = torch.nn.Linear(64, 8 * 64, bias=False)
        self.kv = torch.nn.Linear(64, 2 * kv_heads * 64, bias=False)

    def training_step(self, batch, batch_idx):
        b, seq, _ = batch.shape
        q = self.q(batch).view(b, seq, 8, 64).transpose(1, 2)
        k, v = self.kv(batch).view(b, seq, 2, self.kv_heads, 64).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.kv_heads != 8)
        return out.float().square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize(
    ("gpu", "precision", "kv_heads", "quadratic"),
    [
        ("rtx3060_12gb", "bf16-mixed", 2, False),  # flash, GQA
        ("rtx3060_12gb", "bf16-mixed", 8, False),  # flash, MHA
        ("h100_80gb", "bf16-mixed", 2, False),  # cuDNN, GQA
        ("h100_80gb", "bf16-mixed", 8, False),  # cuDNN, MHA
        ("rtx3060_12gb", "32-true", 8, False),  # memory-efficient, MHA
        ("rtx3060_12gb", "32-true", 2, True),  # GQA in float32: math (keys repeated, seq x seq scores)
    ],
)
def test_attention_memory_is_linear_in_the_sequence_on_fused_kernels(gpu, precision, kv_heads, quadratic):
    def peak(seq):  # long enough that the activations outweigh cuBLAS's workspaces
        estimate = estimate_step_memory(_GQA(kv_heads), torch.zeros(1, seq, 64), gpu=gpu, precision=precision)
        return estimate.peak

    small, medium, large = peak(4096), peak(8192), peak(16384)
    ratio = (large - medium) / (medium - small)  # 2 when memory is linear in the sequence, 4 when quadratic
    assert (3.5 < ratio < 4.5) if quadratic else (1.8 < ratio < 2.2), ratio


def test_inputs_without_a_head_dimension_take_the_math_path():
    q = torch.zeros(SEQ, HEAD, dtype=torch.bfloat16)
    assert sdpa_backend(q, q, q, compute_capability=(8, 0)) == "math"
    with FakeTensorMode():
        q = torch.zeros(SEQ, HEAD, dtype=torch.bfloat16)
        assert cuda_sdpa(q, q, q, compute_capability=(8, 0)).shape == (SEQ, HEAD)


def _saved(fn, *args, **kwargs):
    """Shapes and dtypes autograd keeps for backward."""
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args, **kwargs)
    return saved


@pytest.mark.parametrize(
    ("dtype", "capability", "lse_len"),
    [(torch.bfloat16, (8, 6), SEQ), (torch.float32, (8, 6), 224)],  # efficient pads the lse to 32 queries
)
def test_fused_attention_saves_the_output_and_logsumexp_not_the_seq_by_seq_matrix(dtype, capability, lse_len):
    with FakeTensorMode():
        q, k, v = _qkv(dtype)
        cpu = _saved(F.scaled_dot_product_attention, q, k, v, dropout_p=0.1)  # CPU: the math path
        cuda = _saved(cuda_sdpa, q, k, v, dropout_p=0.1, compute_capability=capability)
    assert (B, H, SEQ, SEQ) in [shape for shape, _ in cpu]
    shapes = [shape for shape, _ in cuda]
    assert not [s for s in shapes if s[-2:] == (SEQ, SEQ)], shapes
    assert (B, H, SEQ, HEAD) in shapes and (B, H, lse_len) in shapes  # output, log-sum-exp


def test_autocast_runs_attention_in_low_precision_as_cuda_autocast_does():
    with FakeTensorMode(), torch.autocast("cpu", dtype=torch.bfloat16):
        q, k, v = _qkv(torch.float32)
        out = cuda_sdpa(q, k, v, compute_capability=(8, 6))
    assert out.dtype == torch.bfloat16


@pytest.mark.parametrize(("head", "rounded"), [(64, 64), (80, 96)])
def test_flash_backward_allocates_its_float32_dq_accumulator(head, rounded):
    """The meta kernel allocates only dq, dk, dv; the CUDA kernel also softmax_d and dq_accum (float32, padded)."""
    peaks = []
    for workspaces in (False, True):
        with FakeTensorMode():
            q, k, v = _qkv(torch.bfloat16, head=head)
            out = cuda_sdpa(q, k, v, is_causal=True, compute_capability=(8, 0))
            with MemoryMeter(q, k, v, out) as meter, KernelWorkspaces() if workspaces else contextlib.nullcontext():
                out.backward(torch.ones_like(out))
        peaks.append(meter.peak.total)
    seq_rounded = 256  # 200 queries rounded to 128
    expected = B * H * seq_rounded * 4 + B * seq_rounded * H * rounded * 4
    assert peaks[1] - peaks[0] == expected


class _Attention(L.LightningModule):
    def __init__(self, dropout=0.1):
        super().__init__()
        self.qkv = torch.nn.Linear(64, 3 * 64)
        self.dropout = dropout

    def training_step(self, batch, batch_idx):
        x = batch
        q, k, v = self.qkv(x).view(*x.shape[:2], 3, 4, 16).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout, is_causal=True).float().square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_cuda_estimate_of_attention_with_dropout_leaves_out_the_seq_by_seq_matrices():
    batch = torch.zeros(8, 256, 64)
    cpu = estimate_step_memory(_Attention(), batch)
    cuda = estimate_step_memory(_Attention(), batch, device="cuda")
    scores = 8 * 4 * 256 * 256 * 4  # one float32 seq x seq matrix per head
    # CPU keeps the softmax output and a dropout mask (or the dropped scores): at least two such matrices
    assert cpu.by_phase["forward"] - cuda.by_phase["forward"] >= 2 * scores, (cpu, cuda)


class _DataDependentAttention(_Attention):
    def training_step(self, batch, batch_idx):
        kept = batch[batch.sum(dim=(1, 2)) >= 0]  # a data-dependent shape: fake tensors cannot trace it
        return super().training_step(kept, batch_idx)


def test_the_measured_fallback_keeps_cpu_attention_kernels():
    with pytest.warns(UserWarning, match="cannot be traced on fake tensors.*runs once for real"):
        estimate = estimate_step_memory(_DataDependentAttention(dropout=0.0), torch.zeros(4, 32, 64), device="cuda")
    assert estimate.method == "measured" and estimate.device == "cuda"


def test_dropout_under_cuda_rules_keeps_a_bool_mask():
    x = torch.zeros(64, 64, requires_grad=True)
    saved = []
    with CudaKernels(), torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.dtype) or t, lambda t: t):
        F.dropout(x, 0.5)
    assert torch.bool in saved


def test_checkpointed_blocks_recompute_under_the_same_cuda_rules():
    from lightning_lowvram.demo import TinyGPT

    model = TinyGPT(seq_len=64, d_model=64, n_head=4, n_layer=2, dropout=0.1)
    batch = (torch.zeros(8, 64, dtype=torch.long), torch.zeros(8, 64, dtype=torch.long))
    plain = estimate_step_memory(model, batch, gpu="rtx3070_8gb", precision="bf16-mixed")
    ckpt = estimate_step_memory(model, batch, gpu="rtx3070_8gb", precision="bf16-mixed", activation_checkpointing=True)
    assert ckpt.by_category["activations"] < plain.by_category["activations"]


def _header_lists() -> dict[str, tuple[str, ...]]:
    """The op lists of the installed torch's ``ATen/autocast_mode.h``, by policy."""
    header = Path(torch.__file__).parent / "include" / "ATen" / "autocast_mode.h"
    if not header.exists():
        pytest.skip("this torch build ships no ATen headers to compare with (pip wheels do, and CI installs one)")
    text = header.read_text()
    macros = {
        "lower_precision_fp": "AT_FORALL_LOWER_PRECISION_FP",
        "fp32": "AT_FORALL_FP32",
        "fp32_set_opt_dtype": "AT_FORALL_FP32_SET_OPT_DTYPE",
        "promote": "AT_FORALL_PROMOTE",
    }
    lists = {}
    for policy, macro in macros.items():
        body = re.search(rf"#define {macro}\(_\)(.*?)\n\n", text, re.S).group(1)
        entries = re.findall(r"_\((\w+)(?:,\s*(\w+))?\)", body)
        lists[policy] = tuple(f"{op}.{overload}" if overload else op for op, overload in entries)
    redispatch = re.search(r"#define AT_FORALL_DIFFERENT_REDISPATCH_SIGNATURE\(_\)(.*?)\n\n", text, re.S).group(1)
    lists["fp32_append_dtype"] = tuple(re.findall(r'"(\w+\.\w+)"', redispatch))  # "norm.Scalar", ...
    return lists


def test_the_cuda_autocast_table_is_the_one_pytorch_ships():
    assert _header_lists() == CUDA_AUTOCAST_POLICY


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_autocast_follows_cuda_policy_for_each_list(dtype):
    x = torch.ones(4, 8)
    low = x.to(dtype)
    target = torch.zeros(4, dtype=torch.long)
    ops = {
        "linear": lambda: F.linear(x, x), "matmul": lambda: x @ x.T, "einsum": lambda: torch.einsum("ij,kj->ik", x, x),
        "conv1d": lambda: F.conv1d(x.T[None], x[:, :, None]), "addmv": lambda: torch.addmv(x[:, 0], x, x[0]),
        "pow": lambda: torch.pow(low, 3.0), "**": lambda: low**3, "exp": lambda: low.exp(),
        "rsqrt": lambda: low.rsqrt(), "layer_norm": lambda: F.layer_norm(low, (8,)),
        "rms_norm": lambda: F.rms_norm(low, (8,)), "softmax": lambda: F.softmax(low, -1), "sum": lambda: low.sum(),
        "cumsum": lambda: low.cumsum(0), "cross_entropy": lambda: F.cross_entropy(low, target),
        "mse_loss": lambda: F.mse_loss(low, low), "norm": lambda: torch.norm(low),
        "addcmul": lambda: torch.addcmul(low, low, x), "cat": lambda: torch.cat([low, low]),
        "explicit dtype": lambda: low.sum(dtype=dtype), "unlisted": lambda: F.gelu(low),
        "double": lambda: x.double() @ x.double().T,
    }  # fmt: skip
    with torch.autocast("cpu", dtype=dtype):
        cpu = {name: op().dtype for name, op in ops.items()}
        with cuda_autocast_policy():
            cuda = {name: op().dtype for name, op in ops.items()}
    lower = ("linear", "matmul", "einsum", "conv1d", "addmv", "explicit dtype", "unlisted", "cat")
    assert {name: cuda[name] for name in lower} == dict.fromkeys(lower, dtype)
    assert cuda["double"] == torch.float64  # autocast leaves float64 alone
    fp32 = set(ops) - set(lower) - {"double"}
    assert {name: cuda[name] for name in fp32} == dict.fromkeys(fp32, torch.float32)  # "addcmul": promoted
    assert cpu["pow"] == cpu["exp"] == cpu["sum"] == cpu["layer_norm"] == dtype  # what CPU autocast does
    with torch.autocast("cpu", dtype=dtype):
        assert low.exp().dtype == dtype  # the CPU's kernels are back


def test_cuda_autocast_keeps_one_cast_of_each_weight_until_autocast_exits():
    layer = torch.nn.Linear(8, 8)
    x = torch.ones(2, 8)
    with cuda_autocast_policy():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            first, second = layer(x), layer(x)
            weights = [fn.next_functions[2][0].next_functions[0][0] for fn in (first.grad_fn, second.grad_fn)]
        assert weights[0] is weights[1]  # one ToCopyBackward: the cached cast of the weight
        with torch.autocast("cpu", dtype=torch.bfloat16):
            third = layer(x)
        assert third.grad_fn.next_functions[2][0].next_functions[0][0] is not weights[0]  # cast again after exit


MEASURED = [row for row in ROWS if row[4] is not None]


@pytest.mark.parametrize("row", MEASURED, ids=[f"{r[0]} {r[3].get('precision', '32-true')}" for r in MEASURED])
def test_cuda_estimates_meet_the_h200_measurements(row):
    """Issue 12's table (HF GPT-2 small, torchvision resnet18 on an H200): within 5 %, never more than 3 % low."""
    name, make, batch, kwargs, measured, context = row
    ratio = estimate_mib(make, batch, kwargs, context) / measured
    assert 0.97 <= ratio <= 1.05, f"{name}: estimate/measured {ratio:.3f}"


def _peak(run, *modules, workspaces):
    with MemoryMeter(*modules) as meter, KernelWorkspaces((9, 0)) if workspaces else contextlib.nullcontext():
        run()
    return meter.peak.total


@pytest.mark.parametrize(("channels", "size"), [(64, 56), (8, 8)])
def test_a_convolution_holds_cudnns_workspace_while_it_runs(channels, size):
    with FakeTensorMode():
        x = torch.zeros(64, channels, size, size)
        conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
        extra = _peak(lambda: conv(x), conv, workspaces=True) - _peak(lambda: conv(x), conv, workspaces=False)
    im2col = 4 * 64 * size * size * channels * 9  # float32 (batch x positions) x (channels x kernel)
    assert extra == min(im2col, CUDNN_WORKSPACE_CAP)  # 441 MiB for the first: capped


def test_a_training_step_holds_two_cublas_workspaces_from_its_first_gemms():
    assert cublas_workspace_bytes((9, 0)) == 32 * 2**20 and cublas_workspace_bytes((8, 6)) == 8519680
    with FakeTensorMode():
        layer = torch.nn.Linear(64, 64)
        x = torch.zeros(8, 64)
        forward = _peak(lambda: layer(x), layer, workspaces=True) - _peak(lambda: layer(x), layer, workspaces=False)
        step = _peak(lambda: layer(x).sum().backward(), layer, workspaces=True)
        plain = _peak(lambda: layer(x).sum().backward(), layer, workspaces=False)
    assert forward == 32 * 2**20  # the forward thread's handle
    assert abs(step - plain - 2 * 32 * 2**20) < 2**16  # and the autograd engine's (the peak moves a little)
