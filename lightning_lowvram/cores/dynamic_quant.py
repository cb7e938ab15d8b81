"""Int8 quantization of Linear layers, usable without Lightning: a backend per device, bytes counted from tensors.

Backends (a registry: name -> (devices, transform, keeps gradients)):

- ``torch_ao``: ``torch.ao.quantization.quantize_dynamic`` (int8 weights, activations quantized per batch at run time);
  CPU only, while torch ships it; the fastest int8 path on CPU (benchmarks/RESULTS.md). Cuts autograd.
- ``torchao_dynamic``: torchao ``Int8DynamicActivationInt8WeightConfig``; the CUDA path. Cuts autograd; on CPU it
  measured 0.71x fp32 latency on a 4 x 1024 MLP but 6.9x on the small digits MLP (benchmarks/RESULTS.md), so it is
  never chosen there automatically. Its CUDA kernel rule (:func:`int8_kernel_ok`): torchao 0.18's eager matmul
  (``torchao/kernel/intmm.py``, ``safe_int_mm``) runs cuBLAS int8 only when the inner and output sizes are multiples
  of 8; for any other shape it copies *both* operands to the CPU, multiplies in int32 there and copies back, every
  call. GPT-2's ``lm_head`` (50257 outputs) takes that path: the 1079x slowdown measured on an H200. Such layers stay
  float. (On every shape it also makes the int8 weight contiguous after transposing it, a weight-sized copy per
  call, and quantizes activations in separate eager kernels: a likely part of the 3.9x measured on a Linear-only GPT
  with d_model 1024; not measured apart.)
- ``torchao_weight_only``: torchao ``Int8WeightOnlyConfig`` (int8 weights, float activations); CPU and CUDA;
  gradients flow to the input, so it can hold a frozen base under trainable adapters (slower than fp32 on CPU).
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_lowvram._files import load_weights_only
from lightning_lowvram.cores.pruning_units import is_conv1d


@dataclass(frozen=True)
class Backend:
    """How to quantize Linear layers in place, where it runs and whether gradients flow through the result."""

    devices: tuple[str, ...]
    apply: Callable[[nn.Module, Callable[[nn.Module, str], bool]], None]
    keeps_gradients: bool


def _torch_ao(module: nn.Module, select: Callable[[nn.Module, str], bool]) -> None:
    names = {name for name, m in module.named_modules() if select(m, name)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated (still shipped): we know
        torch.ao.quantization.quantize_dynamic(module, names, dtype=torch.qint8, inplace=True)


def _torchao(config_name: str) -> Callable[[nn.Module, Callable[[nn.Module, str], bool]], None]:
    def apply(module: nn.Module, select: Callable[[nn.Module, str], bool]) -> None:
        import torchao.quantization as tq

        tq.quantize_(module, getattr(tq, config_name)(), filter_fn=lambda m, name: select(m, name))

    return apply


BACKENDS: dict[str, Backend] = {
    "torchao_dynamic": Backend(("cuda", "cpu"), _torchao("Int8DynamicActivationInt8WeightConfig"), False),
    "torchao_weight_only": Backend(("cuda", "cpu"), _torchao("Int8WeightOnlyConfig"), True),
}
if hasattr(torch.ao.quantization, "quantize_dynamic"):
    BACKENDS["torch_ao"] = Backend(("cpu",), _torch_ao, False)


def available_backends(device: str | torch.device) -> list[str]:
    """Backends that run on ``device`` (its type: ``cpu`` or ``cuda``)."""
    kind = torch.device(device).type
    return [name for name, backend in BACKENDS.items() if kind in backend.devices]


def choose_backend(device: str | torch.device, backend: str = "auto") -> str:
    """``backend`` if it runs on ``device``; for ``"auto"`` the fastest int8 path there (by measurement).

    Raises:
        ValueError: For a backend that does not run on ``device``, listing those that do.

    Example:
        >>> choose_backend("cpu")
        'torch_ao'

    """
    kind = torch.device(device).type
    here = available_backends(kind)
    if backend == "auto":
        preferred = ("torch_ao", "torchao_weight_only") if kind == "cpu" else ("torchao_dynamic",)
        for name in preferred:
            if name in here:
                return name
        raise ValueError(f"no int8 backend runs on {kind}; backends: {', '.join(BACKENDS)}")
    if backend not in here:
        raise ValueError(f"backend={backend!r} does not run on {kind}; here: 'auto', {', '.join(map(repr, here))}")
    return backend


def is_linear(module: nn.Module, name: str = "") -> bool:
    """Plain ``nn.Linear`` layers and Hugging Face ``Conv1D`` (GPT-2's Linear, stored transposed), not quantized.

    Subclasses are left alone: ``nn.MultiheadAttention`` reads its ``out_proj`` (a ``Linear`` subclass) weight
    directly, which is why torch marks it ``NonDynamicallyQuantizableLinear``.
    """
    return type(module) is nn.Linear or is_conv1d(module)


def features(layer: nn.Module) -> tuple[int, int]:
    """``(in, out)`` features of a Linear or a Conv1D."""
    return (layer.nx, layer.nf) if is_conv1d(layer) else (layer.in_features, layer.out_features)


def as_linear(layer: nn.Module) -> nn.Module:
    """A Conv1D as the equivalent ``nn.Linear`` (weight transposed, same device and dtype); a Linear unchanged.

    Example:
        >>> as_linear(nn.Linear(2, 3)).out_features
        3

    """
    if not is_conv1d(layer):
        return layer
    linear = nn.Linear(layer.nx, layer.nf, device=layer.weight.device, dtype=layer.weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(layer.weight.t())
        linear.bias.copy_(layer.bias)
    linear.requires_grad_(layer.weight.requires_grad)
    return linear


def int8_kernel_ok(layer: nn.Module, backend: str, device: str | torch.device) -> bool:
    """Whether ``backend`` runs this layer's int8 matmul on the device itself.

    ``torchao_dynamic`` on CUDA needs in and out features that are multiples of 8 (torchao 0.18
    ``kernel/intmm.py``: other shapes are multiplied on the CPU, both operands copied each call).

    Example:
        >>> int8_kernel_ok(nn.Linear(768, 50257), "torchao_dynamic", "cuda")
        False

    """
    if backend != "torchao_dynamic" or torch.device(device).type != "cuda":
        return True
    return all(size % 8 == 0 for size in features(layer))


def tied_layers(module: nn.Module) -> list[str]:
    """Linear/Conv1D layers whose weight another module also holds (tied embeddings): int8 would add bytes."""
    owners: dict[int, int] = {}
    for m in module.modules():
        for p in m.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    return [name for name, m in module.named_modules() if is_linear(m) and owners.get(id(m.weight), 0) > 1]


def quantize_dynamic_int8(
    module: nn.Module,
    backend: str = "auto",
    *,
    device: str | torch.device | None = None,
    select: Callable[[nn.Module, str], bool] = is_linear,
    inplace: bool = False,
) -> nn.Module:
    """Int8 copy (or ``inplace``) of ``module`` with its Linear/Conv1D layers quantized by ``backend``.

    Layers whose weight is tied to another module (GPT-2's ``lm_head`` and its embedding) stay float.

    Example:
        >>> model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        >>> q = quantize_dynamic_int8(model)
        >>> type(q[0]).__name__, type(model[0]).__name__
        ('Linear', 'Linear')
        >>> round(linear_bytes(q) / linear_bytes(model), 2)
        0.26

    """
    device = device or next((p.device for p in module.parameters()), torch.device("cpu"))
    name = choose_backend(device, backend)
    target = module if inplace else copy.deepcopy(module)
    tied = set(tied_layers(target))  # int8 would add a copy beside the float tensor the other module keeps
    chosen = {n for n, m in target.named_modules() if select(m, n) and n not in tied}
    for layer_name in chosen:
        layer = target.get_submodule(layer_name)
        if is_conv1d(layer):  # quantized as the nn.Linear it is
            _replace(target, layer_name, as_linear(layer))
    BACKENDS[name].apply(target, lambda m, n: n in chosen and type(m) is nn.Linear)
    return target


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    if name:
        root.set_submodule(name, new)
    else:
        raise ValueError("quantize the module's layers, not a lone Conv1D")


def quantized_layers(module: nn.Module) -> list[str]:
    """Names of the layers holding int8 weights (either backend)."""
    names: list[str] = []
    for name, m in module.named_modules():
        if _is_quantized(m) and not any(name.startswith(n + ".") for n in names):
            names.append(name)
    return names


def _is_quantized(module: nn.Module) -> bool:
    if "quantized" in type(module).__module__:
        return True
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and type(weight) not in (torch.Tensor, nn.Parameter)


def tensor_bytes(value: Any) -> int:
    """Bytes of a tensor, a quantized tensor, a tensor subclass (its inner tensors) or a tuple of them."""
    if isinstance(value, tuple | list):
        return sum(tensor_bytes(v) for v in value)
    if not isinstance(value, torch.Tensor):
        return 0
    if value.is_quantized:
        extra = 0
        if value.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            extra = tensor_bytes(value.q_per_channel_scales()) + tensor_bytes(value.q_per_channel_zero_points())
        return value.numel() * value.element_size() + extra
    if type(value) not in (torch.Tensor, nn.Parameter) and hasattr(value, "__tensor_flatten__"):
        names, _ = value.__tensor_flatten__()
        return sum(tensor_bytes(getattr(value, n)) for n in names)
    return value.numel() * value.element_size()


def state_dict_bytes(state: Any) -> int:
    """Bytes of a state dict's tensors, each storage once (tied weights share one), as ``torch.save`` writes them."""
    seen: set[Any] = set()
    total = 0
    for value in state.values():
        if not isinstance(value, torch.Tensor):
            total += tensor_bytes(value)  # torch.ao's packed (weight, bias) tuples
            continue
        key = id(value) if value.is_quantized or type(value) is not torch.Tensor else value.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += tensor_bytes(value)
    return total


def module_bytes(module: nn.Module) -> int:
    """Bytes of the module's ``state_dict``, quantized weights as stored, shared (tied) tensors once."""
    return state_dict_bytes(module.state_dict())


def linear_bytes(module: nn.Module, names: Iterable[str] | None = None) -> int:
    """Bytes of the Linear layers (float or quantized): weights, biases, scales."""
    names = set(names) if names is not None else None
    total, counted = 0, []
    for name, m in module.named_modules():
        if any(name.startswith(prefix + ".") for prefix in counted):
            continue  # a part of a layer already counted (torch.ao keeps its packed weights in a child module)
        if (names is None and (is_linear(m) or _is_quantized(m))) or (names is not None and name in names):
            total += sum(tensor_bytes(v) for v in m.state_dict().values())
            counted.append(name)
    return total


def median_seconds(fn: Callable[[], Any], device: str | torch.device, warmup: int = 1, repeats: int = 3) -> float:
    """Median wall time of ``fn()`` after ``warmup`` untimed calls (compilation, autotuning), CUDA synchronised.

    Example:
        >>> median_seconds(lambda: None, "cpu") >= 0
        True

    """
    cuda = torch.device(device).type == "cuda"
    times = []
    for i in range(warmup + repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def gradient_check(layer: nn.Module, quantized: nn.Module, samples: int = 4) -> float:
    """Cosine similarity of the input gradients through ``layer`` (float) and its ``quantized`` copy; 0 if none."""
    param = next(layer.parameters())
    x = torch.randn(samples, features(layer)[0], device=param.device, dtype=param.dtype, requires_grad=True)
    layer(x).square().sum().backward()
    expected, x.grad = x.grad.detach().clone(), None
    try:
        quantized(x).square().sum().backward()
    except RuntimeError:
        return 0.0
    if x.grad is None:
        return 0.0
    return float(nn.functional.cosine_similarity(expected.flatten(), x.grad.flatten(), dim=0))


def save_quantized(module: nn.Module, path: str | Path, backend: str, layers: list[str]) -> None:
    """Write the module's state (its int8 layers as they are now) and the recipe to rebuild them."""
    recipe = {"backend": backend, "layers": layers, "torch": str(torch.__version__)}
    torch.save({"recipe": recipe, "state_dict": module.state_dict()}, path)


def load_quantized(module: nn.Module, path: str | Path) -> nn.Module:
    """Quantize a fresh float ``module`` as the recipe says and load the int8 weights (``weights_only=True``).

    Raises:
        ValueError: If the file is not an artifact of :func:`save_quantized`, or was saved from a model of other
            layers or shapes (naming the first that differs).

    Example:
        >>> # model = load_quantized(DigitsMLP(hidden=128), "digits_int8.pt")

    """
    saved = load_weights_only(path, "int8 artifact")
    if not isinstance(saved, dict) or "recipe" not in saved or "state_dict" not in saved:
        raise ValueError(f"{path}: not an int8 artifact of DynamicQuantCallback(save_path=...) (no recipe)")
    recipe, state = saved["recipe"], saved["state_dict"]
    layers = set(recipe["layers"])
    expected = {}
    for name, m in module.named_modules():
        if name in layers:
            if not is_linear(m):
                raise ValueError(f"{path} quantized layer {name!r}, which {type(module).__name__} does not have")
            inp, out = features(m)
            expected[name] = (out, inp)
    missing = layers - set(expected)
    if missing:
        raise ValueError(f"{path} quantized layer {sorted(missing)[0]!r}, which {type(module).__name__} does not have")
    for name, shape in expected.items():
        found = _int8_weight_shape(state, name)
        if found is not None and found != shape:
            raise ValueError(
                f"{path} was saved from another model: layer {name!r} is {found[0]} x {found[1]} there, "
                f"{shape[0]} x {shape[1]} here"
            )
    quantize_dynamic_int8(module, recipe["backend"], device="cpu", select=lambda m, n: n in layers, inplace=True)
    here = module.state_dict()
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and key in here and here[key].shape != value.shape:
            there, mine = tuple(value.shape), tuple(here[key].shape)
            raise ValueError(f"{path} was saved from another model: {key} is {there} there, {mine} here")
    module.load_state_dict(state)
    return module.eval()


def _int8_weight_shape(state: Any, layer: str) -> tuple[int, int] | None:
    """``(out, in)`` of a quantized layer's weight in a saved state dict (torch.ao keeps it in a packed tuple)."""
    value = state.get(f"{layer}.weight", state.get(f"{layer}._packed_params._packed_params"))
    if isinstance(value, tuple | list):
        value = value[0]
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def format_comparison(stage: str, rows: dict[str, dict[str, float]]) -> str:
    """The float-vs-int8 table of one stage."""
    lines = [f"float vs int8 ({stage})", f"  {'':28} {'float':>12} {'int8':>12} {'int8/float':>10}"]
    for key, row in rows.items():
        ratio = row["int8"] / row["float"] if row["float"] else float("nan")
        lines.append(f"  {key:28} {row['float']:>12.4g} {row['int8']:>12.4g} {ratio:>10.3f}")
    return "\n".join(lines)
