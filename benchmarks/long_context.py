"""Longest context that fits a card for LoRA / QLoRA fine-tuning, predicted (issue 23's showcase).

Llama-3.2-1B's shape (vocabulary 128256, tied embeddings), peft LoRA r=16 on all seven projections, bf16 weights
(``bf16-true``), batch 1, activation checkpointing; and Llama-3.1-8B's shape loaded in bf16, QLoRA (NF4 frozen base
modelled as ``LowBitBaseCallback(bits=4)`` stores it, r=32 on all linear layers, adapters float32 as peft keeps them,
bf16-mixed compute), batch 1, checkpointing.
Both built on the meta device (no weights in RAM). "before": the landed head and loss (whole float32 logits);
"chunked CE": ChunkedCrossEntropyCallback; "+ offload": and ActivationCheckpointingCallback(offload=True) (the
checkpointed blocks' inputs in host memory); "+ tiled MLP": and ``tile_mlp=True`` (the blocks' MLPs a tile of the
sequence at a time). The NF4 base is modelled per phase (``lowbit.low_bit_phases``). Predictions of
``planner.context.longest_sequence`` (multiples of 1024 tokens, margin 10 %, at most the models' 131,072-token
context); nothing here ran on a GPU. Unsloth's
and HF+FA2's numbers are as published (ANCHORS.md), not measured.

    python -m benchmarks.long_context            # both models, every card
    python -m benchmarks.long_context 8B rtx3060_12gb   # one model's rows, one card
"""

from __future__ import annotations

import datetime
import platform
import time

import lightning as L
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_lowvram.cores.low_bit_base import low_bit_phases
from lightning_lowvram.planner.context import longest_sequence

CONTEXT = 131072  # both models' max_position_embeddings: the search stops there
CARDS = ("rtx4060_8gb", "rtx3060_12gb", "rtx4080_16gb", "rtx4090_24gb")
UNSLOTH_8B = {"rtx4060_8gb": 2972, "rtx3060_12gb": 21848, "rtx4080_16gb": 40724, "rtx4090_24gb": 78475}  # published
HF_FA2_8B = {"rtx4060_8gb": "OOM", "rtx3060_12gb": 932, "rtx4080_16gb": 2551, "rtx4090_24gb": 5789}  # published


class CausalLMModule(L.LightningModule):
    """A user's LoRA fine-tuning module: dict batches, ``outputs.loss``, the loss logged as a Python float."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        loss = self.model(**batch).loss
        self.log("train_loss", loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-4)


def llama_1b() -> CausalLMModule:
    config = LlamaConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, max_position_embeddings=131072, rope_theta=500000.0,
        tie_word_embeddings=True,
    )  # fmt: skip
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return CausalLMModule(get_peft_model(model, LoraConfig(r=16, target_modules=targets)))


def llama_8b() -> CausalLMModule:
    config = LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=False,
    )  # fmt: skip
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)  # as QLoRA users load it (torch_dtype=torch.bfloat16)
    return CausalLMModule(get_peft_model(model, LoraConfig(r=32, target_modules="all-linear")))


def main(only: str | None = None, card_only: str | None = None) -> None:
    print(f"# long_context — {datetime.date.today()} — {platform.machine()}, torch {torch.__version__}; predictions")
    batch = {"input_ids": torch.zeros(1, 1024, dtype=torch.long), "labels": torch.zeros(1, 1024, dtype=torch.long)}
    rows = []
    for name, build, kwargs, bits in (
        ("Llama-3.2-1B LoRA r=16, bf16", llama_1b, {"precision": "bf16-true"}, 0),
        ("Llama-3.1-8B QLoRA r=32 (NF4)", llama_8b, {"precision": "bf16-mixed"}, 4),
    ):
        if only and only not in name:
            continue
        module = build()
        for card in CARDS:
            if card_only and card != card_only:
                continue
            cells = []
            for chunked, offload, tiled in ((False, False, False), (True, False, False), (True, True, False),
                                            (True, True, True)):  # fmt: skip
                started = time.perf_counter()
                saving = low_bit_phases(module, bits, chunked_head=chunked) if bits else 0
                fit = longest_sequence(
                    module, batch, card, step=1024, saving=saving, activation_checkpointing=True, max_tokens=CONTEXT,
                    chunked_cross_entropy=chunked, offload_activations=offload, tiled_mlp=tiled, **kwargs,
                )  # fmt: skip
                host = f", {fit.estimate.host / 2**30:.2f} GiB host" if fit.estimate and fit.estimate.host else ""
                reached = "+ (the model's whole context)" if fit.tokens >= CONTEXT else ""
                cells.append((f"{fit.tokens:,}{reached}" if fit.tokens else "none") + host)
                print(f"  {name} {card}: {fit} [{time.perf_counter() - started:.0f} s]", flush=True)
            peers = f"{UNSLOTH_8B[card]:,} / {HF_FA2_8B[card]}" if bits else "-"
            rows.append(f"| {name} | {card} | {' | '.join(cells)} | {peers} |")
    header = "| model | card | before: whole logits | chunked CE | chunked CE + offload | + tiled MLP "
    header += "| 8B published: Unsloth / HF+FA2 |"
    print("\n" + header)
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    import sys

    main(*sys.argv[1:3])  # e.g. `8B rtx3060_12gb`: that model's rows, that card
