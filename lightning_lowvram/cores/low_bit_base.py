"""Low-bit frozen bases for adapter training (QLoRA-style): the functional core of ``LowBitBaseCallback``.

Every frozen Linear (and Hugging Face ``Conv1D``, as the ``nn.Linear`` it is) keeps its weight in 4 bits (NF4),
8 bits (int8 weight-only) or 16 bits (bfloat16); trainable layers (adapters, heads) are untouched, and gradients
still flow through the frozen layers to the adapters and inputs.

- ``bits=4``: torchao's ``NF4Tensor`` (``torchao.quantization.quantize_.workflows.nf4``): blocks of
  ``NF4_BLOCK_SIZE`` weights share an absmax scale, and the scales are themselves quantized in blocks (QLoRA's double
  quantization, Dettmers et al. 2023). About 0.13x of the float32 bytes (4.25 bits per weight at block 64; measured
  by ``tests/cores/test_low_bit_base.py``). The layer becomes an :class:`NF4Linear`, which dequantizes on the fly,
  forward and backward, in slices straight into the compute dtype: it holds one weight's worth in that dtype
  (torchao's own ``F.linear`` holds 20 bytes a float32 weight at once; the result is the same to the bit).
- ``bits=8``: torchao's int8 weight-only layers (``DynamicQuantCallback(freeze_base=True)``, deprecated, calls this).
- ``bits=16``: float32 weights and biases stored as bfloat16 (0.5x), for ``bf16-mixed`` training: CUDA and CPU
  autocast cast each float32 weight to bfloat16 for its matmul anyway (``linear``, ``addmm``, ``matmul`` are on both
  lower-precision lists), with the same rounding, so under autocast the results are the same to the bit and the
  adapters and their optimizer state stay float32 (as peft keeps them). Without autocast a bfloat16 weight meets
  float32 inputs and the layer fails; ``LowBitBaseCallback`` refuses any precision but ``bf16-mixed`` for it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
from torch import nn

from lightning_lowvram._progress import progress
from lightning_lowvram.cores.dynamic_quant import (
    as_linear,
    is_conv1d,
    is_linear,
    linear_bytes,
    quantize_dynamic_int8,
    tied_layers,
)

Bits = Literal[4, 8, 16]
BITS = (4, 8, 16)
# Values per NF4 absmax block and scales per double-quantization block: QLoRA's (Dettmers et al. 2023, section 3)
# and torchao's defaults. Fixed: torchao 0.18's NF4Tensor re-quantizes every copy (clone, deepcopy) at these sizes,
# so a layer is converted only when its weight count is a multiple of both (16384).
NF4_BLOCK_SIZE = 64
NF4_SCALER_BLOCK_SIZE = 256


@dataclasses.dataclass
class LowBitReport:
    """What ``quantize_frozen_base`` did.

    Attributes:
        bits: 4 (NF4), 8 (int8 weight-only) or 16 (bfloat16).
        converted: The frozen layers now low-bit.
        kept: Frozen layers kept in float, with the reason.
        bytes_before: Bytes the converted layers held in float (weights, biases).
        bytes_after: Bytes they hold now (quantized data, scales, biases).

    """

    bits: int
    converted: list[str]
    kept: dict[str, str]
    bytes_before: int
    bytes_after: int

    @property
    def ratio(self) -> float:
        """``bytes_after / bytes_before`` (1.0 when nothing was converted)."""
        return self.bytes_after / self.bytes_before if self.bytes_before else 1.0


def frozen_linear_layers(module: nn.Module) -> list[str]:
    """Names of the float Linear / ``Conv1D`` layers none of whose parameters trains (low-bit ones are not listed).

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
        >>> _ = net[0].requires_grad_(False)
        >>> frozen_linear_layers(net)
        ['0']

    """
    return [
        name
        for name, m in module.named_modules()
        if is_linear(m) and not any(p.requires_grad for p in m.parameters(recurse=False))
    ]


def require_frozen_base(module: nn.Module, bits: Bits) -> list[str]:
    """The frozen Linear / ``Conv1D`` layers ``quantize_frozen_base`` would store in ``bits`` bits; refuses none.

    Raises:
        ValueError: ``bits`` other than 4, 8 or 16, or no frozen Linear / ``Conv1D`` layer.

    """
    if bits not in BITS or isinstance(bits, bool):
        raise ValueError(f"bits must be 4, 8 or 16, got {bits!r}")
    names = frozen_linear_layers(module)
    if not names and not low_bit_layers(module):  # a base already low-bit (a second stage) has nothing left to do
        raise ValueError(
            f"{type(module).__name__} has no frozen Linear/Conv1D layer to store in {bits} bits: freeze the base "
            "first (requires_grad_(False)) or wrap it with adapters (peft's get_peft_model)"
        )
    return names


def check_precision(bits: int, precision: str) -> None:
    """Refuse a bfloat16 base (``bits=16``) under a precision other than ``bf16-mixed``.

    Raises:
        ValueError: ``bits=16`` with ``precision`` not ``"bf16-mixed"``, naming both.

    """
    if bits == 16 and precision != "bf16-mixed":
        raise ValueError(
            f"LowBitBaseCallback(bits=16) stores the frozen base in bfloat16 for precision='bf16-mixed' (autocast "
            f"computes with bfloat16 weights there, so nothing changes); got precision={precision!r}: set "
            "trainer.precision=bf16-mixed, or bits=4/8"
        )


_LABELS = {4: "NF4", 8: "int8", 16: "bfloat16"}


def quantize_frozen_base(module: nn.Module, bits: Bits = 4) -> LowBitReport:
    """Store every frozen Linear / ``Conv1D`` weight of ``module`` in ``bits`` bits, in place.

    Args:
        module: A model whose base is frozen (``requires_grad_(False)``, or wrapped by peft's LoRA).
        bits: 4 (NF4), 8 (int8 weight-only) or 16 (bfloat16, for bf16 autocast: see the module's docstring).

    Returns:
        What was converted, what was kept in float and why, and the bytes before and after.

    Raises:
        ValueError: ``bits`` other than 4, 8 or 16, or no frozen Linear / ``Conv1D`` layer.

    Example:
        >>> net = nn.Sequential(nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 2))
        >>> _ = net[0].requires_grad_(False)
        >>> report = quantize_frozen_base(net, bits=4)
        >>> report.converted, round(report.ratio, 2), type(net[0].weight).__name__
        (['0'], 0.13, 'NF4Tensor')

    """
    names = require_frozen_base(module, bits)
    kept: dict[str, str] = {}
    converted: list[str] = []
    before = linear_bytes(module, names)
    tied = set(tied_layers(module))
    with progress(f"frozen base to {_LABELS[bits]}", total=len(names), unit="layer") as job:
        for name in names:
            job.advance(name)
            if name in tied:
                kept[name] = "weight tied to another module: a low-bit copy would sit beside the float one"
                continue
            if bits == 16:  # in place, Conv1D as it is (its addmm is on autocast's lists too)
                if module.get_submodule(name).weight.dtype != torch.float32:
                    kept[name] = f"already {module.get_submodule(name).weight.dtype}: nothing to save"
                    continue
                _to_bf16(module.get_submodule(name))
                converted.append(name)
                continue
            layer = as_linear(module.get_submodule(name))
            if bits == 4:
                weight = layer.weight.detach()
                if weight.numel() % (NF4_BLOCK_SIZE * NF4_SCALER_BLOCK_SIZE):
                    kept[name] = (
                        f"{tuple(weight.shape)}: {weight.numel()} weights, not a multiple of "
                        f"{NF4_BLOCK_SIZE} x {NF4_SCALER_BLOCK_SIZE} (torchao's NF4 blocks)"
                    )
                    continue
                from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

                layer = NF4Linear.from_linear(layer, to_nf4)
            else:
                box = nn.ModuleList([layer])
                quantize_dynamic_int8(box, "torchao_weight_only", device=layer.weight.device, inplace=True)
                layer = box[0]
            module.set_submodule(name, layer)
            converted.append(name)
    before = before - linear_bytes(module, kept) if kept else before
    return LowBitReport(bits, converted, kept, before, linear_bytes(module, converted))


def _to_bf16(layer: nn.Module) -> None:
    """The layer's float32 weight and bias as frozen bfloat16 parameters (the same names, the same module)."""
    for key in ("weight", "bias"):
        value = getattr(layer, key, None)
        if isinstance(value, torch.Tensor) and value.dtype == torch.float32:
            setattr(layer, key, nn.Parameter(value.detach().to(torch.bfloat16), requires_grad=False))


# Weight pairs dequantized at a time: a sixteenth of the layer, between 2**12 and 2**18 pairs (a multiple of every
# block). The scratch stays under 1 byte a weight and 6.5 MiB; a large layer takes at most a few hundred slices.
_SLICES, _SLICE_MIN, _SLICE_MAX = 16, 2**12, 2**18


def _slice_pairs(pairs: int) -> int:
    return min(max(pairs // _SLICES // _SLICE_MIN * _SLICE_MIN, _SLICE_MIN), _SLICE_MAX)


def nf4_dequantize(weight: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight torchao's ``NF4Tensor.get_original_weight()`` gives, cast to ``dtype``, without its scratch.

    The same operations in the same dtype, slice by slice into one preallocated tensor: equal to the bit, and the only
    buffer of the weight's size is the result (``dequant_bytes``).
    """
    out = torch.empty(weight.numel(), dtype=dtype or weight.dtype, device=weight.quantized_data.device)
    pairs = out.view(-1, 2)  # torchao packs weights 2i (high nibble) and 2i + 1 (low nibble) in byte i
    scalers = (
        weight.quantized_scalers.view(-1, weight.scaler_block_size) / weight.quantization_factor.unsqueeze(-1)
    ).flatten().to(weight.dtype) + weight.scaler_mean  # fmt: skip
    per_block = weight.block_size // 2  # bytes that share a scaler
    table, step = weight.nf4, _slice_pairs(weight.quantized_data.numel())
    for start in range(0, weight.quantized_data.numel(), step):
        packed = weight.quantized_data[start : start + step]
        scale = scalers[start // per_block : (start + packed.numel()) // per_block].repeat_interleave(per_block)
        pairs[start : start + packed.numel(), 0] = table[(packed >> 4).to(torch.long)] * scale
        pairs[start : start + packed.numel(), 1] = table[(packed & 0b1111).to(torch.long)] * scale
    return out.view(weight.shape)


class _NF4LinearFunction(torch.autograd.Function):
    """``x @ W.T + b`` with ``W`` dequantized in forward and again in backward (nothing of its size is kept)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: Any, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.weight = weight  # a frozen parameter: no gradient, no version to check
        w = nf4_dequantize(weight, x.dtype)
        return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return grad @ nf4_dequantize(ctx.weight, grad.dtype), None, None


class NF4Linear(nn.Linear):
    """A frozen ``nn.Linear`` whose weight is torchao's ``NF4Tensor``, dequantized in slices as it runs.

    Parameter names, the state dict and ``isinstance(layer, nn.Linear)`` are those of the layer it replaces.

    Example:
        >>> from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4
        >>> layer = NF4Linear.from_linear(nn.Linear(256, 64).requires_grad_(False), to_nf4)
        >>> layer(torch.ones(2, 256)).shape
        torch.Size([2, 64])

    """

    @classmethod
    def from_linear(cls, layer: nn.Linear, to_nf4: Any) -> NF4Linear:
        """The layer with its weight in NF4 (``to_nf4``: torchao's converter); no float weight is allocated."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = layer.in_features, layer.out_features
        weight = to_nf4(layer.weight.detach(), NF4_BLOCK_SIZE, NF4_SCALER_BLOCK_SIZE)
        new.weight = nn.Parameter(weight, requires_grad=False)
        new.bias = layer.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if torch.is_autocast_enabled(x.device.type):  # dequantize into the autocast dtype: no second cast copy
            x = x.to(torch.get_autocast_dtype(x.device.type))
        return _NF4LinearFunction.apply(x, self.weight, self.bias)


def low_bit_layers(module: nn.Module) -> list[str]:
    """Names of the Linear layers whose weight is NF4 or int8 weight-only (a quantized tensor subclass)."""
    return [
        name
        for name, m in module.named_modules()
        if isinstance(m, nn.Linear) and type(m.weight) not in (torch.Tensor, nn.Parameter)
    ]


_NF4 = "::nf4::"  # state-dict keys of a packed NF4 weight: f"{key}::nf4::{part}"
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def pack_low_bit(state_dict: dict[str, Any]) -> dict[str, Any]:
    """The state dict with each NF4 weight as plain tensors (its packed data, scales and a meta vector).

    ``torch.load`` cannot rebuild torchao's ``NF4Tensor`` with Lightning's ``map_location``; plain tensors load
    anywhere, ``weights_only=True`` included, and keep the 4-bit size. :func:`unpack_low_bit` is the inverse.
    """
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import NF4Tensor

    packed: dict[str, Any] = {}
    for key, value in state_dict.items():
        if not isinstance(value, NF4Tensor):
            packed[key] = value
            continue
        parts, meta = value.__tensor_flatten__()
        for part in parts:
            packed[f"{key}{_NF4}{part}"] = getattr(value, part)
        shape = list(value.shape)
        packed[f"{key}{_NF4}meta"] = torch.tensor(
            [meta["block_size"], meta["n_blocks"], meta["scaler_block_size"], _DTYPES.index(value.dtype), *shape]
        )
    return packed


def unpack_low_bit(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Rebuild the NF4 weights :func:`pack_low_bit` packed (other entries unchanged)."""
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import NF4Tensor, SubclassTensorArgs

    out: dict[str, Any] = {k: v for k, v in state_dict.items() if _NF4 not in k}
    for meta_key in [k for k in state_dict if k.endswith(f"{_NF4}meta")]:
        key = meta_key[: -len(f"{_NF4}meta")]
        block_size, n_blocks, scaler_block_size, dtype, *shape = (int(v) for v in state_dict[meta_key])
        parts = {k[len(key + _NF4) :]: v for k, v in state_dict.items() if k.startswith(key + _NF4) and k != meta_key}
        size = torch.Size(shape)
        stride = torch.empty(size, device="meta").stride()
        args = SubclassTensorArgs(size, stride, 0, _DTYPES[dtype], parts["quantized_data"].device, False)
        meta = {"block_size": block_size, "n_blocks": n_blocks, "scaler_block_size": scaler_block_size,
                "tensor_meta": args}  # fmt: skip
        out[key] = NF4Tensor.__tensor_unflatten__(parts, meta, size, stride)
    return out


def nf4_bytes(numel: int) -> int:
    """Bytes torchao's ``NF4Tensor`` holds for a weight of ``numel`` values (a multiple of 64 x 256).

    Packed 4-bit data (numel / 2), one int8 scale per block of 64, one float32 factor per 256 scales, a float32 scale
    mean and the 16-entry float32 NF4 table (``tests/cores/test_low_bit_base.py`` checks it against the tensors).

    Example:
        >>> nf4_bytes(256 * 256)
        33876

    """
    blocks = numel // NF4_BLOCK_SIZE
    return numel // 2 + blocks + 4 * (blocks // NF4_SCALER_BLOCK_SIZE) + 4 + 16 * 4


def dequant_bytes(numel: int, element_size: int, bits: Bits, rows: int = 0) -> int:
    """Bytes a layer's on-the-fly dequantization holds at once, in forward and in backward (the safe side).

    Measured with the project's tracker (``tests/cores/test_low_bit_base.py`` checks it for float32, bfloat16 and
    float16 weights): int8 weight-only (torchao 0.18) holds one copy of the weight in its dtype and its ``rows`` scales
    and zero points in float32 (8 bytes a row, and a few scalars); :class:`NF4Linear` the
    weight in its dtype (under autocast, the smaller autocast dtype), its scalers (one per 64 weights) and one
    slice's scratch (26 bytes a pair of weights, the safe side). torchao's own NF4 ``F.linear`` would hold 20 bytes
    a float32 weight. The same operations run on CUDA (unverified there: no GPU measurement yet).

    Example:
        >>> dequant_bytes(2**20, 4, bits=4), dequant_bytes(2**20, 4, bits=8, rows=1024)
        (5111808, 4202560)

    """
    if bits == 8:
        return numel * element_size + 8 * rows + 64  # and a few scalars
    scratch = min(numel // 2, _slice_pairs(numel // 2)) * 26
    return numel * element_size + numel // NF4_BLOCK_SIZE * element_size + scratch


def low_bit_phases(module: nn.Module, bits: Bits, chunked_head: bool = False) -> dict[str, int]:
    """Bytes a ``bits``-bit base takes off each phase's peak: what it saves less the dequantization running then.

    Forward and backward hold the largest dequantization of a layer that runs in them (``dequant_bytes``); the
    optimizer step none. With ``chunked_head`` (ChunkedCrossEntropyCallback) the causal LM's head runs its forward
    and its backward inside the forward (the chunked loss computes its gradients there), so the backward's largest
    dequantization is a block layer's, not the head's (for Llama-3.1-8B: 112 MiB instead of 1 GiB).

    Example:
        >>> net = nn.Sequential(nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 2)).requires_grad_(False)
        >>> phases = low_bit_phases(net, 4)
        >>> phases["optimizer"] == low_bit_saving(net, 4)[0] > phases["forward"] == phases["backward"]
        True

    """
    saved, everything = low_bit_saving(module, bits)
    backward = everything
    if chunked_head and bits != 16:
        from lightning_lowvram.cores.chunked_cross_entropy_hf import causal_lms

        heads = {id(m.get_output_embeddings()) for m in causal_lms(module)}
        backward = low_bit_saving(module, bits, skip=heads)[1]
    return {"forward": saved - everything, "backward": saved - backward, "optimizer": saved}


def low_bit_saving(module: nn.Module, bits: Bits, skip: set[int] | None = None) -> tuple[int, int]:
    """``(bytes saved, dequantization transient)`` if ``quantize_frozen_base(module, bits)`` ran, without running it.

    The same layers are converted (frozen, untied, NF4-blockable for 4 bits); 4 bits counted with :func:`nf4_bytes`,
    8 bits as torchao 0.18's int8 weight-only layout: int8 weights, a float32 scale and an int8 zero point per output
    row (both checked against converted layers by ``tests/cores/test_low_bit_base.py``). The transient is the largest
    layer's
    :func:`dequant_bytes`: what a planner adds back at the peak. 16 bits: half of each float32 weight and bias, and
    no transient (the planner traces a bfloat16 base instead: autocast's bfloat16 copies of float32 weights, which
    the float base's step holds, are gone too). ``skip``: ids of layers whose transient is not counted (their saving
    is).
    """
    tied = set(tied_layers(module))
    saved, largest = 0, 0
    for name in frozen_linear_layers(module):
        weight = module.get_submodule(name).weight
        if bits == 16:
            tensors = [] if name in tied else [weight, getattr(module.get_submodule(name), "bias", None)]
            saved += sum(t.numel() * 2 for t in tensors if isinstance(t, torch.Tensor) and t.dtype == torch.float32)
            continue
        if name in tied or (bits == 4 and weight.numel() % (NF4_BLOCK_SIZE * NF4_SCALER_BLOCK_SIZE)):
            continue
        rows = weight.shape[1] if is_conv1d(module.get_submodule(name)) else weight.shape[0]
        low = nf4_bytes(weight.numel()) if bits == 4 else weight.numel() + 5 * rows
        saved += weight.numel() * weight.element_size() - low
        if skip is None or id(module.get_submodule(name)) not in skip:
            largest = max(largest, dequant_bytes(weight.numel(), weight.element_size(), bits, rows))
    return saved, largest
