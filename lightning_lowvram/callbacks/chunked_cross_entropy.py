"""ChunkedCrossEntropyCallback: a causal LM's head and loss in chunks of tokens, for long contexts."""

from __future__ import annotations

from importlib.util import find_spec

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_lowvram.cores.chunked_cross_entropy import check_chunk_size
from lightning_lowvram.cores.chunked_cross_entropy_hf import (
    BACKENDS,
    Backend,
    apply_chunked_cross_entropy,
    is_chunked,
    last_backend,
    remove_chunked_cross_entropy,
)


class ChunkedCrossEntropyCallback(Callback):
    """Compute a Hugging Face causal LM's ``lm_head`` and cross-entropy in chunks: the logits never exist whole.

    At long contexts the float32 logits and their gradient (``2 x tokens x vocab x 4`` bytes: 3.9 GiB at 4096 tokens
    and a 128k vocabulary) outweigh the weights and activations of a LoRA run. With this callback the training step's
    ``outputs.loss`` is the same (loss and gradients within 1e-5 of the plain model in float32, tested on Llama,
    Mistral, Qwen2/3, Gemma, Gemma-2 with soft-capping, Phi-3 and GPT-2, tied or untied heads, LoRA on the head), the
    user's code unchanged; only one chunk's logits live at a time. Evaluation, prediction and generation run the
    model's own forward (their logits are untouched). See :mod:`lightning_lowvram.cores.chunked_cross_entropy_hf`.

    The one trap: in training steps with labels ``outputs.logits`` is ``None`` — a ``training_step`` that computes a
    metric from the logits needs them, and then this callback cannot help.

    Args:
        chunk_size: Tokens per chunk; ``None``: about 32 MiB of float32 logits a chunk (65 tokens at 128k).
        backend: ``"auto"`` (Cut Cross-Entropy's kernel on CUDA where ``cut-cross-entropy`` is installed and the head
            is a plain ``nn.Linear`` — unverified on a GPU here —, else the chunked PyTorch path), ``"chunked"`` or
            ``"cce"``.

    Raises:
        ValueError: At construction for a chunk size below 1 or an unknown backend; at setup when the module holds
            no HF causal LM, or one whose head and loss cannot be reproduced exactly (named, with the reason).

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
        ...                                      num_hidden_layers=1, num_attention_heads=2))
        >>> callback = ChunkedCrossEntropyCallback()
        >>> callback.setup(None, model, "fit")
        >>> callback.summary()
        'chunked cross-entropy on LlamaForCausalLM'

    """

    def __init__(self, chunk_size: int | None = None, backend: Backend = "auto") -> None:
        check_chunk_size(chunk_size)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
        self.chunk_size, self.backend = chunk_size, backend
        self.patched: list[str] = []
        self._announced = False

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and not is_chunked(pl_module):
            self.patched = apply_chunked_cross_entropy(pl_module, self.chunk_size, self.backend)
            rank_zero_info(f"ChunkedCrossEntropyCallback: {', '.join(self.patched)} compute their loss in chunks")

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.backend == "cce" and (pl_module.device.type != "cuda" or find_spec("cut_cross_entropy") is None):
            raise ValueError(
                f"backend='cce' needs the model on CUDA (it is on {pl_module.device.type}) and `pip install "
                "cut-cross-entropy`; backend='auto' falls back to the chunked PyTorch path"
            )

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        if not self._announced and last_backend(pl_module) is not None:
            self._announced = True
            ran = last_backend(pl_module)
            kernel = "Cut Cross-Entropy's fused kernel" if ran == "cce" else "the chunked PyTorch path"
            rank_zero_info(f"ChunkedCrossEntropyCallback: the loss ran on {kernel}")

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            remove_chunked_cross_entropy(pl_module)

    def summary(self) -> str:
        """One line for the `lowvram` summary."""
        return f"chunked cross-entropy on {', '.join(self.patched) or 'nothing'}"
