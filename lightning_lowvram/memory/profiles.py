"""GPU profiles: how much memory a card has, whether it does bf16, its compute capability.

The profiles live as YAML in the shipped Hydra tree (``lightning_lowvram.conf``, group ``gpu``), so the command line
(``gpu=rtx3060_12gb``) and Python (``gpu_profile("rtx3060_12gb")``) read the same numbers.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from functools import cache
from importlib import resources
from typing import Any

import torch
import yaml

GiB = 1024**3
MiB = 1024**2


def format_bytes(n: float) -> str:
    """``1536`` -> ``'1.50 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError  # pragma: no cover


@dataclasses.dataclass(frozen=True)
class GPUProfile:
    """What the memory planner and the budget emulation need to know about a card.

    Args:
        name: Short name, as in ``conf/gpu/<name>.yaml``.
        display_name: Human-readable name.
        memory_gib: Total device memory in GiB as ``torch.cuda`` reports it; ``None`` means no limit (CPU).
        bf16: Whether bf16 mixed precision is supported.
        compute_capability: ``(major, minor)``, or ``None`` for a CPU.
        context_mib: Memory outside the caching allocator (CUDA context, cuBLAS workspaces), in MiB.
        free_gib: Free memory: detected for ``auto``; set it for a shared card (caps ``usable_bytes``).
        fp32_tflops: Peak float32 (non-tensor) TFLOPS, from the vendor's spec sheet (the step-time model).
        tensor_tflops: Peak dense FP16/BF16 tensor TFLOPS with FP32 accumulate (FP16 rate on cards without tensor
            cores).
        bandwidth_gbs: Peak memory bandwidth in GB/s.
        interconnect_gbs: Card-to-card bandwidth in GB/s per direction (NVLink, else PCIe): what the step-time model
            charges FSDP2's and DDP's collectives at.
        pcie_gbs: Host-to-card bandwidth in GB/s per direction: what it charges CPU offload's copies at.

    Example:
        >>> gpu_profile("rtx3060_12gb").bf16
        True

    """

    name: str
    display_name: str = ""
    memory_gib: float | None = None
    bf16: bool = False
    compute_capability: tuple[int, int] | None = None
    context_mib: float = 0.0
    free_gib: float | None = None
    fp32_tflops: float | None = None
    tensor_tflops: float | None = None
    bandwidth_gbs: float | None = None
    interconnect_gbs: float | None = None
    pcie_gbs: float | None = None

    def __post_init__(self) -> None:
        for key in ("memory_gib", "free_gib", "context_mib"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
                raise ValueError(f"gpu.{key} must be a number, got {value!r}")
            if value is not None and not math.isfinite(value):
                raise ValueError(f"gpu.{key} must be finite, got {value!r}")
        if not isinstance(self.bf16, bool):
            raise ValueError(f"gpu.bf16 must be true or false, got {self.bf16!r}")
        if self.memory_gib is not None and self.memory_gib <= 0:
            raise ValueError(f"gpu.memory_gib must be > 0 (or null for no limit), got {self.memory_gib!r}")
        if self.free_gib is not None and self.free_gib <= 0:
            raise ValueError(f"gpu.free_gib must be > 0 (or null: the whole card), got {self.free_gib!r}")
        for key in ("fp32_tflops", "tensor_tflops", "bandwidth_gbs", "interconnect_gbs", "pcie_gbs"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float) or value <= 0):
                raise ValueError(f"gpu.{key} must be a number > 0 (or null), got {value!r}")
        if self.context_mib < 0:
            raise ValueError(f"gpu.context_mib must be >= 0, got {self.context_mib!r}")
        if self.compute_capability is not None:
            object.__setattr__(self, "compute_capability", tuple(int(v) for v in self.compute_capability))

    @property
    def total_bytes(self) -> int | None:
        """Total device memory in bytes, or ``None`` without a limit."""
        return None if self.memory_gib is None else int(self.memory_gib * GiB)

    @property
    def usable_bytes(self) -> int | None:
        """Bytes left for tensors: total minus the context allowance, capped by free memory when detected."""
        if self.memory_gib is None:
            return None
        usable = int(self.memory_gib * GiB - self.context_mib * MiB)
        if self.free_gib is not None:
            usable = min(usable, int(self.free_gib * GiB))
        if usable <= 0:
            raise ValueError(f"gpu {self.name!r}: context_mib={self.context_mib} leaves no memory for tensors")
        return usable

    @classmethod
    def from_config(cls, node: Mapping[str, Any]) -> GPUProfile:
        """Build a profile from a config node (``cfg.gpu``); ``name: auto`` detects the local device."""
        data = dict(node)
        if data.get("name") == "auto":
            detected = gpu_profile("auto")
            free = data.get("free_gib")
            if free is None:
                return detected
            if detected.memory_gib is None:
                raise ValueError(
                    f"gpu.free_gib is ignored here, got {free!r}: gpu=auto found no CUDA device, so training runs on "
                    "the CPU without a limit; name a card to emulate it (e.g. gpu=rtx3060_12gb gpu.free_gib=...)"
                )
            if isinstance(free, bool) or not isinstance(free, int | float):
                raise ValueError(f"gpu.free_gib must be a number, got {free!r}")
            return dataclasses.replace(
                detected, free_gib=free if detected.free_gib is None else min(free, detected.free_gib)
            )
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(
                f"gpu: unknown keys {sorted(unknown)}; allowed: {[f.name for f in dataclasses.fields(cls)]}"
            )
        if "name" not in data:
            raise ValueError("gpu: a profile needs a 'name'")
        return cls(**data)


def _conf_dir() -> Any:
    return resources.files("lightning_lowvram.conf") / "gpu"


@cache
def known_gpus() -> tuple[str, ...]:
    """Names of the shipped profiles (the options of the ``gpu`` config group)."""
    return tuple(sorted(p.name[: -len(".yaml")] for p in _conf_dir().iterdir() if p.name.endswith(".yaml")))


@cache
def _load(name: str) -> GPUProfile:
    data = yaml.safe_load((_conf_dir() / f"{name}.yaml").read_text())
    return GPUProfile.from_config(data)


def detect_gpu(device: int | None = None) -> GPUProfile:
    """Profile of the local CUDA device (total and free memory), or the ``cpu`` profile when there is none."""
    if not torch.cuda.is_available():
        return _load("cpu")
    index = torch.cuda.current_device() if device is None else device
    props = torch.cuda.get_device_properties(index)
    free, total = torch.cuda.mem_get_info(index)
    spec = _shipped_like(props.name, total / GiB)
    return GPUProfile(
        name=f"cuda:{index}",
        display_name=props.name,
        memory_gib=total / GiB,
        bf16=torch.cuda.is_bf16_supported(),
        compute_capability=(props.major, props.minor),
        context_mib=0.0,  # already outside of what mem_get_info reports as free
        free_gib=free / GiB,
        fp32_tflops=spec.fp32_tflops if spec else None,  # throughput of the shipped profile of the same name
        tensor_tflops=spec.tensor_tflops if spec else None,
        bandwidth_gbs=spec.bandwidth_gbs if spec else None,
        interconnect_gbs=spec.interconnect_gbs if spec else None,
        pcie_gbs=spec.pcie_gbs if spec else None,
    )


def _shipped_like(device_name: str, memory_gib: float) -> GPUProfile | None:
    """The shipped profile of a detected card: the longest display name (size dropped) it contains, closest memory."""
    matches = []
    for profile in map(_load, known_gpus()):
        words = profile.display_name.split()
        base = " ".join(words[:-1]) if words and words[-1].endswith("GB") else profile.display_name
        if base and base in device_name:
            matches.append((len(base), -abs((profile.memory_gib or 0.0) - memory_gib), profile))
    return max(matches, key=lambda m: m[:2])[2] if matches else None


def gpu_profile(name: str | GPUProfile = "auto") -> GPUProfile:
    """Look up a GPU profile by name; ``"auto"`` detects the local device.

    Args:
        name: One of :func:`known_gpus` (``"rtx3060_12gb"``, ``"t4_16gb"``, ``"cpu"``, ...) or ``"auto"``.

    Raises:
        ValueError: For an unknown name; the message lists the known ones.

    Example:
        >>> round(gpu_profile("t4_16gb").memory_gib, 2)
        14.75

    """
    if isinstance(name, GPUProfile):
        return name
    if name == "auto":
        return detect_gpu()
    if name not in known_gpus():
        raise ValueError(f"gpu={name!r} is not a known GPU profile; known: {', '.join(known_gpus())}")
    return _load(name)
