"""Tiled MLP: a transformer block's MLP computed a tile of the sequence at a time, recomputed per tile in backward.

At long contexts the MLP's intermediates dominate what one block holds while it runs: Llama-3.1-8B's 14336-wide
gate/up projections at 16384 tokens are 448 MiB each in bf16, several of them live at once in the backward. The MLP is
token-wise, so it can run on slices of the sequence: ``tiled_mlp`` runs the forward tile by tile without keeping
anything but its input, and in backward recomputes each tile and back-propagates it alone, so only one tile's
intermediates ever exist (Arctic Long Sequence Training's TiledMLP, arXiv:2506.13996, as DeepSpeed and Liger ship it;
our own code). The tile size follows theirs: tiles of ``hidden_size`` tokens (``ceil(seq / hidden)`` tiles). The
gradients of the MLP's trainable parameters are computed per tile with ``torch.autograd.grad`` and returned to autograd
as the function's own (so gradient hooks, DDP's included, see each parameter once). Dropout inside the MLP draws its
mask per tile (the same distribution as the untiled layer, not its numbers: exact only without dropout, as the LLM
families' MLPs are) and the recompute replays those masks (the RNG state of the forward is restored), so the
gradients are those of the forward that ran. The cost: each MLP's forward runs once more (three times a step under
activation checkpointing).

Applied to Hugging Face decoders (and any model) by structure: the child named ``mlp`` (or ``feed_forward``) of each
repeated block whose forward takes the hidden states alone. Mixture-of-experts MLPs are refused (their routing and
auxiliary losses are not per tile).

Example:
    >>> import torch
    >>> mlp = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    >>> x = torch.randn(2, 64, 8, requires_grad=True)
    >>> torch.allclose(tiled_mlp(mlp, x, tiles=4), mlp(x), atol=1e-6)
    True

"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

MLP_NAMES = ("mlp", "feed_forward")  # the MLP child of a block in HF decoders (Llama, Mistral, Qwen2, Gemma, GPT-2...)


def default_tiles(tokens: int, hidden: int) -> int:
    """Tiles of ``hidden`` tokens, as Arctic's TiledMLP, DeepSpeed and Liger choose (``ceil(tokens / hidden)``).

    Example:
        >>> default_tiles(16384, 4096), default_tiles(100, 4096)
        (4, 1)

    """
    return max(1, math.ceil(tokens / max(hidden, 1)))


class _TiledMLP(torch.autograd.Function):
    """``fn(x)`` a tile at a time; ``params``: the trainable tensors ``fn`` uses, whose gradients it returns."""

    @staticmethod
    def forward(ctx: Any, fn: Any, x: torch.Tensor, tiles: int, *params: torch.Tensor) -> torch.Tensor:
        ctx.fn, ctx.tiles = fn, tiles
        ctx.rng = _rng_state(x.device)
        ctx.autocast = _autocast_state(x.device.type)
        ctx.save_for_backward(x, *params)
        with torch.no_grad():
            return torch.cat([fn(part.contiguous()) for part in x.tensor_split(tiles, dim=-2)], dim=-2)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        x, *params = ctx.saved_tensors
        grads: list[torch.Tensor | None] = [None] * len(params)
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[1] else None
        start = 0
        with _rng_restored(x.device, ctx.rng), torch.autocast(x.device.type, **ctx.autocast), torch.enable_grad():
            for part, g in zip(x.tensor_split(ctx.tiles, dim=-2), grad.tensor_split(ctx.tiles, dim=-2), strict=True):
                part = part.detach().contiguous().requires_grad_(grad_x is not None)
                found = torch.autograd.grad(
                    ctx.fn(part), ([part] if grad_x is not None else []) + params, g.contiguous(), allow_unused=True
                )  # fmt: skip
                if grad_x is not None:
                    grad_x.narrow(-2, start, part.shape[-2]).copy_(found[0])
                    found = found[1:]
                grads = [a if b is None else (b if a is None else a + b) for a, b in zip(grads, found, strict=True)]
                start += part.shape[-2]
                del found, part
        return (None, grad_x, None, *grads)


def tiled_mlp(mlp: nn.Module | Any, x: torch.Tensor, tiles: int | None = None, params: Any = None) -> torch.Tensor:
    """``mlp(x)`` computed ``tiles`` slices of the sequence (dimension -2) at a time; the same values and gradients.

    Args:
        mlp: A token-wise module or function (each position's output depends on that position's input only).
        x: ``[..., sequence, hidden]``.
        tiles: Slices of the sequence; ``None``: :func:`default_tiles`.
        params: The trainable tensors ``mlp`` uses; default: a module's parameters that require grad.

    Raises:
        ValueError: ``tiles`` < 1.

    """
    tiles = default_tiles(x.shape[-2], x.shape[-1]) if tiles is None else tiles
    if isinstance(tiles, bool) or not isinstance(tiles, int) or tiles < 1:
        raise ValueError(f"tiles must be an integer >= 1, got {tiles!r}")
    if params is None:
        params = [p for p in mlp.parameters() if p.requires_grad] if isinstance(mlp, nn.Module) else []
    params = [p for p in params if p.requires_grad]
    if x.dim() < 2 or tiles == 1 or x.shape[-2] < 2 or not torch.is_grad_enabled():
        return mlp(x)
    if not params and not x.requires_grad:
        return mlp(x)  # nothing to differentiate: the plain call keeps nothing either
    return _TiledMLP.apply(mlp, x, min(tiles, x.shape[-2]), *params)


def mlp_modules(model: nn.Module) -> list[str]:
    """Names of the MLPs ``tile_mlps`` would tile: a repeated block's ``mlp`` / ``feed_forward`` child.

    Raises:
        ValueError: A mixture-of-experts MLP (naming it), or none found.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        ...                   num_attention_heads=2, num_key_value_heads=1)
        >>> mlp_modules(LlamaForCausalLM(cfg))
        ['model.layers.0.mlp', 'model.layers.1.mlp']

    """
    from lightning_lowvram.cores.activation_checkpointing import repeated_blocks

    names = []
    for block in repeated_blocks(model):
        for child in MLP_NAMES:
            name = f"{block}.{child}"
            try:
                mlp = model.get_submodule(name)
            except AttributeError:
                continue
            if any(hasattr(m, "experts") for m in mlp.modules()):
                raise ValueError(
                    f"tiled MLP: {name} ({type(mlp).__name__}) is a mixture of experts: its routing and auxiliary "
                    "loss are computed over all tokens, not per tile; leave tile_mlp off for this model"
                )
            required = [
                p
                for p in inspect.signature(mlp.forward).parameters.values()
                if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
            ]
            if len(required) == 1:
                names.append(name)
    if not names:
        raise ValueError(
            f"tiled MLP found no MLP in {type(model).__name__}'s repeated blocks (a child named "
            f"{' or '.join(MLP_NAMES)} whose forward takes the hidden states alone)"
        )
    return names


def tile_mlps(model: nn.Module, tiles: int | None = None) -> list[str]:
    """Make every block MLP of ``model`` run through :func:`tiled_mlp` (its ``forward``, an instance attribute).

    Parameter names and checkpoints are unchanged; :func:`untile_mlps` undoes it.

    Raises:
        ValueError: As :func:`mlp_modules`, or ``tiles`` < 1.

    """
    if tiles is not None and (isinstance(tiles, bool) or not isinstance(tiles, int) or tiles < 1):
        raise ValueError(f"tiles must be an integer >= 1 or None (tokens per tile = hidden size), got {tiles!r}")
    names = mlp_modules(model)
    for name in names:
        mlp = model.get_submodule(name)
        if mlp.__dict__.get("_lowvram_tiled"):
            continue
        forward = mlp.forward

        @functools.wraps(forward)
        def tiled(x: torch.Tensor, _forward: Any = forward, _mlp: nn.Module = mlp) -> torch.Tensor:
            return tiled_mlp(_forward, x, tiles, params=list(_mlp.parameters()))

        mlp.__dict__["forward"] = tiled
        mlp.__dict__["_lowvram_tiled"] = True
    return names


def untile_mlps(model: nn.Module) -> None:
    """Undo :func:`tile_mlps`."""
    for module in model.modules():
        if module.__dict__.pop("_lowvram_tiled", False):
            module.__dict__.pop("forward", None)


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


@contextlib.contextmanager
def _rng_restored(device: torch.device, state: tuple[torch.Tensor, torch.Tensor | None]) -> Iterator[None]:
    """The RNG state of the forward for the recompute; the caller's afterwards (``torch.random.fork_rng``)."""
    with torch.random.fork_rng(devices=[device] if state[1] is not None else [], device_type=device.type):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], device)
        yield


def _autocast_state(device_type: str) -> dict[str, Any]:
    """The autocast the forward ran under, for the recompute (backward runs outside it)."""
    enabled = torch.is_autocast_enabled(device_type)
    return {"enabled": enabled, "dtype": torch.get_autocast_dtype(device_type)}
