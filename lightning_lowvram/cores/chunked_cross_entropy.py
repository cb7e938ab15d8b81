"""Linear head + cross-entropy in chunks of tokens: the ``[tokens, vocab]`` logits never exist whole.

A causal LM's loss materialises ``tokens x vocab`` logits, upcasts them to float32 and keeps a float32 copy for
backward: at a 128k vocabulary that is 1 GiB per 1,000 tokens, more than the weights of a LoRA run. Here the head and
the loss run on one chunk of tokens at a time, and each chunk's gradients (for the hidden states and for the head's
trainable parameters) are computed right away, in the same pass, so nothing of size ``vocab`` outlives its chunk
(Liger's fused linear-CE does the same; Apple's Cut Cross-Entropy goes further with a Triton kernel). Backward only
scales the kept gradients by the loss's upstream gradient.

Invariants:

- The chunk's head runs exactly as the model's would (the same module call, under the same autocast), then the loss
  as Hugging Face computes it: logits upcast to float32, optional soft-capping ``cap * tanh(logits / cap)`` (in the
  head's output dtype, as Gemma-2 does it), ``ignore_index`` targets left out, the mean over the counted targets, or
  the sum divided by ``num_items`` (HF's ``num_items_in_batch``). Loss and gradients equal the plain computation up to
  float rounding (tested to 1e-5 relative in float32).
- Extra memory: the hidden states' gradient (their size) and the head's trainable parameters' gradients, held from the
  forward to the backward; transient: one chunk's logits, their float32 copy and their gradient.
- Without gradients (evaluation, ``torch.no_grad``), only the loss is computed, chunk by chunk.

The one trap: the gradients are computed in the forward, so a loss that is never backpropagated still costs a
backward's compute; and a head with dropout would draw other random numbers than the plain run (refused by the HF
patch in :mod:`lightning_lowvram.cores.chunked_cross_entropy_hf`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

# float32 logits a chunk holds by default: 32 MiB, so a chunk's transients (its logits, their float32 copy, their
# gradient: about 3x) stay near 100 MiB on any card; 65 tokens at a 128k vocabulary, 262 at 32k. Chosen for memory (the
# CPU-measured step peak at 32k vocabulary and 2048 tokens stays under 0.25x of the plain step, a test); the speed of
# such chunks on a GPU is unmeasured (Liger sizes chunks so their logits match the hidden states' bytes).
LOGITS_PER_CHUNK = 2**23


def default_chunk_size(vocab_size: int) -> int:
    """Tokens per chunk so one chunk's float32 logits are about 32 MiB (``LOGITS_PER_CHUNK``).

    Example:
        >>> default_chunk_size(128256), default_chunk_size(32000)
        (65, 262)

    """
    return max(1, LOGITS_PER_CHUNK // max(1, vocab_size))


def check_chunk_size(chunk_size: int | None) -> None:
    """Refuse a chunk size that is not ``None`` or an integer >= 1, naming it.

    Raises:
        ValueError: ``chunk_size must be an integer >= 1 (tokens a chunk), got 0``.

    """
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be an integer >= 1 (tokens a chunk), got {chunk_size!r}")


def _chunk_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, softcap: float | None) -> torch.Tensor:
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index, reduction="sum")


class _HeadCrossEntropy(torch.autograd.Function):
    """Loss of ``head(hidden)`` against ``targets``, chunk by chunk, with the gradients computed in the forward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        targets: torch.Tensor,
        head: Callable[[torch.Tensor], torch.Tensor],
        options: tuple[int, float | None, int, Any, bool],
        *params: torch.Tensor,
    ) -> torch.Tensor:
        ignore_index, softcap, chunk_size, denominator, grad_enabled = options
        # inside forward autograd is off: whether the caller's graph wants gradients was read before apply()
        needs = [grad_enabled and t.requires_grad for t in (hidden, *params)]
        grad_hidden = torch.empty_like(hidden) if needs[0] else None
        grad_params: list[torch.Tensor | None] = [None] * len(params)
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk_size):
            stop = min(start + chunk_size, hidden.shape[0])
            chunk = hidden[start:stop].detach().requires_grad_(needs[0])
            with torch.enable_grad() if any(needs) else torch.no_grad():
                loss = _chunk_loss(head(chunk), targets[start:stop], ignore_index, softcap) / denominator
            if any(needs):
                wrt = [t for t, need in zip((chunk, *params), needs, strict=True) if need]
                grads = iter(torch.autograd.grad(loss, wrt))
                if needs[0]:
                    grad_hidden[start:stop] = next(grads)  # type: ignore[index]
                for i, need in enumerate(needs[1:]):
                    if need:
                        grad = next(grads)
                        grad_params[i] = grad if grad_params[i] is None else grad_params[i].add_(grad)  # type: ignore[union-attr]
            total += loss.detach()
            del loss, chunk
        ctx.save_for_backward(*(g for g in (grad_hidden, *grad_params) if g is not None))
        ctx.layout = [g is not None for g in (grad_hidden, *grad_params)]
        return total

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> Any:
        saved = iter(ctx.saved_tensors)
        grads = [next(saved) * grad_output if kept else None for kept in ctx.layout]
        return grads[0], None, None, None, *grads[1:]


def head_cross_entropy(
    hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    params: Sequence[torch.Tensor],
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    softcap: float | None = None,
    num_items: int | torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``head(hidden)`` against ``targets`` without the whole logits (see the module docstring).

    Args:
        hidden: ``(..., hidden_size)`` inputs of the head; flattened to tokens.
        head: A token-wise module or function from hidden states to logits (``nn.Linear``, a peft LoRA head...).
        params: The head's parameters that may need gradients (those that do get them).
        targets: Class indices, one per token (``hidden``'s leading shape).
        ignore_index: Targets left out of the loss.
        softcap: Soft-capping of the logits, ``softcap * tanh(logits / softcap)``; ``None``: none.
        num_items: Divide the summed loss by this (HF's ``num_items_in_batch``); ``None``: the mean over the targets
            that count.
        chunk_size: Tokens per chunk (:func:`default_chunk_size` of the vocabulary is a good one).

    Raises:
        ValueError: For a ``chunk_size`` below 1 or targets that do not match the tokens.

    """
    check_chunk_size(chunk_size)
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    flat = targets.reshape(-1)
    if flat.shape[0] != hidden2d.shape[0]:
        raise ValueError(f"targets: {flat.shape[0]} targets for {hidden2d.shape[0]} tokens")
    denominator: Any = num_items if num_items is not None else (flat != ignore_index).sum()
    if chunk_size is None:
        # not by calling the head: under autocast a cast made without grad would be cached and cut the gradient
        raise ValueError("chunk_size: give the tokens a chunk, e.g. default_chunk_size(vocab_size)")
    options = (ignore_index, softcap, int(chunk_size), denominator, torch.is_grad_enabled())
    return _HeadCrossEntropy.apply(hidden2d, flat, head, options, *params)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    softcap: float | None = None,
    num_items: int | torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """``F.cross_entropy(F.linear(hidden, weight, bias).float(), targets)`` without the ``[tokens, vocab]`` logits.

    The functional form for a module with its own ``nn.Linear`` head; HF causal LMs are patched by
    :func:`lightning_lowvram.cores.chunked_cross_entropy_hf.apply_chunked_cross_entropy` (labels shifted as HF
    shifts them).

    Args:
        hidden: ``(..., hidden_size)`` hidden states.
        weight: The head's ``(vocab, hidden_size)`` weight (tied embeddings: the embedding's weight).
        targets: Class indices, one per token; ``ignore_index`` ones are left out.
        bias: The head's bias, if any.
        ignore_index: Targets left out of the loss (HF: -100).
        softcap: Final-logit soft-capping (Gemma-2's ``final_logit_softcapping``); ``None``: none.
        num_items: Divide the summed loss by this instead of taking the mean over counted targets.
        chunk_size: Tokens per chunk (>= 1); ``None``: about 32 MiB of float32 logits a chunk.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> h, w = torch.randn(2, 8, 16, requires_grad=True), torch.randn(100, 16, requires_grad=True)
        >>> y = torch.randint(0, 100, (2, 8))
        >>> chunked = linear_cross_entropy(h, w, y, chunk_size=3)
        >>> plain = F.cross_entropy(F.linear(h, w).flatten(0, 1), y.flatten())
        >>> torch.allclose(chunked, plain)
        True

    """
    params = (weight,) if bias is None else (weight, bias)
    return head_cross_entropy(
        hidden,
        lambda h: F.linear(h, weight, bias),
        params,
        targets,
        ignore_index=ignore_index,
        softcap=softcap,
        num_items=num_items,
        chunk_size=default_chunk_size(weight.shape[0]) if chunk_size is None else chunk_size,
    )
