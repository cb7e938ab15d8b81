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
separate projections    ``q_proj``/``k_proj``/``v_proj`` + ``o_proj``/``out_proj``,   Llama, Mistral, Qwen2, OPT
                        ``head_dim``
BERT self-attention     ``self.query/key/value`` (``attention_head_size``) +         BERT, RoBERTa
                        ``output.dense``
fused GPT-2 attention   ``c_attn`` + ``c_proj`` (HF ``Conv1D``), ``split_size``       GPT-2
gated MLP               ``gate_proj``/``up_proj`` + ``down_proj``                     Llama, Mistral, Qwen2
GPT-2 MLP               ``c_fc`` + ``c_proj`` (``Conv1D``)                            GPT-2
BERT feed-forward       ``intermediate.dense`` + ``output.dense``                     BERT, RoBERTa
torch feed-forward      ``linear1`` + ``linear2`` beside ``self_attn``                ``nn.Transformer*Layer``
======================  ==========================================================  ==========================

After pruning, the heads/widths attributes the modules' forwards read are rewritten, and a Hugging Face config is
updated where it can describe the result (``intermediate_size``/``n_inner`` always; ``num_attention_heads`` and
``num_key_value_heads`` where the config stores ``head_dim``, as Llama's does; GPT-2 and BERT derive the head size
from ``hidden_size / num_attention_heads``, so their head counts are left and :func:`conform_to_state_dict` rebuilds
shapes from a checkpoint instead).
"""

from __future__ import annotations

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


# -- matchers: module -> Unit | None ---------------------------------------------------------------------------
def _separate_qkv(name: str, m: nn.Module) -> Unit | None:
    q, k, v = (getattr(m, a, None) for a in ("q_proj", "k_proj", "v_proj"))
    o = getattr(m, "o_proj", None) or getattr(m, "out_proj", None)
    hd = getattr(m, "head_dim", None)
    if not (all(_linear(x) for x in (q, k, v, o)) and isinstance(hd, int)):
        return None
    n_q, n_kv = q.out_features // hd, k.out_features // hd
    rep = n_q // n_kv

    def finish(groups: int) -> None:
        _set(m, num_heads=groups * rep, num_attention_heads=groups * rep, num_key_value_heads=groups)

    sites = _sites([(q, 0, _head_ids(q.out_features, hd, rep)), (k, 0, _head_ids(k.out_features, hd)),
                    (v, 0, _head_ids(v.out_features, hd)), (o, 1, _head_ids(o.in_features, hd, rep))])  # fmt: skip
    return Unit(name, "attention", m, n_kv, sites, finish, heads_per_group=rep, kv_heads=True)


def _bert_attention(name: str, m: nn.Module) -> Unit | None:
    s, out = getattr(m, "self", None), getattr(getattr(m, "output", None), "dense", None)
    hd = getattr(s, "attention_head_size", None)
    if s is None or not _linear(out) or not isinstance(hd, int):
        return None
    q, k, v = (getattr(s, a, None) for a in ("query", "key", "value"))
    if not all(_linear(x) for x in (q, k, v)):
        return None

    def finish(groups: int) -> None:
        _set(s, num_attention_heads=groups, all_head_size=groups * hd)

    ids = _head_ids(q.out_features, hd)
    sites = _sites([(q, 0, ids), (k, 0, ids), (v, 0, ids), (out, 1, ids)])
    return Unit(name, "attention", m, q.out_features // hd, sites, finish)


def _gpt2_attention(name: str, m: nn.Module) -> Unit | None:
    c_attn, c_proj = getattr(m, "c_attn", None), getattr(m, "c_proj", None)
    hd, split = getattr(m, "head_dim", None), getattr(m, "split_size", None)
    if not (is_conv1d(c_attn) and is_conv1d(c_proj) and isinstance(hd, int) and isinstance(split, int)):
        return None
    if getattr(m, "is_cross_attention", False) or c_attn.nf != 3 * split:
        return None  # cross-attention (q_attn apart) is not handled: left to the caller's error

    def finish(groups: int) -> None:
        _set(m, num_heads=groups, split_size=groups * hd)

    sites = _sites([(c_attn, 0, _head_ids(c_attn.nf, hd, period=split)), (c_proj, 1, _head_ids(c_proj.nx, hd))])
    return Unit(name, "attention", m, split // hd, sites, finish)


def _channels(size: int) -> torch.Tensor:
    return torch.arange(size)


def _gated_mlp(name: str, m: nn.Module) -> Unit | None:
    gate, up, down = (getattr(m, a, None) for a in ("gate_proj", "up_proj", "down_proj"))
    if not all(_linear(x) for x in (gate, up, down)):
        return None
    ids = _channels(up.out_features)
    sites = _sites([(gate, 0, ids), (up, 0, ids), (down, 1, ids)])
    return Unit(name, "mlp", m, up.out_features, sites, lambda n: _set(m, intermediate_size=n))


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


def _torch_ffn(name: str, m: nn.Module) -> Unit | None:
    """The feed-forward of ``nn.TransformerEncoderLayer``/``DecoderLayer``.

    Its attention keeps its heads: an ``nn.MultiheadAttention``'s inner width is its embedding width, which this
    pruning keeps.
    """
    up, down = getattr(m, "linear1", None), getattr(m, "linear2", None)
    if not (_linear(up) and _linear(down) and isinstance(getattr(m, "self_attn", None), nn.MultiheadAttention)):
        return None
    ids = _channels(up.out_features)
    return Unit(name, "mlp", m, up.out_features, _sites([(up, 0, ids), (down, 1, ids)]), lambda n: None)


MATCHERS: tuple[Callable[[str, nn.Module], Unit | None], ...] = (
    _separate_qkv, _bert_attention, _gpt2_attention, _gated_mlp, _gpt2_mlp, _bert_ffn, _torch_ffn,
)  # fmt: skip


def find_units(model: nn.Module) -> list[Unit]:
    """Every attention and MLP block of a known layout, outermost match first, each module claimed once.

    Example:
        >>> find_units(nn.Sequential(nn.Linear(4, 4)))
        []

    """
    units: list[Unit] = []
    claimed: set[int] = set()
    for name, module in model.named_modules():
        for matcher in MATCHERS:
            unit = matcher(name, module)
            if unit is None:
                continue
            layers = {id(layer) for layer, *_ in unit.sites}
            if layers & claimed:
                continue
            claimed |= layers
            units.append(unit)
    return units


def unit_layers(units: Iterable[Unit]) -> set[nn.Module]:
    """The Linear/Conv1D layers the units own."""
    return {layer for unit in units for layer, *_ in unit.sites}


def unknown_attention(model: nn.Module, units: Iterable[Unit], handled: Callable[[nn.Module], bool]) -> list[str]:
    """Modules whose class names an attention (``*Attention*``) that no unit covers and ``handled`` does not accept."""
    covered = {id(u.module) for u in units} | {id(layer) for layer in unit_layers(units)}
    inside: list[str] = [u.name for u in units]
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
            for key in ("intermediate_size", "n_inner"):
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
