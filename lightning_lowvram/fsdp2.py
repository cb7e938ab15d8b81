"""FSDP2 for modules that do not shard themselves: PyTorch's ``fully_shard`` on each repeated block, then the rest.

Lightning runs FSDP2 through ``ModelParallelStrategy``, which asks the module to call ``fully_shard`` in its own
``configure_model``. :func:`apply_fsdp2` is that step written once for any module (the functional core, no Lightning
needed), and :class:`FSDP2Strategy` is ``ModelParallelStrategy`` applying it when the module has no
``configure_model`` of its own, so a plan's "FSDP2 on 4 cards" runs on the user's unchanged LightningModule. The
planner traces the same units (``planner.sharding``), so its per-rank estimate is of the run this strategy makes.

Units: each outermost repeated block (``checkpointing.repeated_blocks``: transformer layers, ResNet stages), then what
``training_step`` calls for the other parameters: the module itself when it holds some directly, else each top-level
child holding some (e.g. a wrapped Hugging Face model, whose forward is what runs).
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from typing_extensions import override


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

    from lightning_lowvram.checkpointing import repeated_blocks

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


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` (FSDP2) for a LightningModule without a ``configure_model``.

    The module is sharded by :func:`apply_fsdp2` (each repeated block a unit, then the rest) on the data-parallel
    mesh; a module with its own ``configure_model`` keeps its units, and ``reshard_after_forward`` is applied to them.
    This is what ``plan(..., devices=N)`` returns in ``Plan.trainer_kwargs()`` for a sharded setting, and the
    ``strategy=fsdp2`` / ``strategy=fsdp2_offload`` nodes of the ``lowvram`` app.

    Args:
        reshard_after_forward: ``True``: parameters freed after each unit's forward, gathered again in backward
            (``sharding="full"`` in the planner); ``False``: kept until backward (``sharding="grad_op"``); ``None``:
            ``True`` for the units the strategy applies, and a module's own ``configure_model`` units keep theirs.
        cpu_offload: Sharded parameters, gradients and optimizer state in host memory (``offload="params"``); needs
            CUDA devices and a module without its own ``configure_model`` (or one passing ``CPUOffloadPolicy``).
        data_parallel_size: As ``ModelParallelStrategy`` (``"auto"``: every device).
        save_distributed_checkpoint: As ``ModelParallelStrategy``: each rank saves its shard.
        process_group_backend: As ``ModelParallelStrategy`` (``"gloo"`` on CPU, ``"nccl"`` on CUDA by default).
        timeout_s: Collective timeout in seconds.

    Raises:
        ValueError: At setup: ``cpu_offload`` without CUDA, or a module's own ``configure_model`` that applies no
            ``fully_shard`` or shards without the requested offload.

    Example:
        >>> strategy = FSDP2Strategy(reshard_after_forward=False)
        >>> # lightning.Trainer(strategy=strategy, devices=4, ...).fit(model)  # any LightningModule

    """

    def __init__(
        self,
        reshard_after_forward: bool | None = None,
        cpu_offload: bool = False,
        data_parallel_size: int | str = "auto",
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout_s: float = 1800.0,
    ) -> None:
        if reshard_after_forward is not None and not isinstance(reshard_after_forward, bool):
            raise ValueError(
                f"FSDP2Strategy: reshard_after_forward must be true, false or null, got {reshard_after_forward!r}"
            )
        if not isinstance(cpu_offload, bool):
            raise ValueError(f"FSDP2Strategy: cpu_offload must be true or false, got {cpu_offload!r}")
        super().__init__(
            data_parallel_size=data_parallel_size,  # type: ignore[arg-type]
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timedelta(seconds=timeout_s),
        )
        self.reshard_after_forward, self.cpu_offload = reshard_after_forward, cpu_offload

    @override
    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":  # every process (ModelParallelStrategy's "auto" is the node count)
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    @override
    def setup(self, trainer: Any) -> None:
        from lightning.pytorch.utilities.model_helpers import is_overridden
        from torch.distributed.fsdp import FSDPModule

        module = self.lightning_module
        if self.cpu_offload and self.root_device.type != "cuda":
            raise ValueError(
                "FSDP2Strategy: cpu_offload=True needs CUDA devices (FSDP2's CPUOffloadPolicy copies to an "
                f"accelerator), got {self.root_device.type}: on the CPU the state already is in host memory"
            )
        if is_overridden("configure_model", module):
            units = [m for m in module.modules() if isinstance(m, FSDPModule)]
            if not units:
                raise ValueError(
                    f"FSDP2Strategy: {type(module).__name__}.configure_model applies no fully_shard: remove it to let "
                    "the strategy shard each repeated block, or call fully_shard there"
                )
            if self.cpu_offload and not all(_offloads(u) for u in units):
                raise ValueError(
                    f"FSDP2Strategy: cpu_offload=True but {type(module).__name__}.configure_model calls fully_shard "
                    "without offload_policy=CPUOffloadPolicy(): pass it there, or remove configure_model"
                )
            if self.reshard_after_forward is not None:  # asked for: it applies to the module's own units too
                for unit in units:
                    unit.set_reshard_after_forward(self.reshard_after_forward, recurse=False)
            super().setup(trainer)
            return
        if not any(isinstance(m, FSDPModule) for m in module.modules()):  # not yet (a test after fit: already)
            reshard = self.reshard_after_forward is not False
            mesh = self.device_mesh["data_parallel"]
            apply_fsdp2(module, mesh, reshard_after_forward=reshard, cpu_offload=self.cpu_offload)
        with _counts_as_configured(module):  # ModelParallelStrategy.setup insists on a configure_model
            super().setup(trainer)


def _offloads(unit: Any) -> bool:
    from torch.distributed.fsdp import CPUOffloadPolicy

    group = unit._get_fsdp_state()._fsdp_param_group  # torch's FSDP2 state: None for a unit without parameters
    return group is None or isinstance(group.offload_policy, CPUOffloadPolicy)


@contextlib.contextmanager
def _counts_as_configured(module: nn.Module) -> Iterator[None]:
    """``configure_model`` on the instance (the units :func:`apply_fsdp2` applied), for Lightning's override check."""

    def configure_model(self: Any) -> None:  # already sharded by apply_fsdp2
        return None

    module.configure_model = types.MethodType(configure_model, module)  # type: ignore[method-assign]
    try:
        yield
    finally:
        del module.configure_model
