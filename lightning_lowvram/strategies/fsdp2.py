"""FSDP2Strategy: Lightning's ``ModelParallelStrategy`` that shards a module without a ``configure_model`` itself.

So a plan's "FSDP2 on 4 cards" runs on the user's unchanged LightningModule: the units are
:func:`lightning_lowvram.cores.fsdp2.apply_fsdp2`'s (each repeated block, then the rest).
"""

from __future__ import annotations

import contextlib
import types
from datetime import timedelta
from typing import Any

from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from typing_extensions import override

from lightning_lowvram._patching import patched
from lightning_lowvram.cores.fsdp2 import apply_fsdp2, offloads


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
            if self.cpu_offload and not all(offloads(u) for u in units):
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


def _counts_as_configured(module: nn.Module) -> contextlib.AbstractContextManager[None]:
    """``configure_model`` on the instance (the units :func:`apply_fsdp2` applied), for Lightning's override check."""

    def configure_model(self: Any) -> None:  # already sharded by apply_fsdp2
        return None

    return patched(module, "configure_model", types.MethodType(configure_model, module))
