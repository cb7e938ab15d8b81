"""Pruning, usable without Lightning: structural (layers physically shrink) and masked (bool masks, no copies).

Structural pruning uses Torch-Pruning's dependency graph, so coupled layers (a residual stream, the fused QKV of an
attention block and its projection, norm layers, embeddings) shrink together and the model still runs. Every pruning
step is recorded as plain data (module name, pruning function, channel indices): replaying the record on a fresh
module rebuilds the pruned shapes, so checkpoints hold tensors only and load with ``torch.load(weights_only=True)``.

Masked (unstructured) pruning keeps one ``bool`` mask per pruned weight and zeroes the weight in place after every
optimizer step: no ``weight_orig``, no float mask. It does not cut training memory; structural pruning does.
"""

from __future__ import annotations

import copy
import fnmatch
import math
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info
from lightning_utilities.core.apply_func import apply_to_collection
from torch import nn

from lightning_lowvram._files import load_weights_only
from lightning_lowvram._values import zero_of, zeros_list
from lightning_lowvram.cores.batches import tensors_in
from lightning_lowvram.cores.pruning_units import (
    Unit,
    conform_to_state_dict,
    find_units,
    is_conv1d,
    layout_refusals,
    prune_units,
    sync_configs,
    unit_layers,
    unknown_attention,
)

Criterion = Literal["magnitude", "random"]
CRITERIA: tuple[str, ...] = ("magnitude", "random")
PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)  # masked pruning: their weights
ROOTS = (*PRUNABLE, nn.Embedding, nn.MultiheadAttention)  # structural pruning: their output channels / widths
Forward = Callable[[nn.Module, Any], Any]  # (model, example inputs) -> outputs or loss
Op = dict[str, Any]  # {"module": name, "fn": "prune_out_channels" | "prune_in_channels" | ..., "idxs": [int, ...]}


def check_criterion(criterion: str) -> None:
    """Raise a ``ValueError`` naming the allowed criteria unless ``criterion`` is one."""
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {', '.join(map(repr, CRITERIA))}, got {criterion!r}")


def output_layers(model: nn.Module, example_inputs: Any, forward: Forward | None = None) -> list[str]:
    """Names of the layers nearest to the model's outputs (never pruned: they define what the model predicts).

    ``forward(model, example_inputs)`` runs the model (default: ``model(*inputs)``); it may return the loss (a
    LightningModule's ``training_step``): the layers are found by walking the autograd graph back from what it returns.

    Example:
        >>> output_layers(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), torch.zeros(1, 4))
        ['2']

    """
    produced: dict[Any, str] = {}
    last: list[str] = []
    names = {module: name for name, module in model.named_modules()}

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor) and output.grad_fn is not None:
            produced[output.grad_fn] = names[module]
            last.append(names[module])

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if not list(m.children()) and any(True for _ in m.parameters(recurse=False))
    ]
    try:
        with torch.enable_grad(), _keep_modes(model):
            result = (forward or call)(model, example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    found: list[str] = []
    for tensor in tensors_in(result):
        name = _nearest(tensor.grad_fn, produced)
        if name is not None and name not in found:
            found.append(name)
    return found or last[-1:]


def _nearest(node: Any, produced: Mapping[Any, str]) -> str | None:
    """Breadth-first from an output's grad_fn: the first node a layer produced."""
    seen, frontier = set(), [node]
    while frontier:
        nxt = []
        for fn in frontier:
            if fn is None or fn in seen:
                continue
            seen.add(fn)
            if fn in produced:
                return produced[fn]
            nxt += [f for f, _ in fn.next_functions]
        frontier = nxt
    return None


def prunable_layers(
    model: nn.Module,
    ignore: Sequence[str] = (),
    protected: Iterable[str] = (),
    types: tuple[type[nn.Module], ...] = PRUNABLE,
) -> dict[str, nn.Module]:
    """Layers of ``types`` (Linear/Conv; HF ``Conv1D`` counts as Linear) by name, minus ``protected`` and ``ignore``.

    Raises:
        ValueError: If an ``ignore`` pattern (fnmatch) matches no layer, or nothing is left to prune.

    """
    conv1d = nn.Linear in types  # HF's Conv1D (GPT-2) is a Linear stored transposed
    layers = {name: m for name, m in model.named_modules() if isinstance(m, types) or (conv1d and is_conv1d(m))}
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
    forward: Forward | None = None,
    criterion: Criterion = "magnitude",
    ignore: Sequence[str] = (),
    global_pruning: bool = False,
    seed: int = 0,
    ratios: Mapping[str, float] | None = None,
) -> list[Op]:
    """Remove ``amount`` of the channels (neurons, heads, head dimensions) of every prunable group, physically.

    Transformer blocks of a known layout (:mod:`lightning_lowvram.cores.pruning_units`: Hugging Face GPT-2, Llama-style,
    BERT-style) lose whole attention heads (whole key/value groups under GQA) and MLP channels; their hidden size,
    embeddings and output head are kept. Other models go through Torch-Pruning's dependency graph, traced by
    ``forward(model, example_inputs)`` (default ``model(*example_inputs)``; a LightningModule's ``training_step`` on
    a dict batch works): the output layer keeps its outputs, fused-``qkv`` attention with an ``n_head``/``num_heads``
    attribute keeps its head count, ``nn.MultiheadAttention`` is handled by Torch-Pruning. Parameters are replaced:
    an optimizer built before must be rebuilt. ``ratios`` (layer or block name -> fraction of its current channels)
    overrides ``amount`` per layer (local pruning only).

    Returns:
        The pruning record (plain data) to replay with :func:`replay_structure`.

    Raises:
        ValueError: For an attention layout this pruner does not know (naming the module), or ``global_pruning`` on
            transformer blocks (a Hugging Face config describes one head count for every layer).

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> ops = prune_structured(model, 0.5, torch.zeros(1, 4))
        >>> model[0].out_features, model[2].in_features, model[2].out_features
        (4, 4, 2)

    """
    check_criterion(criterion)
    if not 0.0 <= amount < 1.0:
        raise ValueError(f"amount must be in [0, 1), got {amount!r}")
    if amount == 0.0 and not ratios:
        return []
    units = check_layouts(model, ignore, global_pruning)
    if units:
        check_runs(model, amount, example_inputs, forward, ignore, ratios)
        ops = prune_units(units, amount, ratios or {}, criterion, seed)
        sync_configs(model, units)
        return ops
    return _prune_with_graph(model, amount, example_inputs, forward, criterion, ignore, global_pruning, seed, ratios)


def _prune_with_graph(
    model: nn.Module,
    amount: float,
    example_inputs: Any,
    forward: Forward | None,
    criterion: Criterion,
    ignore: Sequence[str],
    global_pruning: bool,
    seed: int,
    ratios: Mapping[str, float] | None,
) -> list[Op]:
    import torch_pruning as tp

    protected = output_layers(model, example_inputs, forward)
    layers = prunable_layers(model, ignore, protected, ROOTS)
    importance = tp.importance.RandomImportance() if criterion == "random" else tp.importance.GroupMagnitudeImportance()
    heads = {m.qkv: _heads(m) for m in model.modules() if isinstance(getattr(m, "qkv", None), nn.Linear) and _heads(m)}
    names = {m: n for n, m in model.named_modules()}
    ignored = [m for n, m in model.named_modules() if isinstance(m, ROOTS) and n not in layers]
    with torch.random.fork_rng(devices=[]), _keep_modes(model), torch.enable_grad():
        torch.manual_seed(seed)
        pruner = tp.pruner.MetaPruner(
            model,
            example_inputs,
            forward_fn=forward,
            importance=importance,
            pruning_ratio=amount,
            global_pruning=global_pruning,
            ignored_layers=ignored,
            root_module_types=list(ROOTS),
            pruning_ratio_dict=None
            if global_pruning or not ratios
            else {layers[n]: r for n, r in ratios.items() if n in layers},
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


def check_layouts(model: nn.Module, ignore: Sequence[str] = (), global_pruning: bool = False) -> list[Unit]:
    """The transformer blocks to prune by heads and channels; raise for what structured pruning cannot handle.

    Raises:
        ValueError: For a module named like an attention whose layout is not known (naming it), or
            ``global_pruning`` on transformer blocks.

    """
    units = transformer_units(model, ignore)
    if any(_fused_qkv(m) for m in model.modules()):
        units = []  # the dependency graph prunes fused-qkv attention, and the MLPs beside it with it
    unknown = unknown_attention(model, units, lambda m: _handled_attention(m) or _matches(model, m, ignore))
    if unknown:
        reasons = layout_refusals(model)
        unknown = [f"{u}: {reasons[n]}" if (n := u.split(" ", 1)[0]) in reasons else u for u in unknown]
        raise ValueError(
            f"structured pruning does not know the attention layout of {', '.join(unknown)}: pass "
            "ignore=['<its name>*'] to leave it alone, or method='unstructured' (known layouts: "
            "lightning_lowvram.cores.pruning_units)"
        )
    if units and global_pruning:
        raise ValueError(
            "scope='global' would leave transformer layers with different head counts, which a Hugging Face "
            "config cannot describe: use scope='layer'"
        )
    return units


def check_runs(
    model: nn.Module,
    amount: float,
    example_inputs: Any,
    forward: Forward | None = None,
    ignore: Sequence[str] = (),
    ratios: Mapping[str, float] | None = None,
) -> bool:
    """Prune a copy of ``model`` on the meta device (no weights copied) and run it: raise if it no longer runs.

    This is what keeps a layout the matchers misread (a tensor sized by the heads they did not take along) from
    breaking a model: the error comes before any weight changes.

    Returns:
        Whether the check ran: ``False`` where the unpruned copy does not run on the meta device either (a forward
        whose shapes depend on values), so nothing could be checked (said once a model).

    Raises:
        ValueError: Naming the blocks and what the pruned copy raised.

    """
    twin = _meta_twin(model)
    inputs = apply_to_collection(example_inputs, torch.Tensor, lambda t: t.to("meta"))
    run = forward or call
    try:
        with torch.no_grad(), _MetaValues():
            run(twin, inputs)
    except Exception:  # the unpruned copy does not run on meta: nothing to compare with
        if model not in _UNCHECKED:  # said once a model, not at every pruning step
            _UNCHECKED.add(model)
            rank_zero_info(
                f"structured pruning: {type(model).__name__} does not run on the meta device, so the pruned model's "
                "shapes are not checked before its weights change"
            )
        return False
    units = transformer_units(twin, ignore)
    prune_units(units, amount, ratios or {}, "random")
    sync_configs(twin, units)
    try:
        with torch.no_grad(), _MetaValues():
            run(twin, inputs)
    except Exception as exc:
        kinds = sorted({type(u.module).__name__ for u in units})
        first = (str(exc).splitlines() or [""])[0][:200]
        raise ValueError(
            f"structured pruning at amount={amount} would leave the model unable to run ({type(exc).__name__}: "
            f"{first}): a tensor of {', '.join(kinds)} is sized by its heads or channels in a "
            "way the layouts in lightning_lowvram.cores.pruning_units do not know. Pass ignore=['<block name>*'] "
            "to leave those blocks whole, or method='unstructured'"
        ) from exc
    return True


_READS = (torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__float__, torch.Tensor.__int__, torch.Tensor.__index__)
_TESTS = (torch.Tensor.__bool__, torch.Tensor.__contains__)


_UNCHECKED: weakref.WeakSet[nn.Module] = weakref.WeakSet()


class _MetaValues(torch.overrides.TorchFunctionMode):
    """A meta tensor's value read (``item``, ``bool``, ``in``) gives zero or ``False``: only the shapes are checked.

    (Transformers reads mask values to pick its fast paths; the branch taken does not change any weight's shape.
    The planner's ``ScalarPlaceholders`` leaves ``bool`` alone because a trace must take the real branch; a shape
    check need not.)
    """

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if (func in _READS or func in _TESTS) and args and isinstance(args[0], torch.Tensor) and args[0].is_meta:
            value = False if func in _TESTS else zero_of(args[0])
            return zeros_list(tuple(args[0].shape), value) if func is torch.Tensor.tolist else value
        return func(*args, **(kwargs or {}))


def _meta_twin(model: nn.Module) -> nn.Module:
    """A deep copy whose parameters and buffers are meta tensors of the same shapes (nothing is copied).

    A LightningModule's trainer (and so its optimizers, loaders and loggers) is not copied: the twin has none.
    """
    memo: dict[int, Any] = {id(t): None for m in model.modules() if (t := getattr(m, "_trainer", None)) is not None}
    for tensor in (*model.parameters(), *model.buffers()):
        empty = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = nn.Parameter(empty, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else empty
    return copy.deepcopy(model, memo)


def transformer_units(model: nn.Module, ignore: Sequence[str] = ()) -> list[Unit]:
    """The transformer blocks :func:`prune_structured` prunes by heads and channels, minus ``ignore`` matches."""
    names = {m: n for n, m in model.named_modules()}
    return [
        u
        for u in find_units(model)
        if not any(
            fnmatch.fnmatchcase(n, p) for n in (u.name, *(names[layer] for layer in unit_layers([u]))) for p in ignore
        )
    ]


def _matches(model: nn.Module, module: nn.Module, ignore: Sequence[str]) -> bool:
    name = next(n for n, m in model.named_modules() if m is module)
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name + ".x", p) for p in ignore)


def _handled_attention(module: nn.Module) -> bool:
    """Attention Torch-Pruning handles: ``nn.MultiheadAttention`` and a fused ``qkv`` Linear with a head count."""
    return isinstance(module, nn.MultiheadAttention) or _fused_qkv(module)


def _fused_qkv(module: nn.Module) -> bool:
    return isinstance(getattr(module, "qkv", None), nn.Linear) and _heads(module) is not None


def replay_structure(model: nn.Module, ops: Sequence[Op], example_inputs: Any, forward: Forward | None = None) -> None:
    """Apply a pruning record to a module of the original shapes: afterwards its ``state_dict`` shapes match.

    (Loading a checkpoint needs no record: :func:`lightning_lowvram.cores.pruning_units.conform_to_state_dict` takes the
    shapes from the checkpoint itself.)
    """
    import torch_pruning as tp

    unit_ops = [op for op in ops if op["fn"] == "keep_groups"]
    graph_ops = [op for op in ops if op["fn"] != "keep_groups"]
    if unit_ops:
        units = {u.name: u for u in find_units(model)}
        for op in unit_ops:
            units[op["module"]].keep(op["idxs"])
        sync_configs(model, units.values())
    if not graph_ops:
        return
    with _keep_modes(model), torch.enable_grad():
        graph = tp.DependencyGraph().build_dependency(model, example_inputs, forward_fn=forward)
    modules = dict(model.named_modules())
    for op in graph_ops:
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
    """Output channels of the layers structural pruning starts from and groups of the transformer blocks, by name."""
    widths = {nn.Linear: "out_features", nn.Embedding: "embedding_dim", nn.MultiheadAttention: "embed_dim"}
    found = {
        name: getattr(m, next((a for t, a in widths.items() if isinstance(m, t)), "out_channels"))
        for name, m in model.named_modules()
        if isinstance(m, ROOTS)
    }
    return found | {unit.name: unit.groups for unit in find_units(model)}


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


# -- helpers ------------------------------------------------------------------------------------------------------
def call(model: nn.Module, inputs: Any) -> Any:
    """``model(*inputs)`` for a tuple, ``model(**inputs)`` for a dict, else ``model(inputs)``."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(*inputs) if isinstance(inputs, tuple) else model(inputs)


def state_bytes(model: nn.Module, optimizers: Sequence[torch.optim.Optimizer] = ()) -> dict[str, int]:
    """Bytes of parameters, gradients and optimizer state, counted from the tensors."""
    params = [p for p in model.parameters()]
    state = [t for opt in optimizers for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    return {
        "parameters": sum(p.numel() * p.element_size() for p in params),
        "gradients": sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None),
        "optimizer": sum(t.numel() * t.element_size() for t in state),
    }


def load_pruned(module: nn.Module, checkpoint_path: str | Path) -> nn.Module:
    """Give a fresh ``module`` the shapes of a checkpoint written while PruningCallback ran, then load it.

    Works for a checkpoint from any point of the schedule (before, during or after pruning). The checkpoint is read
    with ``torch.load(weights_only=True)``: it holds tensors and plain data, no pickled module. Masks of an
    unfinished unstructured run are applied.

    Raises:
        ValueError: If the file is not a Lightning checkpoint with PruningCallback state, or ``module`` is not the
            architecture it was pruned from (naming the first layer or tensor that differs).

    Example:
        >>> # model = load_pruned(DigitsMLP(hidden=128), "last.ckpt")

    """
    checkpoint = load_weights_only(checkpoint_path, "checkpoint")
    states = [v for k, v in (checkpoint.get("callbacks") or {}).items() if k.startswith("PruningCallback")]
    if "state_dict" not in checkpoint or not states:
        raise ValueError(f"{checkpoint_path}: not a Lightning checkpoint written while PruningCallback ran")
    state = checkpoint["state_dict"]
    for recorded in states:
        here = channels(module)
        for name, width in recorded["original_channels"].items():
            if here.get(name) != width:
                raise ValueError(
                    f"{checkpoint_path} was pruned from another model: {name!r} started with {width} channels there, "
                    f"{here.get(name, 'no such layer')} here"
                )
    keys, saved = set(module.state_dict()), set(state)
    if keys != saved:
        first = sorted(keys ^ saved)[0]
        where = "the checkpoint" if first in saved else type(module).__name__
        raise ValueError(f"{checkpoint_path} was saved from another model: {first!r} is only in {where}")
    conform_to_state_dict(module, state)
    module.load_state_dict(state)
    layers = dict(module.named_modules())
    for recorded in states:
        apply_masks({name: layers[name] for name in recorded["masks"]}, recorded["masks"])
    return module
