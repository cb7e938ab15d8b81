"""FSDP2 for modules that do not shard themselves: PyTorch's ``fully_shard`` on each repeated block, then the rest.

Lightning runs FSDP2 through ``ModelParallelStrategy``, which asks the module to call ``fully_shard`` in its own
``configure_model``. :func:`apply_fsdp2` is that step written once for any module (the functional core, no Lightning
needed); :class:`lightning_lowvram.strategies.FSDP2Strategy` is ``ModelParallelStrategy`` applying it when the module
has no ``configure_model`` of its own. The planner traces the same units (``planner.sharding``), so its per-rank
estimate is of the run that strategy makes.

Units: each outermost repeated block (``activation_checkpointing.repeated_blocks``: transformer layers, ResNet
stages), then what ``training_step`` calls for the other parameters: the module itself when it holds some directly,
else each top-level child holding some (e.g. a wrapped Hugging Face model, whose forward is what runs).
"""

from __future__ import annotations

from typing import Any

from torch import nn


def apply_fsdp2(module: nn.Module, mesh: Any, *, reshard_after_forward: bool = True, cpu_offload: bool = False) -> int:
    """Shard ``module`` in place with FSDP2 (``fully_shard``), each repeated block a unit, then the rest.

    Args:
        module: The module (a LightningModule or any ``nn.Module``).
        mesh: The 1-D device mesh to shard over (Lightning's ``self.device_mesh["data_parallel"]``).
        reshard_after_forward: Free each unit's gathered parameters after its forward (``True``, ZeRO-3-like) or
            keep them until its backward (``False``, ZeRO-2-like: fewer all-gathers, more memory).
        cpu_offload: Keep the sharded parameters, gradients and optimizer state in host memory
            (``CPUOffloadPolicy``; the optimizer step then runs on the CPU). Needs a CUDA device.

    Returns:
        The number of FSDP units applied.

    Example:
        >>> import os, torch.distributed as dist
        >>> from torch.distributed.device_mesh import init_device_mesh
        >>> os.environ.update(MASTER_ADDR="localhost", MASTER_PORT="29561")
        >>> dist.init_process_group("gloo", rank=0, world_size=1)
        >>> net = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(3)], nn.Linear(8, 2))
        >>> apply_fsdp2(net, init_device_mesh("cpu", (1,)))  # three blocks, then the last Linear
        4
        >>> dist.destroy_process_group()

    """
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    from lightning_lowvram.cores.activation_checkpointing import repeated_blocks

    policy = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    named = dict(module.named_modules())
    blocks = repeated_blocks(module)
    blocks = [n for n in blocks if not any(n.startswith(f"{other}.") for other in blocks)]  # outermost
    units = [named[name] for name in blocks]
    in_blocks = {id(p) for unit in units for p in unit.parameters()}
    if any(id(p) not in in_blocks for p in module.parameters(recurse=False)):
        units.append(module)
    else:
        units += _holding(module, in_blocks)
    for unit in units:
        fully_shard(unit, mesh=mesh, reshard_after_forward=reshard_after_forward, offload_policy=policy)
    return len(units)


def _holding(module: nn.Module, taken: set[int]) -> list[nn.Module]:
    """The children of ``module`` holding parameters not in ``taken``, looking into containers without a forward.

    ``fully_shard`` needs a module that runs: a ``ModuleList`` or ``ModuleDict`` is replaced by its children.
    """
    found = []
    for child in module.children():
        if not any(id(p) not in taken for p in child.parameters()):
            continue
        found += _holding(child, taken) if isinstance(child, nn.ModuleList | nn.ModuleDict) else [child]
    return found


def offloads(unit: Any) -> bool:
    """Whether an FSDP2 unit keeps its sharded state in host memory (a unit without parameters counts as kept)."""
    from torch.distributed.fsdp import CPUOffloadPolicy

    group = unit._get_fsdp_state()._fsdp_param_group  # torch's FSDP2 state: None for a unit without parameters
    return group is None or isinstance(group.offload_policy, CPUOffloadPolicy)
