"""Live tensor bytes by category, for any number of iterations.

Built on PyTorch's ``MemTracker`` (``torch.distributed._tools.mem_tracker``), which already knows how to follow
tensor storages through a ``TorchDispatchMode`` and sort them into parameters, buffers, gradients, activations,
temporaries and optimizer state. ``MemTracker`` itself keeps per-module snapshots and refuses a second forward of the
root module; a meter or a budget around a whole ``Trainer.fit`` needs neither, so this subclass replaces its module
bookkeeping with one global forward pre-hook and reads the backward state from the autograd engine.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.distributed._tools.common_utils import get_untyped_storages
from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker, _MemRefType
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map_only

#: Category names reported by the meter, in display order, mapped from ``MemTracker``'s reference types.
CATEGORIES: dict[str, str] = {
    _MemRefType.PARAM: "parameters",
    _MemRefType.BUFFER: "buffers",
    _MemRefType.GRAD: "gradients",
    _MemRefType.OPT: "optimizer",
    _MemRefType.ACT: "activations",
    _MemRefType.TEMP: "temporaries",
    _MemRefType.OTH: "other",
}


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


_HOST_DEPTH = 0  # > 0 inside ``host_memory()``: trackers neither count nor categorise


@contextmanager
def host_memory() -> Iterator[None]:
    """Work in this block happens in host memory: meters and CPU budgets do not count what it allocates.

    For work that runs on the host before Lightning moves the model to the device (a callback's ``setup`` on a model
    still on the CPU). On CPU, host and "device" are the same memory, so the emulated budget must be told; tensors
    made here that later live on the device (a layer's new weight) are counted from the first forward that uses them,
    as every parameter is.

    Example:
        >>> from lightning_lowvram import memory_budget
        >>> with memory_budget(1024), host_memory():
        ...     scratch = torch.zeros(1024)  # 4 KiB on the host: not the device's budget
        >>> scratch.numel()
        1024

    """
    global _HOST_DEPTH
    _HOST_DEPTH += 1
    try:
        yield
    finally:
        _HOST_DEPTH -= 1


class LiveTensorTracker(MemTracker):
    """Tracks live tensor storages by category and the peak, across any number of steps.

    Parameters and buffers of every module that runs a forward are (re)categorised as such on each call, so modules
    built before the tracker started, or whose parameters are replaced later (structured pruning), are counted right.
    """

    def __init__(self) -> None:
        super().__init__()
        self._module_hook: Any = None

    # -- bookkeeping ---------------------------------------------------------------------------------------------
    # A meta tensor holds no memory (a streamed block's weights between its forwards, a model built without weights):
    # MemTracker would count its size on a "meta" device that no card has.
    def _update_and_maybe_create_winfos(self, t: torch.Tensor, reftype: Any, update_existing: bool = False) -> Any:
        if t.device.type == "meta":
            return set()
        return super()._update_and_maybe_create_winfos(t, reftype, update_existing)

    def _track(self, reftype: Any, t: torch.Tensor) -> None:
        if t.device.type != "meta":
            super()._track(reftype, t)

    def _module_pre_forward(self, module: nn.Module, args: Any) -> None:
        if _in_backward() or _HOST_DEPTH:  # recomputation under activation checkpointing: nothing new to categorise
            return
        before = self.live_bytes()
        for param in module.parameters(recurse=False):
            self._update_and_maybe_create_winfos(param, _MemRefType.PARAM)
            if param.grad is not None:
                self._update_and_maybe_create_winfos(param.grad, _MemRefType.GRAD)
            if param.requires_grad and param not in self._param_to_grad_hook_handles:
                self._param_to_grad_hook_handles[param] = (
                    param.register_hook(self._on_grad),
                    param.register_post_accumulate_grad_hook(lambda p: self._on_grad(p.grad)),
                )
        for buffer in module.buffers(recurse=False):
            self._update_and_maybe_create_winfos(buffer, _MemRefType.BUFFER)
        self._after_update(self.live_bytes() - before)

    def _register_global_optimizer_hook(self) -> None:
        # Like MemTracker's, but state that exists before the step (made outside the tracker) counts from its start.
        def pre(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> Any:
            before = self.live_bytes()
            self._track_optimizer_states(_MemRefType.OPT, optimizer)
            self._after_update(self.live_bytes() - before)
            self._in_opt = True
            closure = kwargs.get("closure", args[1] if len(args) > 1 else None)  # args[0] is the optimizer
            if closure is None:
                return None

            def closure_outside_optimizer() -> Any:  # Lightning runs forward/backward inside step(closure)
                self._in_opt = False
                try:
                    return closure()
                finally:
                    self._in_opt = True

            if "closure" in kwargs:
                return args, {**kwargs, "closure": closure_outside_optimizer}
            return (args[0], closure_outside_optimizer, *args[2:]), kwargs

        def post(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            self._track_optimizer_states(_MemRefType.OPT, optimizer)
            self._in_opt = False

        self._optimizer_hook_handles = (register_optimizer_step_pre_hook(pre), register_optimizer_step_post_hook(post))

    def _on_grad(self, grad: torch.Tensor | None) -> None:
        if grad is not None:
            self._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)

    def _update_peak_stats(self, peak_state: Any = None) -> None:
        for dev, snap in self._curr_mem_snap.items():
            if self._peak_mem.get(dev, 0) < snap[_TOTAL_KEY]:
                self._peak_mem[dev] = snap[_TOTAL_KEY]
                self._peak_mem_snap[dev] = dict(snap)

    def _after_update(self, requested: int = 0) -> None:
        """Hook for subclasses, called after every change that can add bytes."""
        self._update_peak_stats()

    # -- public --------------------------------------------------------------------------------------------------
    def live_bytes(self) -> int:
        """Bytes of all tracked storages alive now, summed over devices."""
        return sum(snap[_TOTAL_KEY] for snap in self._curr_mem_snap.values())

    def reset_peak(self) -> None:
        """Start a new peak from the current live bytes."""
        self._peak_mem_snap = self.get_tracker_snapshot("current")
        self._peak_mem = {dev: snap[_TOTAL_KEY] for dev, snap in self._peak_mem_snap.items()}

    def __enter__(self) -> LiveTensorTracker:
        if self._depth == 0:
            self._register_global_optimizer_hook()
            self._track_resize()
            self.reset_peak()
            self._module_hook = nn.modules.module.register_module_forward_pre_hook(self._module_pre_forward)
        TorchDispatchMode.__enter__(self)
        self._depth += 1
        return self

    def __exit__(self, *args: Any) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._deregister_param_and_optimizer_hooks()
            self._restore_resize()
            if self._module_hook is not None:
                self._module_hook.remove()
                self._module_hook = None
        TorchDispatchMode.__exit__(self, *args)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: D105
        res = func(*args, **(kwargs or {}))
        if _HOST_DEPTH:
            return res
        if self._in_opt:
            reftype = _MemRefType.OPT
        elif _in_backward():
            reftype = _MemRefType.TEMP
        else:
            reftype = _MemRefType.ACT
        # Only storages the op allocated count: a view of (or an in-place op on) a tensor that existed before the
        # tracker started, such as a dataset held in host memory, allocates nothing.
        inputs = {
            id(st)
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor)
            for st in get_untyped_storages(t)
        }

        def track(t: torch.Tensor) -> None:
            if any(id(st) not in inputs or st in self._WINFO for st in get_untyped_storages(t)):
                self._track(reftype, t)

        before = self.live_bytes()
        tree_map_only(torch.Tensor, track, res)
        requested = self.live_bytes() - before
        if requested > 0:
            try:
                self._after_update(requested)
            except BaseException:
                del res  # free the output before the exception's traceback pins this frame
                raise
        return res
