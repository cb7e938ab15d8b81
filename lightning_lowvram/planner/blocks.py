"""Trace a few of a model's repeated blocks and extrapolate to all of them.

A transformer's step repeats its blocks: each one adds the same parameters, gradients, optimizer state, saved
activations and ops, and the rest (embeddings, head, loss, the largest transient) does not depend on how many there
are. So each phase's peak bytes, by category, and the step's ops are affine in the block count: tracing the model cut
to ``2p`` and ``3p`` blocks (``p``: the period of the blocks' pattern, 2 for Gemma-2's alternating sliding and global
layers) gives the line, and the model's own count is read off it. Eight-billion-parameter models have 32 blocks; two
traces of 2 and 3 cost a fraction of one of 32 (``benchmarks/RESULTS.md``, the 8B plan's time).

Where the blocks are not a repeated pattern (different shapes, several stacks such as an encoder and a decoder), or
there are too few for it to pay, nothing is extrapolated: the whole model is traced. Tests compare extrapolated and
whole traces byte for byte on the families users bring (``tests/planner/test_blocks.py``).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

import torch
from torch import nn

_COUNTS = ("num_hidden_layers", "n_layer", "num_layers")  # Hugging Face configs' block counts, by family
_PER_LAYER = ("layer_types",)  # Hugging Face configs' per-block lists (sliding or full attention, ...)


@dataclasses.dataclass(frozen=True)
class BlockStack:
    """A module's repeated blocks: where they are, how many, and the period of their pattern.

    Attributes:
        path: The qualified name of the ``ModuleList``/``Sequential`` holding them.
        count: How many blocks it holds.
        period: The smallest ``p`` such that block ``i`` has the structure of block ``i % p``.

    """

    path: str
    count: int
    period: int

    def samples(self) -> tuple[int, int]:
        """The two block counts traced: ``2p`` and ``3p``."""
        return 2 * self.period, 3 * self.period


def block_stack(module: nn.Module) -> BlockStack | None:
    """The one stack of repeated blocks whose step can be extrapolated, or ``None``.

    ``None`` when the module has no repeated blocks, more than one stack of them (an encoder and a decoder), blocks
    that do not repeat a pattern (another shape or setting per block), or not more than the ``2p + 3p`` two traces
    would hold.

    Example:
        >>> from lightning_lowvram.demo import TinyGPT
        >>> block_stack(TinyGPT(n_layer=8))
        BlockStack(path='blocks', count=8, period=1)
        >>> block_stack(TinyGPT(n_layer=5)) is None  # tracing 2 and 3 blocks would not save anything
        True

    """
    stacks = [(name, c) for name, c in module.named_modules() if isinstance(c, nn.ModuleList | nn.Sequential)]
    stacks = [(name, c) for name, c in stacks if _repeated(c)]
    if len(stacks) != 1:
        return None
    path, container = stacks[0]
    blocks = list(container.children())
    layer_types = _layer_types(module, len(blocks))
    signatures = [(_signature(b), layer_types[i] if layer_types else None) for i, b in enumerate(blocks)]
    for period in range(1, len(blocks) // 3 + 1):
        if len(blocks) % period == 0 and all(s == signatures[i % period] for i, s in enumerate(signatures)):
            return BlockStack(path, len(blocks), period) if len(blocks) > 5 * period else None
    return None


def keep_blocks(module: nn.Module, stack: BlockStack, count: int) -> nn.Module:
    """Cut ``module`` (a copy: in place) to its first ``count`` blocks, and its Hugging Face configs to match.

    The configs' block counts (``num_hidden_layers``, ``n_layer``, ``num_layers``) and per-block lists
    (``layer_types``) are cut too, so the model's loop and its cache see ``count`` blocks.
    """
    container = module.get_submodule(stack.path)
    kept = list(container.children())[:count]
    replacement = type(container)(kept) if isinstance(container, nn.ModuleList) else nn.Sequential(*kept)
    parent, _, name = stack.path.rpartition(".")
    setattr(module.get_submodule(parent) if parent else module, name, replacement)
    for config in _configs(module):
        for key in _COUNTS:
            if getattr(config, key, None) == stack.count:
                setattr(config, key, count)
        for key in _PER_LAYER:
            value = getattr(config, key, None)
            if isinstance(value, list | tuple) and len(value) == stack.count:
                setattr(config, key, type(value)(value[:count]))
    return module


def affine(low: int, high: int, steps: float) -> int:
    """``high`` and ``steps`` more increments of ``high - low``."""
    return high + round(steps * (high - low))


def extrapolate_ops(low: tuple[Any, ...], high: tuple[Any, ...], steps: int) -> tuple[Any, ...] | None:
    """The ``(kind, flops, bytes)`` ops of all blocks from those of fewer; ``None`` where the two do not make a line.

    Ops repeated per block (a block's matmuls): ``high`` and ``steps`` more of what it adds to ``low``. The same ops
    over more bytes (CUDA's multi-tensor optimizer step, one kernel over every parameter): each op's FLOPs and bytes
    extrapolated in place.
    """
    if len(low) == len(high) and all(a[0] == b[0] for a, b in zip(low, high, strict=True)):
        return tuple(
            (kind, b_flops + steps * (b_flops - a_flops), b_moved + steps * (b_moved - a_moved))
            for (_, a_flops, a_moved), (kind, b_flops, b_moved) in zip(low, high, strict=True)
        )
    added = Counter(high)
    added.subtract(Counter(low))
    if any(n < 0 for n in added.values()):
        return None
    return tuple(high) + tuple(op for op, n in added.items() for _ in range(n * steps))


def _repeated(container: nn.Module) -> bool:
    children = list(container.children())
    return (
        len(children) >= 2
        and all(type(c) is type(children[0]) for c in children)
        and any(True for _ in children[0].parameters())
    )


def _signature(block: nn.Module) -> tuple[Any, ...]:
    """What the step's memory of a block depends on: its modules, tensors and settings (not its index)."""
    modules = tuple((name, type(m).__name__, _settings(m)) for name, m in block.named_modules())
    tensors = tuple(
        (name, tuple(t.shape), t.dtype, t.requires_grad)
        for name, t in (*block.named_parameters(remove_duplicate=False), *block.named_buffers())
    )
    return modules, tensors


def _settings(module: nn.Module) -> tuple[Any, ...]:
    return tuple(
        sorted(
            (key, value)
            for key, value in vars(module).items()
            if not key.startswith("_") and "idx" not in key and isinstance(value, int | float | str | bool | None)
        )
    )


def _configs(module: nn.Module) -> list[Any]:
    found: dict[int, Any] = {}
    for m in module.modules():
        config = getattr(m, "config", None)
        if config is not None and not isinstance(config, torch.Tensor) and hasattr(config, "to_dict"):
            found.setdefault(id(config), config)
    return list(found.values())


def _layer_types(module: nn.Module, count: int) -> list[Any] | None:
    for config in _configs(module):
        value = getattr(config, "layer_types", None)
        if isinstance(value, list | tuple) and len(value) == count:
            return list(value)
    return None
