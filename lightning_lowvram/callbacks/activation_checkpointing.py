"""ActivationCheckpointingCallback: checkpoint repeated blocks on one device or under DDP."""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_lowvram.cores.activation_checkpointing import checkpoint_blocks, uncheckpoint_blocks
from lightning_lowvram.cores.tiled_mlp import mlp_modules, tile_mlps, untile_mlps


class ActivationCheckpointingCallback(Callback):
    """Recompute repeated blocks' activations in backward instead of keeping them.

    Lightning offers activation checkpointing only inside FSDP/DeepSpeed. Blocks are the repeated children of
    ``ModuleList``/``Sequential`` containers (transformer layers), or the modules named by ``blocks`` (fnmatch
    patterns). Losses and gradients equal the unwrapped run's (non-reentrant ``torch.utils.checkpoint``, RNG state
    preserved for dropout); the blocks' activations are not kept (tested: under 0.6x of the activation bytes on a
    4-block GPT), and each block's forward runs twice. Parameter names and checkpoints are unchanged. Under DDP (tested
    with 2 gloo processes and dropout) the ranks stay identical and equal to the unwrapped DDP run.

    The one trap: a block's forward runs twice per step, so side effects in it (counters, prints) happen twice.

    With ``offload=True`` each block's saved inputs wait in host memory (pinned on CUDA) until its recomputation, so
    the card holds nothing per block (exact: the gradients equal plain checkpointing's, tested); the copies cost PCIe
    time, and on CUDA they are **unverified** (no GPU has run them here). On the emulated card (CPU) the budget counts
    only what the card would hold.

    With ``tile_mlp=True`` each block's MLP also runs a tile of the sequence at a time and is recomputed tile by tile
    in its backward (:mod:`lightning_lowvram.cores.tiled_mlp`, Arctic's TiledMLP): at long contexts the MLP's
    intermediates are most of what the block being back-propagated holds. Exact (gradients within float32 rounding
    of the plain step's, tested on Llama, Mistral, Qwen2, Gemma-2 and GPT-2); each MLP's forward runs a third time.

    Args:
        blocks: fnmatch patterns of module names to checkpoint; ``None`` detects repeated blocks.
        offload: Keep the checkpointed blocks' saved inputs in host memory between forward and backward.
        tile_mlp: Tile the blocks' MLPs along the sequence (tiles of ``hidden_size`` tokens).

    Raises:
        ValueError: At setup, when a pattern matches nothing or no repeated block exists; with ``tile_mlp``, when the
            blocks have no MLP it can tile (or a mixture of experts), naming it.

    Example:
        >>> from lightning_lowvram.demo import TinyGPT
        >>> callback = ActivationCheckpointingCallback()
        >>> callback.setup(None, TinyGPT(n_layer=2), "fit")
        >>> callback.blocks_wrapped
        ['blocks.0', 'blocks.1']

    """

    def __init__(self, blocks: Sequence[str] | None = None, offload: bool = False, tile_mlp: bool = False) -> None:
        for key, value in (("offload", offload), ("tile_mlp", tile_mlp)):
            if not isinstance(value, bool):
                raise ValueError(f"{key} must be true or false, got {value!r}")
        self.tile_mlp = tile_mlp
        self.blocks = [blocks] if isinstance(blocks, str) else (list(blocks) if blocks is not None else None)
        self.offload = offload
        self.blocks_wrapped: list[str] = []
        self.mlps_tiled: list[str] = []
        self._last_wrapped: list[str] = []  # what the last fit checkpointed, for the summary after teardown

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and not self.blocks_wrapped:
            if self.tile_mlp:
                mlp_modules(pl_module)  # refused before anything is wrapped
            self.blocks_wrapped = checkpoint_blocks(pl_module, self.blocks, offload=self.offload)
            self.mlps_tiled = tile_mlps(pl_module) if self.tile_mlp else []
            self._last_wrapped = list(self.blocks_wrapped)
            rank_zero_info(f"ActivationCheckpointingCallback: {self.summary()}")

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            uncheckpoint_blocks(pl_module)
            untile_mlps(pl_module)
            self.blocks_wrapped = []

    def summary(self) -> str:
        """One line for the `lowvram` summary."""
        offloaded = ", their inputs in host memory" if self.offload else ""
        offloaded += f", {len(self.mlps_tiled)} MLPs tiled" if self.tile_mlp else ""
        return f"{len(self.blocks_wrapped or self._last_wrapped)} blocks checkpointed{offloaded}"
