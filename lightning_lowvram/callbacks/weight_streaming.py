"""WeightStreamingCallback: validate, test and predict a model whose weights do not fit the card."""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_lowvram.cores.streaming import Streaming, is_streamed, stream_blocks, unstream_blocks

_STAGES = ("validate", "test", "predict")


class WeightStreamingCallback(Callback):
    """Keep the model's repeated blocks in host memory and bring each to the card for its forward (evaluation only).

    :mod:`lightning_lowvram.cores.streaming` over accelerate's big-model hooks: the card holds the embeddings, the
    head, every buffer, the first ``resident_blocks`` blocks and one streamed block at a time (two on CUDA, where the
    next block's copy overlaps the current block's compute). Outputs equal the in-memory model's (float32, tested to
    1e-6 on HF Llama, GPT-2, BERT and a Conv+BatchNorm net). Each streamed block's weights cross PCIe once per forward;
    ``resident_blocks`` trades card memory for that time (llama.cpp's ``-ngl``). Set up before Lightning moves the
    model to the card, so the streamed weights never reach it whole. The weights are put back at teardown.

    The one trap: ``fit`` is not streamed (its backward would need every block's weights again and their gradients);
    in ``fit`` the callback changes nothing and says so, and the validation inside ``fit`` runs unstreamed.

    On CUDA the prefetch on a side stream is **unverified** (no GPU has run it here); on CPU the emulated budget counts
    what the card would hold (``memory_budget``), and the host copies are outside it.

    Args:
        resident_blocks: Blocks kept on the card (the first ones), from 0 to the number of blocks.
        blocks: Names of the modules to stream, in forward order; ``None``: the repeated blocks (transformer layers).
        stages: The stages to stream in.

    Raises:
        ValueError: ``resident_blocks`` below 0 (here) or above the model's blocks, a model without repeated blocks
            (naming its largest children), or a stage that is not ``validate``/``test``/``predict``; at setup,
            before any step, with the model unchanged.

    Example:
        >>> from lightning_lowvram.demo import TinyGPT
        >>> callback = WeightStreamingCallback(resident_blocks=1)
        >>> model = TinyGPT(n_layer=3)
        >>> callback.setup(None, model, "validate")
        >>> callback.streaming.streamed
        ['blocks.1', 'blocks.2']
        >>> callback.teardown(None, model, "validate")

    """

    def __init__(
        self,
        resident_blocks: int = 0,
        blocks: Sequence[str] | None = None,
        stages: Sequence[str] = _STAGES,
    ) -> None:
        if isinstance(resident_blocks, bool) or not isinstance(resident_blocks, int) or resident_blocks < 0:
            raise ValueError(f"resident_blocks must be a whole number >= 0, got {resident_blocks!r}")
        unknown = [s for s in stages if s not in _STAGES]
        if unknown:
            raise ValueError(f"stages: {unknown[0]!r} is not one of {', '.join(_STAGES)}")
        self.resident_blocks = resident_blocks
        self.blocks = list(blocks) if blocks is not None else None
        self.stages = tuple(stages)
        self.streaming: Streaming | None = None
        self._said_fit = False

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            if not self._said_fit:
                rank_zero_info("WeightStreamingCallback: fit is not streamed (evaluation stages only): nothing changed")
                self._said_fit = True
            return
        if stage not in self.stages or is_streamed(pl_module):
            return
        device = trainer.strategy.root_device if trainer is not None else "cpu"
        self.streaming = stream_blocks(pl_module, device, self.resident_blocks, self.blocks)
        rank_zero_info(f"WeightStreamingCallback: {self.streaming}")

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._put_back(pl_module)

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._put_back(pl_module)  # Lightning skips teardown after an error (an OOM): the weights come back anyway

    def _put_back(self, pl_module: L.LightningModule) -> None:
        if self.streaming is not None:
            unstream_blocks(pl_module)
            self.streaming = None
