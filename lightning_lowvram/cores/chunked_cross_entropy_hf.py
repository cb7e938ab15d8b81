"""Chunked linear + cross-entropy for Hugging Face ``*ForCausalLM`` models, with no change to the user's code.

``apply_chunked_cross_entropy(model)`` finds the causal LMs in ``model`` (a LightningModule, a peft model, the HF model
itself) and replaces each one's ``forward`` on the instance: in training, when ``labels`` are given, the body runs as
before and the loss comes from :func:`lightning_lowvram.cores.chunked_cross_entropy.head_cross_entropy` on the
head the model has
(``get_output_embeddings()``: a plain ``nn.Linear``, tied embeddings, a peft LoRA head), with HF's label shift,
``ignore_index``, ``num_items_in_batch`` and the family's final-logit soft-capping. ``outputs.loss`` is what it was;
``outputs.logits`` is ``None`` in those steps (that is the memory saved). In evaluation, without labels or without
gradients, the model's own forward runs: logits asked for in ``predict``, generation or a validation metric are
untouched.

Which families are reproduced exactly is one table, ``FAMILIES`` (model type -> the config field of its final-logit
soft-capping, or ``None``), as Liger and Cut Cross-Entropy keep theirs; each entry is tested against the plain model
(loss and every gradient, 1e-5 relative in float32). Anything else is refused by name, never approximated: another
model type (its forward may scale the logits, as Cohere's and Granite's do), a custom ``loss_type``, a head with
dropout.

On CUDA with the ``cut-cross-entropy`` package installed and a plain ``nn.Linear`` head, ``backend="auto"`` runs
its fused kernel (CCE: the logits never leave on-chip memory) instead of the chunked PyTorch path, and says so —
**unverified: no GPU has run it in this project**.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import inspect
import types
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lightning_lowvram.cores.chunked_cross_entropy import check_chunk_size, default_chunk_size, head_cross_entropy

Backend = Literal["auto", "chunked", "cce"]
BACKENDS = ("auto", "chunked", "cce")

# model type -> config field holding its final-logit soft-capping (None: no capping). Each family's CausalLM forward
# is body -> last hidden state -> lm_head -> (soft-capping) -> ForCausalLMLoss, as read in transformers 5 and tested.
FAMILIES: dict[str, str | None] = {
    "llama": None,
    "mistral": None,
    "qwen2": None,
    "qwen3": None,
    "gemma": None,
    "gemma2": "final_logit_softcapping",
    "phi3": None,
    "gpt2": None,
}
_LOSS_ONLY = ("num_items_in_batch", "ignore_index", "shift_labels")


def causal_lms(module: nn.Module) -> list[nn.Module]:
    """The Hugging Face causal LMs inside ``module`` (outermost ones; ``module`` itself included).

    peft's ``PeftModelForCausalLM`` is a wrapper, not the model: the transformers model inside it is found.
    """
    named = type(module).__name__.endswith(("ForCausalLM", "LMHeadModel"))
    if named and hasattr(module, "get_output_embeddings") and not type(module).__module__.startswith("peft"):
        return [module] if hasattr(module, "config") and hasattr(module, "base_model_prefix") else []
    return [found for child in module.children() for found in causal_lms(child)]


def why_not_supported(model: nn.Module) -> str | None:
    """Why the chunked loss cannot reproduce ``model``'s head and loss exactly, or ``None`` when it can."""
    name = type(model).__name__
    model_type = getattr(model.config, "model_type", None)
    if model_type not in FAMILIES:
        return (
            f"{name} (model_type {model_type!r}) is not a family whose head and loss are reproduced exactly "
            f"(supported: {', '.join(sorted(FAMILIES))}); leave it unchunked"
        )
    from transformers.loss.loss_utils import LOSS_MAPPING

    if model.loss_function is not LOSS_MAPPING["ForCausalLM"]:
        loss = getattr(model.loss_function, "__name__", "a custom loss")
        return f"{name} computes its loss with {loss}, not HF's ForCausalLMLoss"
    head = model.get_output_embeddings()
    if head is None:
        return f"{name} has no output embeddings (get_output_embeddings() is None)"
    dropout = [n for n, m in head.named_modules() if isinstance(m, nn.Dropout) and m.p > 0]
    if dropout:
        return f"{name}'s head has dropout ({dropout[0]}): a chunked head would draw other random numbers"
    return None


def apply_chunked_cross_entropy(
    module: nn.Module, chunk_size: int | None = None, backend: Backend = "auto"
) -> list[str]:
    """Patch every HF causal LM in ``module`` (see the module docstring); returns their class names.

    Raises:
        ValueError: When ``module`` holds no HF causal LM, one is not reproduced exactly (the reason), the chunk
            size is below 1 or the backend is unknown.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
        ...                                      num_hidden_layers=1, num_attention_heads=2))
        >>> apply_chunked_cross_entropy(model)
        ['LlamaForCausalLM']
        >>> remove_chunked_cross_entropy(model)

    """
    check_chunk_size(chunk_size)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    models = require_chunkable(module)
    for model in models:
        model._lowvram_chunked_ce = (chunk_size, backend)  # type: ignore[assignment]
        model.forward = types.MethodType(_chunked_forward, model)  # type: ignore[method-assign]
    return [type(m).__name__ for m in models]


def is_chunkable(module: nn.Module) -> bool:
    """Whether ``module`` holds HF causal LMs and the chunked loss reproduces each of them exactly."""
    models = causal_lms(module)
    return bool(models) and not any(why_not_supported(m) for m in models)


def require_chunkable(module: nn.Module) -> list[nn.Module]:
    """The HF causal LMs in ``module`` if the chunked loss reproduces them all exactly (nothing is patched).

    Raises:
        ValueError: ``module`` holds none, or one is not reproduced exactly (named, with the reason).

    """
    models = causal_lms(module)
    if not models:
        raise ValueError(
            f"{type(module).__name__} holds no Hugging Face *ForCausalLM model: the chunked cross-entropy patches "
            "those; for a module with its own nn.Linear head call "
            "lightning_lowvram.cores.chunked_cross_entropy.linear_cross_entropy"
        )
    for model in models:
        reason = why_not_supported(model)
        if reason:
            raise ValueError(f"chunked cross-entropy: {reason}")
    return models


def remove_chunked_cross_entropy(module: nn.Module) -> None:
    """Undo :func:`apply_chunked_cross_entropy`: the models' own ``forward`` again."""
    for model in causal_lms(module):
        model.__dict__.pop("forward", None)
        model.__dict__.pop("_lowvram_chunked_ce", None)


def is_chunked(module: nn.Module) -> bool:
    """Whether some causal LM in ``module`` has the chunked loss applied."""
    return any("_lowvram_chunked_ce" in m.__dict__ for m in causal_lms(module))


def last_backend(module: nn.Module) -> str | None:
    """Which loss ran in the latest chunked step: ``"chunked"`` (PyTorch) or ``"cce"``; ``None`` before one ran."""
    return next((m.__dict__["_lowvram_ce_ran"] for m in causal_lms(module) if "_lowvram_ce_ran" in m.__dict__), None)


@functools.cache
def _argument_names(forward: Any) -> tuple[str, ...]:
    return tuple(p for p in inspect.signature(forward).parameters if p != "self")


def _chunked_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    original = type(self).forward
    kwargs.update(zip(_argument_names(original), args, strict=False))  # positional arguments by name
    if kwargs.get("labels") is None or not self.training or not torch.is_grad_enabled() or kwargs.get("logits_to_keep"):
        return original(self, **kwargs)
    labels = kwargs.pop("labels")
    kwargs.pop("logits_to_keep", None)
    loss_kwargs = {k: kwargs.pop(k) for k in _LOSS_ONLY if k in kwargs}
    outputs = getattr(self, self.base_model_prefix)(**kwargs)
    hidden = outputs[0]
    ignore_index = loss_kwargs.get("ignore_index", -100)
    targets = loss_kwargs.get("shift_labels")
    if targets is None:  # HF's shift: position t predicts label t + 1; the last position has nothing to predict
        targets = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    field = FAMILIES[self.config.model_type]
    softcap = getattr(self.config, field, None) if field else None
    chunk_size, backend = self._lowvram_chunked_ce
    chunk_size = chunk_size or default_chunk_size(self.config.vocab_size)
    head = self.get_output_embeddings()
    loss, ran = _loss(hidden, head, targets.to(hidden.device), ignore_index, softcap,
                      loss_kwargs.get("num_items_in_batch"), chunk_size, backend)  # fmt: skip
    self.__dict__["_lowvram_ce_ran"] = ran
    return _output(loss, outputs)


def _cce_available(hidden: torch.Tensor, head: nn.Module) -> bool:
    return hidden.is_cuda and type(head) is nn.Linear and importlib.util.find_spec("cut_cross_entropy") is not None


def _loss(
    hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor, ignore_index: int, softcap: float | None,
    num_items: Any, chunk_size: int | None, backend: str,
) -> tuple[torch.Tensor, str]:  # fmt: skip
    if backend == "cce" or (backend == "auto" and _cce_available(hidden, head)):
        if not _cce_available(hidden, head):
            needs = "CUDA tensors, a plain nn.Linear head and `pip install cut-cross-entropy`"
            raise RuntimeError(f"backend='cce' needs {needs}")
        from cut_cross_entropy import linear_cross_entropy as cce  # unverified: no GPU has run this path here

        flat, hidden2d = targets.reshape(-1), hidden.reshape(-1, hidden.shape[-1])
        total = cce(hidden2d, head.weight, flat, bias=head.bias, ignore_index=ignore_index, softcap=softcap,
                    reduction="sum")  # fmt: skip
        return total / (num_items if num_items is not None else (flat != ignore_index).sum()), "cce"
    params = [p for p in head.parameters() if p.requires_grad]
    loss = head_cross_entropy(hidden, _once(head, hidden), params, targets, ignore_index=ignore_index,
                              softcap=softcap, num_items=num_items, chunk_size=chunk_size)  # fmt: skip
    return loss, "chunked"


def _once(head: nn.Module, hidden: torch.Tensor) -> Any:
    """The head as the chunks call it: an NF4 head (LowBitBaseCallback) dequantized once for all chunks.

    ``NF4Linear`` dequantizes its whole weight on every call (and again in backward); called once per chunk, that is
    the weight's worth of work a chunk. Dequantized once here (the same values, in the same compute dtype, so the same
    logits and input gradients), the chunks share it: the transient is the one a single call holds anyway.
    """
    from lightning_lowvram.cores.low_bit_base import NF4Linear, nf4_dequantize

    if type(head) is not NF4Linear:
        return head
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    weight = nf4_dequantize(head.weight, dtype)
    bias = None if head.bias is None else head.bias.to(dtype)
    return lambda h: F.linear(h.to(dtype), weight, bias)


def _output(loss: torch.Tensor, outputs: Any) -> Any:
    from transformers.modeling_outputs import CausalLMOutputWithPast

    fields = {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} - {"loss", "logits"}
    kept = {k: v for k, v in outputs.items() if k in fields}
    return CausalLMOutputWithPast(loss=loss, logits=None, **kept)
