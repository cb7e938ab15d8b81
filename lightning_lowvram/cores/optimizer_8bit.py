"""8-bit optimizer state (torchao), usable without Lightning.

torchao's ``AdamW8bit``/``Adam8bit`` keep both Adam moments in 8 bits with a float scale per block of 256 values and
a 256-entry code map
(tensors of at least 4096 values whose size divides into blocks; smaller ones stay float32, as in bitsandbytes):
about 0.51x of the parameters' bytes instead of 2.0x. Meant for GPUs; on CPU the first step compiles for seconds and
steps are several times slower.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

from lightning_lowvram._patching import patch, patched

_KEYS = ("params", "lr", "betas", "eps", "weight_decay", "initial_lr")


def to_8bit(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """A torchao 8-bit copy of a fresh ``Adam``/``AdamW`` (same parameter groups and hyperparameters).

    Raises:
        ValueError: For another optimizer class, AMSGrad, or an optimizer that already has state.

    Example:
        >>> layer = torch.nn.Linear(64, 64)
        >>> type(to_8bit(torch.optim.AdamW(layer.parameters(), lr=1e-3))).__name__
        'AdamW8bit'

    """
    from torchao.optim import Adam8bit, AdamW8bit

    target = {torch.optim.AdamW: AdamW8bit, torch.optim.Adam: Adam8bit}.get(type(optimizer))
    if target is None:
        raise ValueError(f"8-bit optimizer state is available for Adam and AdamW, not {type(optimizer).__name__}")
    if any(group.get("amsgrad") for group in optimizer.param_groups):
        raise ValueError("8-bit optimizer state does not support amsgrad=True")
    if optimizer.state:
        raise ValueError("convert the optimizer before its first step: its state is float32 already")
    groups = [{k: v for k, v in group.items() if k in _KEYS} for group in optimizer.param_groups]
    converted = target(groups)
    for group, old in zip(converted.param_groups, groups, strict=True):
        if "initial_lr" in old:  # set by LR schedulers built on the original
            group["initial_lr"] = old["initial_lr"]
    patch(converted, "step", _eager_under_dispatch_modes, wrap=True)
    return converted


def _eager_under_dispatch_modes(step: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """The 8-bit step, uncompiled while a dispatch mode watches it (the meter, the CPU-emulated budget).

    torchao compiles each parameter's update with ``fullgraph=True``, which refuses to run under a Python dispatch
    mode ("non-infra torch dispatch mode present"), so a metered or emulated step would crash. Under a mode the update
    runs eagerly instead (the same arithmetic; more temporaries than the fused kernel), announced once an optimizer.
    """
    if _get_current_dispatch_mode() is None:
        return step(*args, **kwargs)
    optimizer = getattr(step, "__self__", None)
    if not getattr(optimizer, "_lowvram_eager_announced", False):
        if optimizer is not None:
            optimizer._lowvram_eager_announced = True  # once per optimizer
        rank_zero_info(
            "8-bit optimizer: its steps run uncompiled while the memory meter or an emulated budget watches them "
            "(torch.compile does not run under a dispatch mode); unwatched steps compile"
        )
    with patched(torch, "compile", _uncompiled):
        return step(*args, **kwargs)


def _uncompiled(fn: Callable[..., Any], **_: Any) -> Callable[..., Any]:
    return fn


def adam_state_bytes(params: Iterable[torch.Tensor], eight_bit: bool, block_size: int = 256) -> int:
    """Bytes of Adam's two moments (plus the step counters) for these parameters, fp32 or torchao 8-bit."""
    total = 0
    for p in params:
        n = p.numel()
        if eight_bit and n >= 4096 and n % block_size == 0:
            # per moment: int8 codes, one float32 scale per block and the 256-entry float32 code map
            total += 2 * (n + 4 * math.ceil(n / block_size) + 256 * 4)
        else:
            total += 2 * n * p.element_size()
        total += 4  # the float32 step counter
    return total


def module_optimizer(module: nn.Module, optimizer: Any = None) -> torch.optim.Optimizer:
    """``optimizer(params)`` of the trainable parameters, else the module's ``configure_optimizers`` (its first)."""
    params = [p for p in module.parameters() if p.requires_grad]
    if optimizer is not None:
        return optimizer(params)
    configured = module.configure_optimizers()
    while not isinstance(configured, torch.optim.Optimizer):
        if isinstance(configured, dict):
            configured = configured["optimizer"]
        elif isinstance(configured, list | tuple) and configured:
            configured = configured[0]
        else:
            raise ValueError("configure_optimizers returned no optimizer; pass optimizer=")
    return configured


def adam_optimizer(module: nn.Module, optimizer: Any = None) -> torch.optim.Optimizer | None:
    """The module's optimizer if it is Adam/AdamW (what 8-bit state applies to), else ``None``."""
    opt = module_optimizer(module, optimizer)
    return opt if type(opt) in (torch.optim.Adam, torch.optim.AdamW) else None


def with_8bit_optimizer(estimate: Any, module: nn.Module, optimizer: Any = None) -> Any:
    """A step estimate (``planner.MemoryEstimate``) with Adam's float32 moments as torchao's 8-bit layout (modelled).

    Raises:
        ValueError: If the module's optimizer is not Adam/AdamW.

    """
    opt = module_optimizer(module, optimizer)
    if type(opt) not in (torch.optim.Adam, torch.optim.AdamW):
        raise ValueError(f"optimizer_8bit needs Adam or AdamW, the module's optimizer is {type(opt).__name__}")
    params = [p for group in opt.param_groups for p in group["params"]]
    fp32, eight = adam_state_bytes(params, eight_bit=False), adam_state_bytes(params, eight_bit=True)
    by_category = dict(estimate.by_category)
    if by_category["optimizer"] < fp32:  # the moments were not live at the peak
        return estimate
    by_category["optimizer"] += eight - fp32  # the step's temporaries stay as traced
    by_phase = {phase: value + eight - fp32 for phase, value in estimate.by_phase.items()}  # live in every phase
    return dataclasses.replace(estimate, peak=estimate.peak + eight - fp32, by_category=by_category, by_phase=by_phase)
