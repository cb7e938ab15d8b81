"""Pruning, usable without Lightning: structural (layers physically shrink) and masked (bool masks, no copies).

Structural pruning uses Torch-Pruning's dependency graph, so coupled layers (a residual stream, the fused QKV of an
attention block and its projection, norm layers, embeddings) shrink together and the model still runs. Every pruning
step is recorded as plain data (module name, pruning function, channel indices): replaying the record on a fresh
module rebuilds the pruned shapes, so checkpoints hold tensors only and load with ``torch.load(weights_only=True)``.

Masked (unstructured) pruning keeps one ``bool`` mask per pruned weight and zeroes the weight in place after every
optimizer step: no ``weight_orig``, no float mask. It does not cut training memory; structural pruning does.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import nn

Criterion = Literal["magnitude", "random"]
CRITERIA: tuple[str, ...] = ("magnitude", "random")
PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)  # masked pruning: their weights
ROOTS = (*PRUNABLE, nn.Embedding, nn.MultiheadAttention)  # structural pruning: their output channels / widths
Op = dict[str, Any]  # {"module": name, "fn": "prune_out_channels" | "prune_in_channels" | ..., "idxs": [int, ...]}


def check_criterion(criterion: str) -> None:
    """Raise a ``ValueError`` naming the allowed criteria unless ``criterion`` is one."""
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {', '.join(map(repr, CRITERIA))}, got {criterion!r}")


def output_layers(model: nn.Module, example_inputs: Any) -> list[str]:
    """Names of the layers whose output is the model's output (never pruned: they define what the model predicts).

    Example:
        >>> output_layers(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), torch.zeros(1, 4))
        ['2']

    """
    outputs: dict[int, str] = {}
    last: list[str] = []
    names = {module: name for name, module in model.named_modules()}

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor) and any(True for _ in module.parameters(recurse=False)):
            outputs[id(output)] = names[module]
            last.append(names[module])

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            result = _call(model, example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    found = [outputs[id(t)] for t in _flat_tensors(result) if id(t) in outputs]
    return found or last[-1:]


def prunable_layers(
    model: nn.Module,
    ignore: Sequence[str] = (),
    protected: Iterable[str] = (),
    types: tuple[type[nn.Module], ...] = PRUNABLE,
) -> dict[str, nn.Module]:
    """Layers of ``types`` (Linear/Conv) by name, minus ``protected`` and those matching an ``ignore`` pattern.

    Raises:
        ValueError: If an ``ignore`` pattern (fnmatch) matches no layer, or nothing is left to prune.

    """
    layers = {name: m for name, m in model.named_modules() if isinstance(m, types)}
    for pattern in ignore:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in layers):
            raise ValueError(f"ignore pattern {pattern!r} matches no prunable layer; layers: {', '.join(layers)}")
    kept = {
        name: m
        for name, m in layers.items()
        if name not in set(protected) and not any(fnmatch.fnmatchcase(name, p) for p in ignore)
    }
    if not kept:
        raise ValueError(
            f"nothing to prune: every prunable layer is the output layer or ignored ({', '.join(layers) or 'none'})"
        )
    return kept


# -- structural ---------------------------------------------------------------------------------------------------
def prune_structured(
    model: nn.Module,
    amount: float,
    example_inputs: Any,
    *,
    criterion: Criterion = "magnitude",
    ignore: Sequence[str] = (),
    global_pruning: bool = False,
    seed: int = 0,
    ratios: Mapping[str, float] | None = None,
) -> list[Op]:
    """Remove ``amount`` of the channels (neurons, head dimensions) of every prunable group, physically.

    The output layer keeps its outputs; attention blocks with a fused ``qkv`` Linear and an ``n_head`` /
    ``num_heads`` attribute keep their head count (head dimensions shrink), and ``nn.MultiheadAttention`` is handled
    by Torch-Pruning. Parameters are replaced: an optimizer built before must be rebuilt. ``ratios`` (layer name ->
    fraction of its current channels) overrides ``amount`` per layer (local pruning only).

    Returns:
        The pruning record (plain data) to replay with :func:`replay_structure`.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> ops = prune_structured(model, 0.5, torch.zeros(1, 4))
        >>> model[0].out_features, model[2].in_features, model[2].out_features
        (4, 4, 2)

    """
    import torch_pruning as tp

    check_criterion(criterion)
    if not 0.0 <= amount < 1.0:
        raise ValueError(f"amount must be in [0, 1), got {amount!r}")
    if amount == 0.0:
        return []
    protected = output_layers(model, example_inputs)
    layers = prunable_layers(model, ignore, protected, ROOTS)
    importance = tp.importance.RandomImportance() if criterion == "random" else tp.importance.GroupMagnitudeImportance()
    heads = {m.qkv: _heads(m) for m in model.modules() if isinstance(getattr(m, "qkv", None), nn.Linear) and _heads(m)}
    names = {m: n for n, m in model.named_modules()}
    ignored = [m for n, m in model.named_modules() if isinstance(m, ROOTS) and n not in layers]
    with torch.random.fork_rng(devices=[]), _keep_modes(model):
        torch.manual_seed(seed)
        pruner = tp.pruner.MetaPruner(
            model,
            example_inputs,
            importance=importance,
            pruning_ratio=amount,
            global_pruning=global_pruning,
            ignored_layers=ignored,
            root_module_types=list(ROOTS),
            pruning_ratio_dict=None if global_pruning or not ratios else {layers[n]: r for n, r in ratios.items()},
            num_heads=heads,
            prune_head_dims=True,
            prune_num_heads=False,
        )
        ops = []
        for group in pruner.step(interactive=True):
            root = group[0]
            ops.append(
                {"module": names[root.dep.target.module], "fn": root.dep.handler.__name__, "idxs": _ints(root.idxs)}
            )
            group.prune()
    return ops


def replay_structure(model: nn.Module, ops: Sequence[Op], example_inputs: Any) -> None:
    """Apply a pruning record to a module of the original shapes: afterwards its ``state_dict`` shapes match."""
    import torch_pruning as tp

    if not ops:
        return
    with _keep_modes(model):
        graph = tp.DependencyGraph().build_dependency(model, example_inputs)
    modules = dict(model.named_modules())
    for op in ops:
        module = modules[op["module"]]
        handler = getattr(graph.get_pruner_of_module(module), op["fn"])
        graph.get_pruning_group(module, handler, list(op["idxs"])).prune()


@contextmanager
def _keep_modes(model: nn.Module) -> Iterator[None]:
    """Torch-Pruning traces in eval mode: put every module's train/eval flag back afterwards."""
    modes = {m: m.training for m in model.modules()}
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training


def channels(model: nn.Module) -> dict[str, int]:
    """Output channels (features, embedding width) of every layer structural pruning starts from, by name."""
    widths = {nn.Linear: "out_features", nn.Embedding: "embedding_dim", nn.MultiheadAttention: "embed_dim"}
    return {
        name: getattr(m, next((a for t, a in widths.items() if isinstance(m, t)), "out_channels"))
        for name, m in model.named_modules()
        if isinstance(m, ROOTS)
    }


def keep_ratios(original: Mapping[str, int], current: Mapping[str, int], fraction: float) -> dict[str, float]:
    """Per-layer ratios of the *current* channels to remove so that ``round(original x (1 - fraction))`` remain.

    Torch-Pruning keeps ``int(current x (1 - ratio))``: aiming at the kept count plus one half makes that exact, so
    pruning in several steps ends where one step would.

    Example:
        >>> keep_ratios({"a": 64}, {"a": 45}, 0.5)
        {'a': 0.2777777777777778}

    """
    ratios = {}
    for name, now in current.items():
        keep = round(original[name] * (1.0 - fraction))
        ratios[name] = min(max(1.0 - (keep + 0.5) / now, 0.0), 0.999) if now else 0.0
    return ratios


def _heads(module: nn.Module) -> int | None:
    heads = getattr(module, "n_head", None) or getattr(module, "num_heads", None)
    return heads if isinstance(heads, int) else None


def _ints(idxs: Iterable[Any]) -> list[int]:
    return [int(getattr(i, "idx", i)) for i in idxs]


# -- masked -------------------------------------------------------------------------------------------------------
def update_masks(
    layers: Mapping[str, nn.Module],
    sparsity: float,
    masks: Mapping[str, torch.Tensor] | None = None,
    *,
    criterion: Criterion = "magnitude",
    scope: Literal["layer", "global"] = "layer",
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Bool masks (``True`` = kept) over the layers' weights with ``sparsity`` of them pruned.

    Weights already pruned stay pruned (they are ranked first). Biases are never masked: a bias is one number per
    output, and removing an output is what structural pruning is for.

    Example:
        >>> layer = nn.Linear(4, 4)
        >>> masks = update_masks({"l": layer}, 0.5)
        >>> int(masks["l"].sum()), masks["l"].dtype
        (8, torch.bool)

    """
    check_criterion(criterion)
    masks = dict(masks or {})
    scores = {}
    for name, layer in layers.items():
        weight = layer.weight.detach()
        if criterion == "random":
            score = torch.rand(weight.shape, generator=generator).to(weight.device)
        else:
            score = weight.abs().float()
        if name in masks:
            score = score.masked_fill(~masks[name], -math.inf)
        scores[name] = score
    if scope == "global":
        flat = torch.cat([s.flatten() for s in scores.values()])
        k = round(sparsity * flat.numel())
        threshold = torch.kthvalue(flat.cpu(), k).values if k > 0 else None
        for name, score in scores.items():
            masks[name] = score > threshold if threshold is not None else torch.ones_like(score, dtype=torch.bool)
        return masks
    for name, score in scores.items():
        k = round(sparsity * score.numel())
        keep = torch.ones(score.numel(), dtype=torch.bool, device=score.device)
        if k > 0:
            keep[score.flatten().argsort()[:k]] = False
        masks[name] = keep.view(score.shape)
    return masks


@torch.no_grad()
def apply_masks(layers: Mapping[str, nn.Module], masks: Mapping[str, torch.Tensor]) -> None:
    """Zero the pruned weights in place."""
    for name, mask in masks.items():
        layers[name].weight.mul_(mask)  # in place, no temporary (``masked_fill_(~mask)`` would allocate one)


# -- schedules ----------------------------------------------------------------------------------------------------
def cubic_sparsity(step: int, final: float, start: int, end: int, frequency: int) -> float:
    """Zhu & Gupta (2017): ``s_t = s_f * (1 - (1 - (t - t0) / (n dt))^3)`` at steps ``t0, t0 + dt, ... t0 + n dt``.

    Between pruning steps the value of the last one holds; before ``start`` it is 0, after ``end`` ``final``.

    Example:
        >>> [round(cubic_sparsity(t, 0.5, 0, 100, 25), 3) for t in (0, 30, 50, 100, 200)]
        [0.0, 0.289, 0.438, 0.5, 0.5]

    """
    if step < start:
        return 0.0
    if step >= end:
        return final
    last = start + (step - start) // frequency * frequency
    return final * (1.0 - (1.0 - (last - start) / (end - start)) ** 3)


# -- example inputs -----------------------------------------------------------------------------------------------
def example_spec(inputs: Any) -> Any:
    """Shapes and dtypes of example inputs, as plain data (for a checkpoint)."""
    if isinstance(inputs, torch.Tensor):
        return {"shape": list(inputs.shape), "dtype": str(inputs.dtype).removeprefix("torch.")}
    if isinstance(inputs, list | tuple):
        return [example_spec(x) for x in inputs]
    raise TypeError(f"example inputs must be a tensor or a tuple/list of tensors, got {type(inputs).__name__}")


def example_from_spec(spec: Any, device: torch.device | str = "cpu") -> Any:
    """Zeros of the recorded shapes and dtypes (enough to trace a model's structure)."""
    if isinstance(spec, dict):
        return torch.zeros(spec["shape"], dtype=getattr(torch, spec["dtype"]), device=device)
    return tuple(example_from_spec(s, device) for s in spec)


def _call(model: nn.Module, inputs: Any) -> Any:
    return model(*inputs) if isinstance(inputs, tuple) else model(inputs)


def _flat_tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in _flat_tensors(v)]
    if isinstance(value, list | tuple):
        return [t for v in value for t in _flat_tensors(v)]
    return []


def state_bytes(model: nn.Module, optimizers: Sequence[torch.optim.Optimizer] = ()) -> dict[str, int]:
    """Bytes of parameters, gradients and optimizer state, counted from the tensors."""
    params = [p for p in model.parameters()]
    state = [t for opt in optimizers for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    return {
        "parameters": sum(p.numel() * p.element_size() for p in params),
        "gradients": sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None),
        "optimizer": sum(t.numel() * t.element_size() for t in state),
    }
