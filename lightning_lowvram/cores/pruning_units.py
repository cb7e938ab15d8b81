"""Structured pruning of transformer blocks by whole attention heads and MLP channels, usable without Lightning.

A *unit* is one attention block or one MLP block of a transformer; pruning keeps the model's hidden size (so
embeddings, norms, tied output heads and the residual stream stay as they are) and removes:

- attention heads whole (``head_dim`` kept, so RoPE and the softmax scale stay valid); with grouped-query attention a
  whole key/value head goes together with the query heads that share it;
- MLP channels (the intermediate width), gated or not.

Layouts are recognised by structure, not by class (a registry of matchers, one per layout):

======================  ==========================================================  ==========================
layout                  modules                                                     examples
======================  ==========================================================  ==========================
separate projections    ``q_proj``/``k_proj``/``v_proj`` + ``o_proj``/``out_proj``   Llama, Mistral, Qwen2, OPT,
                        or ``q/k/v/o``, a head size (``head_dim``,                  BART, T5
                        ``key_value_proj_dim``)
BERT self-attention     ``self.query/key/value`` (``attention_head_size``) +         BERT, RoBERTa
                        ``output.dense``
fused GPT-2 attention   ``c_attn`` + ``c_proj`` (HF ``Conv1D``), ``split_size``       GPT-2
MLP                     a block whose direct Linear children are one or two up      Llama, GPT-J, OPT, T5,
                        projections (width -> F) and one down (F -> width)          ``nn.Transformer*Layer``
GPT-2 MLP               ``c_fc`` + ``c_proj`` (``Conv1D``)                            GPT-2
BERT feed-forward       ``intermediate.dense`` + ``output.dense``                     BERT, RoBERTa
======================  ==========================================================  ==========================

Tensors of an attention block sized by its heads go with the heads (attention sinks, a q/k norm over the heads'
width, a gate's rows, a relative position bias's columns), and the int attributes holding head counts and widths
are rewritten (``num_heads``, ``embed_dim``, ``inner_dim``, ...). Blocks that pass a position bias on to the next
(T5: block 0 computes it for its stack) are *tied*: one unit per stack and role, so every block keeps the same heads.
A layout these rules misread is caught by running the pruned copy on the meta device before any weight changes
(:func:`lightning_lowvram.cores.pruning.check_runs`). On transformers' own families
(``tests/real_models/test_pruning_families.py``): 144 prune into a model that runs, 27 are refused by name.

After pruning, the heads/widths attributes the modules' forwards read are rewritten, and a Hugging Face config is
updated where it can describe the result (``intermediate_size``/``n_inner`` always; ``num_attention_heads`` and
``num_key_value_heads`` where the config stores ``head_dim``, as Llama's does; GPT-2 and BERT derive the head size
from ``hidden_size / num_attention_heads``, so their head counts are left and :func:`conform_to_state_dict` rebuilds
shapes from a checkpoint instead).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

Site = tuple[nn.Module, str, int, torch.Tensor]  # (layer, "weight" | "bias", dim, group id of each index along dim)


@dataclass
class Unit:
    """One prunable attention or MLP block: the tensors its groups span and how to rewrite its attributes."""

    name: str
    kind: str  # "attention" | "mlp"
    module: nn.Module
    groups: int  # heads (key/value heads under GQA) or channels
    sites: list[Site]
    finish: Callable[[int], None] = field(repr=False)  # rewrite attributes for a new group count
    heads_per_group: int = 1  # query heads per key/value head (grouped-query attention)
    kv_heads: bool = False  # the layout has its own key/value head count
    tie: str | None = None  # units of one tie (T5's blocks sharing a position bias) keep the same heads, as one unit
    modules: tuple[nn.Module, ...] = ()  # every block the unit spans (``module`` alone unless tied)

    def scores(self, criterion: str, generator: torch.Generator | None = None) -> torch.Tensor:
        """Importance per group: L2 norm of every weight the group owns (``magnitude``) or uniform noise."""
        if criterion == "random":
            return torch.rand(self.groups, generator=generator)
        total = torch.zeros(self.groups, dtype=torch.float64)
        for layer, attr, dim, ids in self.sites:
            value = getattr(layer, attr).detach().double()
            others = [d for d in range(value.dim()) if d != dim]
            per_index = value.square().sum(dim=others) if others else value.square()
            total.index_add_(0, ids, per_index.cpu())
        return total.sqrt()

    def keep(self, kept: Iterable[int]) -> None:
        """Keep only the groups ``kept`` (in index order), replacing the parameters physically."""
        kept_t = torch.tensor(sorted(set(int(k) for k in kept)), dtype=torch.long)
        if len(kept_t) == 0:
            raise ValueError(f"pruning would remove every group of {self.name!r}")
        for layer, attr, dim, ids in self.sites:
            old = getattr(layer, attr)
            index = torch.isin(ids, kept_t).nonzero().flatten().to(old.device)
            new = nn.Parameter(old.detach().index_select(dim, index).contiguous(), requires_grad=old.requires_grad)
            setattr(layer, attr, new)
            _sync_layer(layer)
        self.finish(len(kept_t))

    def groups_now(self) -> int:
        """Groups the unit holds now, read from its first tensor (its group ids were taken at match time)."""
        layer, attr, dim, ids = self.sites[0]
        return getattr(layer, attr).shape[dim] * self.groups // len(ids)


def _sync_layer(layer: nn.Module) -> None:
    """Rewrite a Linear's or HF Conv1D's size attributes from its weight."""
    if isinstance(layer, nn.Linear):
        layer.out_features, layer.in_features = layer.weight.shape
    elif is_conv1d(layer):
        layer.nx, layer.nf = layer.weight.shape


def is_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2): a Linear whose weight is stored ``in x out`` (no transformers import)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def _linear(module: Any) -> bool:
    return isinstance(module, nn.Linear)


def _set(module: nn.Module, **values: int) -> None:
    for key, value in values.items():
        if isinstance(getattr(module, key, None), int):
            setattr(module, key, value)


def _head_ids(size: int, head_dim: int, per_group: int = 1, period: int | None = None) -> torch.Tensor:
    i = torch.arange(size)
    if period is not None:
        i = i % period
    return i // head_dim // per_group


def _sites(layers: Iterable[tuple[nn.Module, int, torch.Tensor]]) -> list[Site]:
    """(layer, dim of its *output* (0) or *input* (1) in nn.Linear terms, ids) -> sites incl. biases, Conv1D-aware."""
    sites: list[Site] = []
    for layer, dim, ids in layers:
        weight_dim = 1 - dim if is_conv1d(layer) else dim
        sites.append((layer, "weight", weight_dim, ids))
        if dim == 0 and getattr(layer, "bias", None) is not None:
            sites.append((layer, "bias", 0, ids))
    return sites


# -- matchers: module -> Unit | reason (str) | None --------------------------------------------------------------
# A matcher that finds the projections of a layout but cannot prune it returns the reason, named in the refusal.
_HEAD_DIM = ("head_dim", "attention_head_size", "key_value_proj_dim")
# int attributes that hold a head count or the heads' width (never a position count, a layer index, a head's size)
_COUNTS = re.compile(r"(^|_)(heads?|embed_dim|inner_dim|head_size|hidden_size|split_size|width|(q|k|v|kv|qk)_dim)$")


def _head_dim(m: nn.Module) -> tuple[str, int] | None:
    return next(((a, v) for a in _HEAD_DIM if isinstance(v := getattr(m, a, None), int) and v > 0), None)


def _per_head(
    m: nn.Module, holder: nn.Module, owned: set[int], hidden: int, sizes: Mapping[int, torch.Tensor | None]
) -> list[Site] | str:
    """Parameters of an attention block beyond its projections that are sized by its heads: they go with the heads.

    ``sizes`` maps a size (query heads, key/value heads, query width, key/value width) to the group id of each index,
    or ``None`` where two of those sizes coincide. Where the query width equals the model's width (``hidden``), a
    tensor of that size is read as the heads' only in the module that holds the query projection or its direct
    children (OLMo-2's ``q_norm``), and as the model's width elsewhere (BERT's ``output.LayerNorm``, Megatron-BERT's
    input ``ln``) and in a Linear's inputs. The rules, checked on
    every family ``transformers`` ships (``tests/real_models/test_pruning_families.py``): a per-head vector
    (attention sinks, a relative position bias's columns), a norm over the query/key width and a Linear's rows or
    inputs sized by the heads go with the heads; any other tensor sized by the heads is refused with its name. What
    these rules misread, the pruned copy's forward on the meta device catches before any weight changes
    (:func:`lightning_lowvram.cores.pruning.check_runs`).
    """
    near = {id(holder), *(id(c) for c in holder.children())}
    sites: list[Site] = []
    for sub_name, sub in m.named_modules():
        if id(sub) in owned:
            continue
        for attr, tensor in sub.named_parameters(recurse=False):
            dims = [(d, n) for d, n in enumerate(tensor.shape) if n in sizes and (n != hidden or id(sub) in near)]
            if isinstance(sub, nn.Linear):
                dims = [(d, n) for d, n in dims if d == 0 or n != hidden]  # its inputs of the model's width
            elif isinstance(sub, nn.Embedding):
                dims = [(d, n) for d, n in dims if d == 1]  # a relative position bias: a column per head
            elif dims and tensor.dim() > 1:
                return f"its {sub_name or 'own'} {attr} {tuple(tensor.shape)} is sized by its heads"
            for dim, size in dims:
                ids = sizes[size]
                if ids is None:
                    return f"its {sub_name or 'own'} {attr} {tuple(tensor.shape)} matches two head sizes"
                sites.append((sub, attr, dim, ids))
    return sites


def _rewrite_counts(m: nn.Module, owned: set[int], old: Mapping[int, int], keep: str) -> None:
    """Rewrite the int attributes that held a head count or width (``num_heads``, ``embed_dim``, ...) to new ones."""
    for sub in m.modules():
        if id(sub) in owned and isinstance(sub, nn.Linear):
            continue
        for key, value in list(vars(sub).items()):
            if type(value) is int and key != keep and key not in _HEAD_DIM and _COUNTS.search(key) and value in old:
                setattr(sub, key, old[value])
        if not isinstance(sub, nn.Linear):
            sync_layer_attributes(sub)


def _attention(name: str, m: nn.Module, projections: tuple[Any, Any, Any, Any], holder: nn.Module) -> Unit | str | None:
    """Separate query/key/value/output projections of one head size (``holder`` has the head dim and counts)."""
    q, k, v, o = projections
    found = _head_dim(holder)
    if not (all(_linear(x) for x in projections) and found):
        return None
    keep, hd = found
    whole = not (q.out_features % hd or k.out_features % hd)
    if not whole or k.out_features != v.out_features or o.in_features != q.out_features:
        return "its projections are not whole heads of its head size"
    n_q, n_kv = q.out_features // hd, k.out_features // hd
    if n_q % n_kv:
        return "its query heads are not a multiple of its key/value heads"
    rep, hidden = n_q // n_kv, q.in_features
    q_ids, kv_ids = _head_ids(q.out_features, hd, rep), _head_ids(k.out_features, hd)
    sizes: dict[int, torch.Tensor | None] = {}
    heads = ((n_q, torch.arange(n_q) // rep), (n_kv, torch.arange(n_kv)), (n_q * hd, q_ids), (n_kv * hd, kv_ids))
    for size, ids in heads:
        sizes[size] = ids if size not in sizes or torch.equal(sizes[size], ids) else None  # type: ignore[arg-type]
    owned = {id(x) for x in projections}
    extras = _per_head(m, holder, owned, hidden, sizes)
    if isinstance(extras, str):
        return extras

    def finish(groups: int) -> None:
        new = {n_q: groups * rep, n_kv: groups, n_q * hd: groups * rep * hd, n_kv * hd: groups * hd}
        _rewrite_counts(m, owned, {old: new[old] for old in (n_kv * hd, n_q * hd, n_kv, n_q)}, keep)

    sites = _sites([(q, 0, q_ids), (k, 0, kv_ids), (v, 0, kv_ids), (o, 1, _head_ids(o.in_features, hd, rep))])
    tie = re.sub(r"(?<=\.)\d+(?=\.|$)", "*", name) if _passes_position_bias(m) else None
    return Unit(name, "attention", m, n_kv, sites + extras, finish, rep, rep > 1, tie=tie)


def _passes_position_bias(m: nn.Module) -> bool:
    """T5's layout: one block computes the position bias (its heads' columns) and hands it to the next blocks."""
    try:
        return "position_bias" in inspect.signature(m.forward).parameters
    except (TypeError, ValueError):
        return False


def _separate_qkv(name: str, m: nn.Module) -> Unit | str | None:
    """``q_proj``/``k_proj``/``v_proj`` + ``o_proj``/``out_proj`` (Llama, OPT, ...) or ``q/k/v/o`` (T5)."""
    for names in (("q_proj", "k_proj", "v_proj", "o_proj"), ("q_proj", "k_proj", "v_proj", "out_proj"), tuple("qkvo")):
        projections = tuple(getattr(m, a, None) for a in names)
        if all(_linear(x) for x in projections):
            return _attention(name, m, projections, m)  # type: ignore[arg-type]
    return None


def _bert_attention(name: str, m: nn.Module) -> Unit | str | None:
    s, out = getattr(m, "self", None), getattr(getattr(m, "output", None), "dense", None)
    if s is None:
        return None
    return _attention(name, m, (*(getattr(s, a, None) for a in ("query", "key", "value")), out), s)  # type: ignore[arg-type]


def _gpt2_attention(name: str, m: nn.Module) -> Unit | str | None:
    c_attn, c_proj = getattr(m, "c_attn", None), getattr(m, "c_proj", None)
    hd, split = getattr(m, "head_dim", None), getattr(m, "split_size", None)
    if not (is_conv1d(c_attn) and is_conv1d(c_proj) and isinstance(hd, int) and isinstance(split, int)):
        return None
    if getattr(m, "is_cross_attention", False) or c_attn.nf != 3 * split:
        return "its cross-attention computes the query apart (q_attn) from the keys and values (c_attn)"

    def finish(groups: int) -> None:
        _set(m, num_heads=groups, split_size=groups * hd)

    sites = _sites([(c_attn, 0, _head_ids(c_attn.nf, hd, period=split)), (c_proj, 1, _head_ids(c_proj.nx, hd))])
    return Unit(name, "attention", m, split // hd, sites, finish)


def _channels(size: int) -> torch.Tensor:
    return torch.arange(size)


def _mlp(name: str, m: nn.Module) -> Unit | None:
    """An MLP by structure: its direct Linear children are one or two up projections (width -> F) and a down one.

    Gated (Llama's ``gate_proj``/``up_proj``/``down_proj``, T5's ``wi_0``/``wi_1``/``wo``) or not (``fc1``/``fc2``,
    ``c_fc``/``c_proj``, ``wi``/``wo``, ``linear1``/``linear2`` of ``nn.TransformerEncoderLayer``), whatever the
    names. Not matched: an attention (a head count, or named so) or a block with another direct tensor
    sized F (its pruning would need that tensor's rule).
    """
    linears = [c for c in m.children() if _linear(c)]
    heads = any(type(v) is int and "head" in k for k, v in vars(m).items())
    attention = heads or "attention" in type(m).__name__.lower()
    if len(linears) not in (2, 3) or attention:
        return None
    for down in reversed(linears):  # the down projection comes last (where every Linear is square)
        width, inner = down.out_features, down.in_features
        ups = [u for u in linears if u is not down]
        if all((u.in_features, u.out_features) == (width, inner) for u in ups):
            break
    else:
        return None
    leaves = [c for c in m.children() if not _linear(c) and not any(True for _ in c.children())]
    if inner != width and any(inner in p.shape for c in (m, *leaves) for p in c.parameters(recurse=c is not m)):
        return None  # (F equal to the width: those tensors are read as the model's width, as in attention blocks)
    ids = _channels(inner)
    sites = _sites([*((u, 0, ids) for u in ups), (down, 1, ids)])
    return Unit(name, "mlp", m, inner, sites, lambda n: _set(m, intermediate_size=n))


def _gpt2_mlp(name: str, m: nn.Module) -> Unit | None:
    c_fc, c_proj = getattr(m, "c_fc", None), getattr(m, "c_proj", None)
    if not (is_conv1d(c_fc) and is_conv1d(c_proj)) or hasattr(m, "c_attn"):
        return None
    ids = _channels(c_fc.nf)
    return Unit(name, "mlp", m, c_fc.nf, _sites([(c_fc, 0, ids), (c_proj, 1, ids)]), lambda n: None)


def _bert_ffn(name: str, m: nn.Module) -> Unit | None:
    up = getattr(getattr(m, "intermediate", None), "dense", None)
    down = getattr(getattr(m, "output", None), "dense", None)
    if not (_linear(up) and _linear(down)):
        return None
    ids = _channels(up.out_features)
    return Unit(name, "mlp", m, up.out_features, _sites([(up, 0, ids), (down, 1, ids)]), lambda n: None)


MATCHERS: tuple[Callable[[str, nn.Module], Unit | str | None], ...] = (
    _separate_qkv, _bert_attention, _gpt2_attention, _mlp, _gpt2_mlp, _bert_ffn,
)  # fmt: skip


def find_units(model: nn.Module) -> list[Unit]:
    """Every attention and MLP block of a known layout, outermost match first, each module claimed once.

    Example:
        >>> find_units(nn.Sequential(nn.Linear(4, 4)))
        []

    """
    return _match(model)[0]


def layout_refusals(model: nn.Module) -> dict[str, str]:
    """Blocks whose projections a layout matched but that it cannot prune: name -> the reason."""
    return _match(model)[1]


def _match(model: nn.Module) -> tuple[list[Unit], dict[str, str]]:
    units: list[Unit] = []
    refused: dict[str, str] = {}
    claimed: set[int] = set()
    for name, module in model.named_modules():
        for matcher in MATCHERS:
            unit = matcher(name, module)
            if isinstance(unit, str):
                refused.setdefault(name, unit)
            if not isinstance(unit, Unit):
                continue
            layers = {id(layer) for layer, *_ in unit.sites}
            if layers & claimed:
                continue
            claimed |= layers
            units.append(unit)
    return _tied(units, refused), refused


def _tied(units: list[Unit], refused: dict[str, str]) -> list[Unit]:
    """Merge the units of one tie into one that keeps the same heads in every block (T5's shared position bias)."""
    ties: dict[str, list[Unit]] = {}
    for unit in units:
        if unit.tie is not None:
            ties.setdefault(unit.tie, []).append(unit)
    out: list[Unit] = []
    for unit in units:
        members = ties.get(unit.tie) if unit.tie is not None else None
        if members is None:
            out.append(unit)
        elif members[0] is unit:
            if len({m.groups for m in members}) > 1:
                refused[unit.tie] = "its blocks share a position bias but hold different head counts"  # type: ignore[index]
                continue
            out.append(Unit(
                unit.tie, unit.kind, unit.module, unit.groups, [s for m in members for s in m.sites],
                _finish_all([m.finish for m in members]), unit.heads_per_group, unit.kv_heads, unit.tie,
                tuple(m.module for m in members),
            ))  # fmt: skip
    return out


def _finish_all(finishes: list[Callable[[int], None]]) -> Callable[[int], None]:
    def finish(groups: int) -> None:
        for each in finishes:
            each(groups)

    return finish


def unit_layers(units: Iterable[Unit]) -> set[nn.Module]:
    """The Linear/Conv1D layers the units own."""
    return {layer for unit in units for layer, *_ in unit.sites}


def unknown_attention(model: nn.Module, units: Iterable[Unit], handled: Callable[[nn.Module], bool]) -> list[str]:
    """Modules whose class names an attention (``*Attention*``) that no unit covers and ``handled`` does not accept."""
    units = list(units)
    covered = {id(m) for u in units for m in (u.module, *u.modules)} | {id(layer) for layer in unit_layers(units)}
    inside: list[str] = [n for n, m in model.named_modules() if id(m) in covered]
    names = []
    for name, m in model.named_modules():
        if "attention" not in type(m).__name__.lower() or id(m) in covered or handled(m):
            continue
        if any(name == n or name.startswith(n + ".") or n.startswith(name + ".") for n in inside):
            continue  # a part of a covered block (BERT's BertSelfAttention) or a container of one
        if any(True for _ in m.parameters()):
            names.append(f"{name} ({type(m).__name__})")
    return names


def prune_units(
    units: Iterable[Unit],
    amount: float,
    ratios: Mapping[str, float] | None = None,
    criterion: str = "magnitude",
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Remove ``amount`` (or ``ratios[unit name]``) of every unit's current groups, keeping at least one.

    A unit keeps ``int(groups x (1 - ratio))`` groups, as Torch-Pruning keeps channels (so
    :func:`lightning_lowvram.cores.pruning.keep_ratios` makes gradual pruning end where one step would). Returns the
    record, plain data, one op a pruned unit: ``{"module": name, "fn": "keep_groups", "idxs": kept groups}``.

    Example:
        >>> class Attn(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.head_dim, self.num_heads = 2, 4
        ...         self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(8, 8) for _ in range(4))
        >>> attn = Attn()
        >>> _ = prune_units(find_units(attn), 0.5)
        >>> attn.q_proj.out_features, attn.o_proj.in_features, attn.num_heads
        (4, 4, 2)

    """
    generator = torch.Generator().manual_seed(seed)
    ratios = ratios or {}
    ops = []
    for unit in units:
        keep = max(1, int(unit.groups * (1.0 - ratios.get(unit.name, amount))))
        if keep >= unit.groups:
            continue
        kept = unit.scores(criterion, generator).argsort(descending=True)[:keep].sort().values.tolist()
        unit.keep(kept)
        ops.append({"module": unit.name, "fn": "keep_groups", "idxs": kept})
    return ops


def sync_configs(model: nn.Module, units: Iterable[Unit]) -> None:
    """Write the pruned head counts / intermediate sizes into Hugging Face configs that can describe them."""
    units = list(units)
    widths = {kind: {u.groups_now() for u in units if u.kind == kind} for kind in ("attention", "mlp")}
    configs = {id(c): c for m in model.modules() if hasattr(c := getattr(m, "config", None), "to_dict")}
    for config in configs.values():
        if len(widths["mlp"]) == 1:
            (width,) = widths["mlp"]
            for key in ("intermediate_size", "n_inner", "d_ff"):
                if hasattr(config, key):
                    setattr(config, key, width)
                    break
        heads = {(u.groups_now() * u.heads_per_group, u.kv_heads) for u in units if u.kind == "attention"}
        if len({q for q, _ in heads}) == 1 and isinstance(getattr(config, "head_dim", None), int):
            ((q, kv),) = {(q, kv) for q, kv in heads}
            config.num_attention_heads = q
            if kv and hasattr(config, "num_key_value_heads"):
                config.num_key_value_heads = q // next(u.heads_per_group for u in units if u.kind == "attention")


def conform_to_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Give every parameter and buffer the shape it has in ``state_dict`` (values are loaded afterwards).

    This is how a checkpoint from any point of a pruning schedule loads into a module of another size: tensors are
    replaced by empty ones of the checkpoint's shapes, then the layers' size attributes and the transformer units'
    head and width attributes are rewritten from them. Returns the names of the tensors that changed shape.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> small = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> conform_to_state_dict(model, small.state_dict())
        ['0.weight', '0.bias', '2.weight']
        >>> model.load_state_dict(small.state_dict()); model[0].out_features
        <All keys matched successfully>
        3

    """
    units = find_units(model)  # matched on the current shapes: their group ids know the size of one group
    changed: list[str] = []
    touched: dict[int, nn.Module] = {}
    for full, tensor in [*model.named_parameters(), *model.named_buffers()]:
        new = state_dict.get(full)
        if not isinstance(new, torch.Tensor) or new.shape == tensor.shape:
            continue
        owner_name, _, attr = full.rpartition(".")
        owner = model.get_submodule(owner_name)
        empty = torch.empty(new.shape, dtype=tensor.dtype, device=tensor.device)
        if isinstance(tensor, nn.Parameter):
            setattr(owner, attr, nn.Parameter(empty, requires_grad=tensor.requires_grad))
        else:
            owner._buffers[attr] = empty
        touched[id(owner)] = owner
        changed.append(full)
    for layer in touched.values():
        sync_layer_attributes(layer)
    for unit in units:
        if any(id(layer) in touched for layer, *_ in unit.sites):
            unit.finish(unit.groups_now())
    return changed


def sync_layer_attributes(layer: nn.Module) -> None:
    """Rewrite a standard layer's size attributes from its tensors (Linear, Conv, norms, Embedding, HF Conv1D)."""
    weight = getattr(layer, "weight", None)
    if isinstance(layer, nn.modules.conv._ConvNd):
        a, b = weight.shape[:2]
        if layer.transposed:
            layer.in_channels, layer.out_channels = a, b * layer.groups
        else:
            layer.out_channels, layer.in_channels = a, b * layer.groups
    elif isinstance(layer, nn.modules.batchnorm._NormBase):
        layer.num_features = next(t for t in (weight, layer.running_mean) if t is not None).shape[0]
    elif isinstance(layer, nn.LayerNorm) and weight is not None:
        layer.normalized_shape = tuple(weight.shape)
    elif isinstance(layer, nn.GroupNorm) and weight is not None:
        layer.num_channels = weight.shape[0]
    elif isinstance(layer, nn.Embedding):
        layer.num_embeddings, layer.embedding_dim = weight.shape
    else:
        _sync_layer(layer)
