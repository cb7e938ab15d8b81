"""Showcase: LoRA fine-tuning of a 1.1B-parameter Llama-style model at sequence 2048 on a 12 GB and a 6 GB card.

The model is TinyLlama-1.1B's configuration (hidden 2048, 22 layers, 32 query / 4 key-value heads, MLP 5632,
vocabulary 32000, untied head), random init from the config (no download), with peft's LoRA (r=8, alpha 16) on the
attention projections q/k/v/o: the base (1.1B weights, float32 as loaded) is frozen. Batch 4 x 2048 tokens, AdamW.

Part 1 (estimates only, no GPU): for each card and each frozen base (float32 as loaded, int8, NF4), the fastest
setting the planner predicts fits, or the smallest predicted peak when nothing does.

Part 2 (``--steps N``): N real training steps of the 6 GB case through the ``lowvram`` app, under the CPU-emulated
``gtx1660_6gb`` budget (the real ``torch.OutOfMemoryError`` past it): ``strategy=auto
strategy.allow_low_bit_base=true``, the plan applied, then the measured peak. Slow on a CPU (minutes a step).

Run: ``python -m benchmarks.lora_showcase`` (part 1, about two minutes on 2 CPU cores and 6 GB of RAM);
``python -m benchmarks.lora_showcase --steps 2`` adds part 2 (minutes a step, 12 GB of RAM).
"""

from __future__ import annotations

import argparse
import platform
import time
import warnings
from datetime import date
from importlib import resources

import lightning as L
import torch
from torch.utils.data import DataLoader

from lightning_lowvram.memory.profiles import format_bytes
from lightning_lowvram.planner import plan
from lightning_lowvram.planner.search import tensor_peak

SEQ, BATCH = 2048, 4
CARDS = ("rtx3060_12gb", "gtx1660_6gb")


class Llama1B(L.LightningModule):
    """TinyLlama-1.1B's shape, random init, LoRA r=8 on q/k/v/o (peft): a dict batch in, ``outputs.loss`` out.

    Args:
        layers: Decoder layers (22 in TinyLlama-1.1B).
        lr: AdamW learning rate of the trained weights.
        lora: LoRA adapters on a frozen base; ``False``: full fine-tuning (every weight trains).

    """

    def __init__(self, layers: int = 22, lr: float = 2e-4, lora: bool = True) -> None:
        super().__init__()
        from peft import LoraConfig, get_peft_model
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
            num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=SEQ, tie_word_embeddings=False,
        )  # fmt: skip
        model, self.lr = LlamaForCausalLM(config), lr
        adapters = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
        self.model = get_peft_model(model, adapters) if lora else model

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(**batch).loss
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)


class TextTokens(L.LightningDataModule):
    """The bundled text (3.6 KB, repeated) as byte tokens: 4 batches of ``batch_size`` windows of ``SEQ`` bytes.

    Labels are the inputs (the model shifts them).
    """

    def __init__(self, batch_size: int = BATCH) -> None:
        super().__init__()
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        text = (resources.files("lightning_lowvram.demo") / "tiny_text.txt").read_bytes()
        needed = 4 * self.batch_size * SEQ
        data = torch.tensor(list(text) * (needed // len(text) + 1), dtype=torch.long)
        rows = [data[i * SEQ : (i + 1) * SEQ] for i in range(4 * self.batch_size)]
        return DataLoader(rows, batch_size=self.batch_size, collate_fn=lambda r: _batch(torch.stack(r)))


def _batch(ids: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"input_ids": ids, "labels": ids}


def part1(module: Llama1B) -> None:
    batch = _batch(torch.zeros(BATCH, SEQ, dtype=torch.long))
    params = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    print(f"{params / 1e9:.2f}B parameters, {trainable / 1e6:.1f}M trainable (LoRA); batch {BATCH} x {SEQ} tokens\n")
    print("| card | frozen base | fastest setting that fits (predicted) | tensor peak | budget | s / step |")
    print("|---|---|---|---|---|---|")
    for card in CARDS:
        start = time.perf_counter()
        result = plan(module, batch, card, allow_low_bit_base=True)
        budget = format_bytes(result.budget)
        for bits, name in ((0, "float32"), (8, "int8"), (4, "NF4")):
            options = [c for c in result.candidates if c.base_bits == bits]
            fitting = sorted((c for c in options if c.fits), key=lambda c: c.step_time)
            if fitting:
                c = fitting[0]
                print(f"| {card} | {name} | {c.label} | {format_bytes(tensor_peak(c))} | {budget} | "
                      f"{c.step_time:.1f} |")  # fmt: skip
            else:
                c = min(options, key=tensor_peak)
                print(f"| {card} | {name} | nothing fits (smallest: {c.label}) | {format_bytes(tensor_peak(c))} | "
                      f"{budget} | - |")  # fmt: skip
        print(f"<!-- {card}: planned in {time.perf_counter() - start:.0f} s; chosen: {result.chosen.label} -->")


def part2(steps: int) -> None:
    from lightning_lowvram.cli import main

    args = [
        "fit", "example=none", "gpu=gtx1660_6gb", "strategy=auto", "strategy.allow_low_bit_base=true",
        "model._target_=benchmarks.lora_showcase.Llama1B", "data._target_=benchmarks.lora_showcase.TextTokens",
        f"trainer.max_steps={steps}", "trainer.limit_val_batches=0", "test_after_fit=false",
        "trainer.enable_checkpointing=false", "trainer.logger=false",
    ]  # fmt: skip
    print("\nlowvram " + " ".join(args))
    start = time.perf_counter()
    main(args)
    print(f"({time.perf_counter() - start:.0f} s in all, model build and planning included)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=0, help="real steps of the 6 GB case under the emulated budget")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    print(f"# lora_showcase — {date.today()} — {platform.machine()}, torch {torch.__version__}")
    part1(Llama1B())
    if args.steps:
        part2(args.steps)


if __name__ == "__main__":
    main()
