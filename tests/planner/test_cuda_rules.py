import contextlib

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from lightning_lowvram import MemoryMeter
from lightning_lowvram.planner import estimate_step_memory
from lightning_lowvram.planner.cuda_rules import CudaKernels, KernelWorkspaces, cuda_sdpa, sdpa_backend

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


def test_cuda_autocast_runs_norms_and_softmax_in_float32():
    x = torch.zeros(4, 8, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cpu = F.layer_norm(x, (8,)).dtype, F.softmax(x, -1).dtype
        with CudaKernels():
            norm = torch.nn.LayerNorm(8).to(torch.bfloat16)
            cuda = F.layer_norm(x, (8,)).dtype, F.softmax(x, -1).dtype, norm(x).dtype
    assert cpu == (torch.bfloat16, torch.bfloat16)
    assert cuda == (torch.float32, torch.float32, torch.float32)


def test_cuda_autocast_float32_policy_covers_pow_exp_sums_and_losses_as_pytorch_lists_them():
    x = torch.ones(4, 8, dtype=torch.bfloat16)
    target = torch.zeros(4, dtype=torch.long)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ops = {
            "pow": lambda: torch.pow(x, 3.0), "**": lambda: x**3, "exp": lambda: x.exp(), "sum": lambda: x.sum(),
            "cumsum": lambda: x.cumsum(0), "cross_entropy": lambda: F.cross_entropy(x, target),
            "mse_loss": lambda: F.mse_loss(x, x), "rsqrt": lambda: x.rsqrt(),
        }  # fmt: skip
        cpu = {name: op().dtype for name, op in ops.items()}
        with CudaKernels(attention=False):
            cuda = {name: op().dtype for name, op in ops.items()}
            kept = x.sum(dtype=torch.bfloat16).dtype, (x * 2).dtype, F.gelu(x).dtype  # an explicit dtype; not listed
    assert cpu["pow"] == cpu["exp"] == cpu["sum"] == torch.bfloat16  # what CPU autocast does
    assert set(cuda.values()) == {torch.float32}, cuda
    assert kept == (torch.bfloat16, torch.bfloat16, torch.bfloat16)


def test_cuda_rules_bring_hf_gpt2_bf16_to_the_h200_measurement():
    """HF GPT-2 small, 8 x 1024, bf16-mixed: 12829 MiB measured on an H200 (ANCHORS.md); the CPU lists gave 11022."""
    import dataclasses

    from transformers import GPT2Config, GPT2LMHeadModel

    from lightning_lowvram import gpu_profile
    from tests.real_models.models import HFModule

    h200 = dataclasses.replace(gpu_profile("h200_141gb"), context_mib=0)
    torch.manual_seed(0)
    module = HFModule(GPT2LMHeadModel(GPT2Config(n_positions=1024, bos_token_id=0, eos_token_id=0)), optimizer="adamw")
    ids = torch.zeros(8, 1024, dtype=torch.long)
    estimate = estimate_step_memory(module, {"input_ids": ids, "labels": ids}, precision="bf16-mixed", gpu=h200)
    assert 0.97 <= estimate.peak / (12829 * 2**20) <= 1.05
