"""Weights streamed from host memory: run a model whose weights do not fit the card, one block at a time.

The engine is accelerate's big-model hooks (``AlignDevicesHook`` with ``offload=True``, ANCHORS.md: "moves a
module's weights in before its forward and out after"): each streamed block's parameters live in host memory (pinned
on CUDA) and are set on the card in the block's forward pre-hook and back to the meta device after it, so the card
holds one block's weights at a time (two on CUDA, where the next block's copy is started on a side stream while the
current block computes). The first ``resident`` blocks and everything outside the blocks (embeddings, head, norms,
every buffer) stay on the card, llama.cpp's ``-ngl`` trade-off. Why accelerate and not FSDP2's CPU offload: FSDP2
needs a process group even on one card, turns every parameter into a DTensor and keeps its gradient machinery; the
hooks work on any module in a plain process, and evaluation needs no gradients.

For evaluation only (``validate``, ``test``, ``predict``): streamed parameters do not train (``requires_grad`` is off
while streamed, restored with the weights).

On CPU the "card" and the host are the same memory, so the onload is a real copy (a clone) made under the emulated
budget, and the host tensors are the model's own, never counted by it: a budget of what the card would hold applies,
and the meter sees one block's weights at a time.

Example:
    >>> from lightning_lowvram.demo import TinyGPT
    >>> model = TinyGPT(n_layer=3).eval()
    >>> x = torch.zeros(1, 8, dtype=torch.long)
    >>> before = model(x)
    >>> streamed = stream_blocks(model, "cpu", resident=1)
    >>> streamed.streamed, model.blocks[1].attn.qkv.weight.device.type
    (['blocks.1', 'blocks.2'], 'meta')
    >>> bool(torch.equal(model(x), before))
    True
    >>> unstream_blocks(model); model.blocks[1].attn.qkv.weight.device.type
    'cpu'

"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from accelerate.hooks import AlignDevicesHook, add_hook_to_module, remove_hook_from_module
from torch import nn

from lightning_lowvram._patching import patch
from lightning_lowvram.cores.activation_checkpointing import repeated_blocks


@dataclasses.dataclass(frozen=True)
class Streaming:
    """What :func:`stream_blocks` did.

    Attributes:
        streamed: The blocks whose weights live in host memory.
        resident: The blocks kept on the card.
        host_bytes: Bytes of the streamed weights (in host memory).
        block_bytes: The largest streamed block's weights: what the card holds of them at a time (twice with the
            prefetch on CUDA).
        prefetch: Whether the next block's copy starts while the current one runs (CUDA).

    """

    streamed: list[str]
    resident: list[str]
    host_bytes: int
    block_bytes: int
    prefetch: bool

    def __str__(self) -> str:
        from lightning_lowvram.memory.profiles import format_bytes

        window = "two" if self.prefetch else "one"
        return (
            f"{len(self.streamed)} blocks streamed from host memory ({format_bytes(self.host_bytes)}, {window} block's "
            f"{format_bytes(self.block_bytes)} on the card at a time), {len(self.resident)} resident"
        )


def streamable_blocks(model: nn.Module, blocks: Sequence[str] | None = None) -> list[str]:
    """The blocks :func:`stream_blocks` would stream, in forward order (``blocks``, checked, or the repeated ones).

    Raises:
        ValueError: The model has no repeated blocks (and none are named), or a named block does not exist.

    Example:
        >>> from lightning_lowvram.demo import TinyGPT
        >>> streamable_blocks(TinyGPT(n_layer=2))
        ['blocks.0', 'blocks.1']

    """
    modules = dict(model.named_modules())
    if blocks is not None:
        missing = [name for name in blocks if name not in modules]
        if missing:
            raise ValueError(f"blocks={list(blocks)!r}: {type(model).__name__} has no module {missing[0]!r}")
        return list(blocks)
    names = repeated_blocks(model)
    if not names:
        largest = sorted(
            ((sum(p.numel() * p.element_size() for p in m.parameters()), n) for n, m in model.named_children()),
            reverse=True,
        )[:3]
        named = ", ".join(f"{n!r}" for _, n in largest if _) or "none"
        raise ValueError(
            f"{type(model).__name__} has no repeated blocks (children of a ModuleList/Sequential of one class) to "
            f"stream one at a time; name the modules to stream with blocks=[...] (its largest children: {named}), or "
            "run it whole"
        )
    return names


def check_streamable(model: nn.Module, resident: int = 0, blocks: Sequence[str] | None = None) -> list[str]:
    """The blocks to stream, after checking ``resident`` against them (what :func:`stream_blocks` checks first).

    Raises:
        ValueError: ``resident`` out of range (naming the model's block count), or no blocks to stream.

    """
    names = streamable_blocks(model, blocks)
    if isinstance(resident, bool) or not isinstance(resident, int) or not 0 <= resident <= len(names):
        raise ValueError(
            f"resident_blocks={resident!r}: {type(model).__name__} has {len(names)} blocks to stream "
            f"({names[0]} ... {names[-1]}); allowed 0 to {len(names)}"
        )
    return names


def stream_blocks(
    model: nn.Module,
    device: str | torch.device,
    resident: int = 0,
    blocks: Sequence[str] | None = None,
) -> Streaming:
    """Keep ``model``'s blocks after the first ``resident`` in host memory, each brought to ``device`` for its forward.

    Args:
        model: The model (a LightningModule or any module), in place; undo with :func:`unstream_blocks`.
        device: Where the blocks compute (the card; ``"cpu"`` for the emulation).
        resident: Blocks kept on the card (the first ones), from 0 to the number of blocks.
        blocks: The modules to stream, in forward order; default: the repeated blocks (a transformer's layers).

    Returns:
        What is streamed and its bytes.

    Raises:
        ValueError: ``resident`` out of range, no blocks to stream, or the model is streamed already.

    """
    if is_streamed(model):
        raise ValueError(f"{type(model).__name__} is streamed already: unstream_blocks(model) first")
    names = check_streamable(model, resident, blocks)
    device = torch.device(device)
    modules = dict(model.named_modules())
    maps = [HostWeights(modules[name], device) for name in names[resident:]]
    for current, following in zip(maps, [*maps[1:], None], strict=True):
        current.following = following
    for name, weights in zip(names[resident:], maps, strict=True):
        add_hook_to_module(modules[name], _StreamHook(weights))
        # ``model.to(card)`` (Lightning's model_to_device) moves the block's buffers, not its meta placeholders
        weights.undo = patch(modules[name], "_apply", _skip_meta, wrap=True)
    return Streaming(
        streamed=names[resident:],
        resident=names[:resident],
        host_bytes=sum(w.nbytes for w in maps),
        block_bytes=max((w.nbytes for w in maps), default=0),
        prefetch=device.type == "cuda",
    )


def unstream_blocks(model: nn.Module) -> None:
    """Undo :func:`stream_blocks`: every streamed block's weights back in place, where they were, hooks removed."""
    for module in model.modules():
        hook = _hook_of(module)
        if hook is not None:
            hook.weights_map.restoring = True
            remove_hook_from_module(module)  # the hook puts each weight back on its original device
            hook.weights_map.undo()
            for name, param in module.named_parameters():
                param.requires_grad_(hook.weights_map.requires_grad[name])


def is_streamed(model: nn.Module) -> bool:
    """Whether any of ``model``'s modules is streamed by :func:`stream_blocks`."""
    return any(_hook_of(m) is not None for m in model.modules())


class HostWeights(Mapping[str, torch.Tensor]):
    """One block's parameters in host memory, as accelerate's ``weights_map``: what its hook sets on the card.

    On CPU each read is a copy made where the emulated card counts it; on CUDA the copy from pinned memory is started
    one block ahead on a side stream (:meth:`prefetch`) and handed over on the compute stream.
    """

    def __init__(self, block: nn.Module, device: torch.device) -> None:
        self.device = device
        self.requires_grad = {name: p.requires_grad for name, p in block.named_parameters()}
        cuda = device.type == "cuda"
        self._host: dict[str, torch.Tensor] = {}
        for name, param in block.named_parameters():
            param.requires_grad_(False)  # streamed for evaluation: no gradients
            host = param.detach()
            self._host[name] = host.cpu().pin_memory() if cuda and torch.cuda.is_available() else host
        self.nbytes = sum(t.numel() * t.element_size() for t in self._host.values())
        self.following: HostWeights | None = None
        self.restoring = False
        self.undo: Callable[[], None] = lambda: None
        self._ready: dict[str, torch.Tensor] = {}
        self._event: Any = None
        self._stream: Any = None

    def __getitem__(self, name: str) -> torch.Tensor:
        host = self._host[name]
        if self.restoring:
            return host
        if self.device.type == "cpu":
            return host.clone()  # the card's copy: the emulated budget and the meter count it
        if name in self._ready:
            if self._event is not None:
                torch.cuda.current_stream(self.device).wait_event(self._event)
                self._event = None
            ready = self._ready.pop(name)
            ready.record_stream(torch.cuda.current_stream(self.device))
            return ready
        return host  # accelerate copies it to the card

    def __iter__(self) -> Iterator[str]:
        return iter(self._host)

    def __len__(self) -> int:
        return len(self._host)

    def arrive(self) -> None:
        """Called as the block's forward starts: start the next block's copy (CUDA)."""
        if self.following is not None and self.device.type == "cuda":
            self.following.prefetch()

    def prefetch(self) -> None:
        """Copy this block's weights to the card on a side stream, without waiting (CUDA; unverified on a GPU)."""
        if self._ready:
            return
        self._stream = self._stream or torch.cuda.Stream(self.device)
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            self._ready = {k: v.to(self.device, non_blocking=True) for k, v in self._host.items()}
            self._event = torch.cuda.Event()
            self._event.record(self._stream)


class _StreamHook(AlignDevicesHook):
    """accelerate's hook over a :class:`HostWeights`, which starts the next block's copy as this one arrives."""

    def __init__(self, weights: HostWeights) -> None:
        super().__init__(
            execution_device=weights.device, offload=True, io_same_device=False, weights_map=weights,
            offload_buffers=False, place_submodules=True,
        )  # fmt: skip

    def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        self.weights_map.arrive()
        return super().pre_forward(module, *args, **kwargs)


def _skip_meta(original: Callable[..., Any], fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Any:
    return original(lambda t: t if t.is_meta else fn(t), recurse)


def _hook_of(module: nn.Module) -> Any:
    hook = getattr(module, "_hf_hook", None)
    return hook if hook is not None and isinstance(getattr(hook, "weights_map", None), HostWeights) else None
