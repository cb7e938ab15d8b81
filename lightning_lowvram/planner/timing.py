"""A step-time model: the work a traced step does (FLOPs by kind, bytes moved, kernels), priced on a card.

While ``estimate_step_memory`` traces a step on fake tensors, :class:`WorkCounter` records every aten op: its FLOPs
(PyTorch's own ``torch.utils.flop_counter`` formulas: matmuls, convolutions, attention kernels, forward and backward),
whether they run on tensor cores (bf16/fp16 inputs; float32 convolutions take TF32 on compute capability 8.0+,
PyTorch's default ``torch.backends.cudnn.allow_tf32``; float32 matmuls do not, ``allow_tf32`` is off by default), the
bytes it reads and writes (its tensor inputs and outputs; views move nothing) and one kernel launch. One micro-batch's
forward + backward (checkpointing's recompute included) and one optimizer step are kept apart, so a step of ``k``
micro-batches costs ``k x micro + optimizer``.

Each op costs ``max(FLOPs / (rate x MATMUL_EFFICIENCY), bytes / (bandwidth x BANDWIDTH_EFFICIENCY)) + LAUNCH_S``
(a roofline per op). Rates and bandwidths are the vendors' published peaks (``GPUProfile.fp32_tflops``,
``tensor_tflops``, ``bandwidth_gbs``, per card in ``conf/gpu``). The three constants below are fitted to the step-time
ratios measured on an NVIDIA H200 (ANCHORS.md, 2026-11-27: HF GPT-2 small 32 x 512, bf16-mixed 0.35x of fp32,
micro-batches of 4 1.20x, per-block checkpointing 1.19x; predicted 0.35, 1.22, 1.25) and checked on five settings
measured under an 8 GB cap, held out: the predicted order matches the measured one (up to a 2 % tie), fp32 micro 2
is predicted at 0.76 s (measured 0.80 s), but the bf16 gain under the cap is over-predicted (0.39-0.53x of fp32
predicted, 0.65-0.73x measured). FLOPs and bytes are counted by formula, not measured on kernels: read the three as
fitted numbers, not as hardware facts. One card, one model: the model ranks settings; its absolute seconds are rough.

Several cards and offload (:class:`Traffic`): the bytes one rank sends per micro-batch over the card-to-card link
(ring collectives: DDP's all-reduce ``2 (N-1)/N x gradients``; FSDP2's all-gathers ``(N-1)/N x parameters``, twice with
``reshard_after_forward``, and its reduce-scatter ``(N-1)/N x gradients``, every backward) are charged at
``GPUProfile.interconnect_gbs``; CPU offload's copies (the rank's shard of the parameters to the card for each
all-gather, its gradients back) at ``pcie_gbs``, and the offloaded optimizer step at :data:`HOST_BANDWIDTH_GBS`. All at
peak and in full, not overlapped with compute (FSDP2 and DDP overlap much of it): these times err slow, and none of
them has been measured on a GPU.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lightning_lowvram.memory.profiles import GPUProfile

# fitted by benchmarks/step_time_calibration.py (benchmarks/RESULTS.md) to the H200 measurements named above
MATMUL_EFFICIENCY = 0.9  # achieved / peak rate of the FLOP-heavy kernels
BANDWIDTH_EFFICIENCY = 0.5  # achieved / peak bandwidth, as counted here (every op's inputs + outputs, no fusion)
LAUNCH_S = 1e-5  # seconds per kernel: launch plus eager PyTorch's dispatch (NVIDIA quotes ~5 us for the launch)

#: host memory bandwidth for an offloaded optimizer step (memory-bound): dual-channel DDR4-3200, 2 x 25.6 GB/s (JEDEC
#: JESD79-4 data rate x 8 bytes), a common desktop; servers have more channels
HOST_BANDWIDTH_GBS = 51.2

_VIEWS = {  # ops that launch no kernel: views, metadata, uninitialised allocations
    "view", "_unsafe_view", "reshape", "t", "transpose", "permute", "expand", "as_strided", "detach", "alias",
    "unsqueeze", "squeeze", "slice", "select", "split", "split_with_sizes", "unbind", "chunk", "narrow",
    "_reshape_alias", "lift_fresh", "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
}  # fmt: skip
_CONV = {"convolution", "convolution_backward", "_convolution"}


@dataclasses.dataclass(frozen=True)
class StepWork:
    """One micro-batch's forward + backward and one optimizer step, each as :class:`Work` and its ops."""

    micro: tuple[tuple[str, float, float], ...]  # per op: (kind, flops, bytes), kind in tensor / tf32 / fp32
    optimizer: tuple[tuple[str, float, float], ...]

    def seconds(self, gpu: GPUProfile, micro_batches: int, traffic: Traffic | None = None) -> float:
        """Predicted seconds of a step of ``micro_batches`` micro-batches on ``gpu``, with one rank's ``traffic``."""
        traffic = traffic or Traffic()
        optimizer = _price(self.optimizer, gpu)
        if traffic.host_optimizer:
            optimizer = sum(moved for _, _, moved in self.optimizer) / (HOST_BANDWIDTH_GBS * 1e9)
        return micro_batches * (_price(self.micro, gpu) + traffic.seconds(gpu)) + optimizer

    def flops(self, part: str = "micro") -> dict[str, float]:
        """FLOPs by kind (``tensor``, ``tf32``, ``fp32``) of ``"micro"`` or ``"optimizer"``."""
        totals = dict.fromkeys(("tensor", "tf32", "fp32"), 0.0)
        for kind, flops, _ in getattr(self, part):
            totals[kind] += flops
        return totals


@dataclasses.dataclass(frozen=True)
class Traffic:
    """Bytes one rank moves per micro-batch across cards and over PCIe; whether its optimizer steps on the host."""

    interconnect: float = 0.0
    pcie: float = 0.0
    host_optimizer: bool = False

    def seconds(self, gpu: GPUProfile) -> float:
        """The copies' seconds per micro-batch at the card's peak link bandwidths (no overlap with compute).

        Raises:
            ValueError: A link the traffic crosses has no bandwidth in the profile.

        """
        total = 0.0
        for moved, key in ((self.interconnect, "interconnect_gbs"), (self.pcie, "pcie_gbs")):
            if moved:
                if getattr(gpu, key) is None:
                    raise ValueError(f"gpu {gpu.name!r} has no {key}: the step-time model needs it (conf/gpu)")
                total += moved / (getattr(gpu, key) * 1e9)
        return total


def traffic_of(devices: int, sharding: str, offload: str, param_bytes: int, grad_bytes: int) -> Traffic:
    """One rank's :class:`Traffic` per micro-batch for ``devices`` ranks (see the module docstring).

    Example:
        >>> traffic_of(4, "full", "none", param_bytes=400, grad_bytes=400).interconnect  # 3/4 x (2 x 400 + 400)
        900.0

    """
    ring = (devices - 1) / devices
    if sharding == "none":
        return Traffic(interconnect=2 * ring * grad_bytes)  # DDP's all-reduce (nothing with one device)
    gathers = 2 if sharding == "full" else 1
    interconnect = ring * (gathers * param_bytes + grad_bytes)
    if offload == "none":
        return Traffic(interconnect=interconnect)
    return Traffic(interconnect, (gathers * param_bytes + grad_bytes) / devices, host_optimizer=True)


def _price(ops: tuple[tuple[str, float, float], ...], gpu: GPUProfile) -> float:
    rates = rates_of(gpu)
    bandwidth = gpu.bandwidth_gbs * 1e9 * BANDWIDTH_EFFICIENCY
    return sum(max(flops / rates[kind], moved / bandwidth) + LAUNCH_S for kind, flops, moved in ops)


def rates_of(gpu: GPUProfile) -> dict[str, float]:
    """Achievable FLOP/s per kind of math on ``gpu``.

    Raises:
        ValueError: If the profile lacks the throughput fields the time model needs.

    """
    missing = [f for f in ("fp32_tflops", "tensor_tflops", "bandwidth_gbs") if getattr(gpu, f) is None]
    if missing:
        raise ValueError(f"gpu {gpu.name!r} has no {', '.join(missing)}: the step-time model needs them (conf/gpu)")
    tensor = gpu.tensor_tflops * 1e12 * MATMUL_EFFICIENCY
    fp32 = gpu.fp32_tflops * 1e12 * MATMUL_EFFICIENCY
    ampere = gpu.compute_capability is not None and tuple(gpu.compute_capability) >= (8, 0)
    return {"tensor": tensor, "tf32": tensor / 2 if ampere else fp32, "fp32": fp32}


class WorkCounter(TorchDispatchMode):
    """Record the ops of a traced region (fake tensors welcome) as ``(kind, flops, bytes)``; see the module docstring.

    Example:
        >>> a, b = torch.ones(4, 8), torch.ones(8, 2)
        >>> with WorkCounter() as counter:
        ...     _ = a @ b
        >>> counter.ops  # (kind, FLOPs, bytes read and written)
        [('fp32', 128.0, 224.0)]

    """

    def __init__(self) -> None:
        super().__init__()
        from torch.utils.flop_counter import flop_registry

        self.registry = flop_registry
        self.ops: list[tuple[str, float, float]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name in _VIEWS or name.endswith("_view") or func.namespace == "prim":
            return out
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if not outputs and not name.endswith("_"):  # a metadata query (sizes, device): no kernel; in-place ops
            return out  # (``_foreach_add_``...) return nothing but do work
        packet = func.overloadpacket
        flops = self.registry[packet](*args, **kwargs, out_val=out) if packet in self.registry else 0
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)] + outputs
        # a sharded (FSDP2) tensor moves its local shard: each rank updates its own part of the optimizer state
        moved = sum(getattr(t, "_local_tensor", t).numel() * t.element_size() for t in tensors)
        first = next((t for t in tensors if t.is_floating_point()), None)
        low = first is not None and first.dtype in (torch.bfloat16, torch.float16)
        kind = "tensor" if low else ("tf32" if name in _CONV else "fp32")
        self.ops.append((kind, float(flops), float(moved)))
        return out

    def take(self) -> tuple[tuple[str, float, float], ...]:
        """The ops recorded since the last ``take``."""
        ops, self.ops = tuple(self.ops), []
        return ops
