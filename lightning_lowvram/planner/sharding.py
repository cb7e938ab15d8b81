"""One rank of a multi-device step, traced in one process: FSDP2 sharding over a fake process group.

``estimate_step_memory(..., devices=N, sharding=...)`` shards its copy of the module with PyTorch's own
``fully_shard`` (FSDP2) over a process group of ``N`` ranks whose collectives do nothing (PyTorch's ``fake``
backend, the one its ``FSDPMemTracker`` is tested with), and traces rank 0's step: sharded parameters, gradients
and optimizer state, the all-gather buffers of the unit being computed and prefetched, the reduce-scatter buffers,
and the activations of the local micro-batch are then what FSDP2 itself allocates, not a formula. Checked against the
meter on real two-process gloo FSDP2 runs (``tests/callbacks/test_auto_micro_batch.py``).

Units: the module's own ``configure_model`` when it overrides it (Lightning's FSDP2 convention: ``fully_shard`` on
``self.device_mesh["data_parallel"]``), else :func:`lightning_lowvram.cores.fsdp2.apply_fsdp2`'s (each repeated
block, then what ``training_step`` calls), the units ``FSDP2Strategy`` applies in the run.
``sharding="grad_op"`` keeps parameters unsharded between forward and backward (``set_reshard_after_forward(False)``,
ZeRO-2-like). Offload is modelled from the traced phases (:func:`offloaded`): ``"params"`` (FSDP2's
``CPUOffloadPolicy``: sharded parameters, gradients and optimizer state live in host memory, the optimizer step runs
there) and ``"optimizer"`` (optimizer state and step only, as DeepSpeed's ZeRO-Offload) move those bytes from the
device to ``MemoryEstimate.host``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any, Literal

from torch import nn

Sharding = Literal["full", "grad_op", "none"]
Offload = Literal["none", "optimizer", "params"]
OFFLOADS = ("none", "optimizer", "params")  # what each keeps in host memory: :func:`offloaded`


@dataclasses.dataclass(frozen=True)
class ShardSpec:
    """How many ranks, how the state is sharded, what is offloaded (validated by :func:`shard_spec`)."""

    devices: int
    sharding: Sharding
    offload: Offload


def shard_spec(devices: int, sharding: str, offload: str) -> ShardSpec | None:
    """The checked spec, or ``None`` for one device with nothing sharded or offloaded.

    Raises:
        ValueError: ``devices`` < 1, an unknown ``sharding``/``offload``, sharding with one device and no offload, or
            offload without a sharded strategy.

    ``sharding="none"`` with several devices is DDP: every rank holds the whole state plus DDP's gradient buckets.

    Example:
        >>> shard_spec(4, "full", "none")
        ShardSpec(devices=4, sharding='full', offload='none')
        >>> shard_spec(1, "none", "none") is None
        True

    """
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise ValueError(f"devices must be an integer >= 1, got {devices!r}")
    if sharding not in ("full", "grad_op", "none"):
        raise ValueError(f"sharding must be 'full', 'grad_op' or 'none', got {sharding!r}")
    if offload not in OFFLOADS:
        raise ValueError(f"offload must be 'none', 'optimizer' or 'params', got {offload!r}")
    if sharding != "none" and devices == 1 and offload == "none":
        raise ValueError(
            f"sharding={sharding!r} needs devices >= 2 (one device has nothing to share its state with), or an "
            "offload (FSDP2 on one card offloading to host memory)"
        )
    if offload != "none" and sharding == "none":
        raise ValueError(
            f"offload={offload!r} needs a sharded strategy (sharding='full' or 'grad_op'): Lightning offloads through "
            "FSDP2's CPUOffloadPolicy"
        )
    if devices == 1 and sharding == "none":
        return None
    return ShardSpec(devices, sharding, offload)  # type: ignore[arg-type]


@contextlib.contextmanager
def fake_world(devices: int) -> Iterator[Any]:
    """A process group of ``devices`` ranks whose collectives do nothing (this process is rank 0); yields its mesh.

    Raises:
        ValueError: A process group is already initialised here (a running distributed job): trace before it starts.

    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise ValueError(
            "estimate_step_memory(devices=...) traces with its own fake process group: call it before the distributed "
            "job starts (`lowvram plan`, or before Trainer.fit)"
        )
    dist.init_process_group("fake", rank=0, world_size=devices, store=FakeStore())
    try:
        # the names Lightning's ModelParallelStrategy gives its mesh, so a module's configure_model finds its axis
        yield init_device_mesh("cpu", (devices, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))
    finally:
        dist.destroy_process_group()


def shard(module: nn.Module, mesh: Any, spec: ShardSpec) -> None:
    """Apply FSDP2 to ``module`` (a copy) as a Lightning run with ``FSDP2Strategy`` on ``spec.devices`` ranks would."""
    import lightning as L
    from lightning.pytorch.utilities.model_helpers import is_overridden
    from torch.distributed.fsdp import FSDPModule

    from lightning_lowvram.cores.fsdp2 import apply_fsdp2

    reshard = spec.sharding == "full"
    if isinstance(module, L.LightningModule) and is_overridden("configure_model", module, L.LightningModule):
        module._device_mesh = mesh  # what ModelParallelStrategy sets before calling configure_model
        module.configure_model()
        if not any(isinstance(m, FSDPModule) for m in module.modules()):
            raise ValueError(
                f"{type(module).__name__}.configure_model applies no fully_shard: under devices={spec.devices} "
                "sharding the parameters are not sharded (apply fully_shard to its blocks and itself)"
            )
        for unit in (m for m in module.modules() if isinstance(m, FSDPModule)):
            unit.set_reshard_after_forward(reshard, recurse=False)
    else:  # offload is modelled from the traced categories (CPUOffloadPolicy needs an accelerator to trace)
        apply_fsdp2(module, mesh["data_parallel"], reshard_after_forward=reshard)


def offloaded(
    per_phase: dict[str, Any], offload: str, param_bytes: int, grad_bytes: int, largest: int = 0
) -> tuple[dict[str, dict[str, int]], int]:
    """Each phase's device bytes by category, and the host bytes ``offload`` needs.

    ``per_phase``: the meter's stats at each phase's peak; ``param_bytes``/``grad_bytes``: one rank's sharded
    parameters and gradients; ``largest``: its largest trainable parameter. ``"params"`` (FSDP2's
    ``CPUOffloadPolicy``): the sharded parameters, gradients and optimizer state live in host memory and the optimizer
    step runs there; a unit's all-gathered parameters and unsharded gradients stay on the card. ``"optimizer"``: the
    optimizer state, the gradients it steps with and its step. Host: those state bytes plus the step's temporaries —
    traced with CUDA's multi-tensor (``foreach``) step, which holds them for every parameter at once; on host tensors
    PyTorch steps one parameter at a time (``foreach`` is CUDA's default only), so they are scaled to the largest
    parameter's share. On the card, a phase's parameters and gradients are reduced by at most the sharded bytes: what
    exceeds them (all-gathered) stays counted.
    """
    if offload == "none":
        return {phase: dict(stats.by_category) for phase, stats in per_phase.items()}, 0
    device: dict[str, dict[str, int]] = {}
    # the optimizer state as forward sees it (between steps; during a step the meter may count sharded gradients there)
    optimizer = per_phase["forward"].by_category.get("optimizer", 0) if "forward" in per_phase else 0
    temporaries = 0
    for phase, stats in per_phase.items():
        categories = dict(stats.by_category)
        if phase == "optimizer":  # the step runs in host memory
            temporaries = max(temporaries, categories.get("temporaries", 0))
            keep = ("buffers", "other") + (("parameters",) if offload == "optimizer" else ())
            device[phase] = {k: (v if k in keep else 0) for k, v in categories.items()}
            continue
        categories["optimizer"] = 0
        if offload == "params":
            categories["parameters"] = categories.get("parameters", 0) - min(
                categories.get("parameters", 0), param_bytes
            )
            categories["gradients"] = categories.get("gradients", 0) - min(categories.get("gradients", 0), grad_bytes)
        device[phase] = categories
    per_tensor = temporaries * largest // grad_bytes if grad_bytes and largest else temporaries
    return device, optimizer + per_tensor + grad_bytes + (param_bytes if offload == "params" else 0)
