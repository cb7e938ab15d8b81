"""Fine-tune a Hugging Face causal LM with plain Lightning and three lightning-lowvram callbacks.

A tiny GPT-2 built from its config (random weights, no download) learns the text shipped with the package, byte by
byte, in padded batches whose padding is labelled -100, the way HF tokenizers and collators prepare them. On a card
smaller than the step needs (emulated here on the CPU: a budget that raises the real torch.OutOfMemoryError):

- AutoMicroBatchCallback splits each batch into the largest micro-batches that fit; count_fn="causal_lm_tokens"
  weights them as HF's loss does (a mean over the label tokens), so the update equals the whole batch's;
- ActivationCheckpointingCallback recomputes each GPT-2 block's activations in backward instead of keeping them;
- DynamicQuantCallback runs the test stage in int8 (GPT-2's Conv1D layers included) and prints float vs int8.

Run: python examples/hf_finetune.py   (needs `transformers`: pip install -e ".[dev]")
"""

from importlib import resources

import lightning as L
import torch
from torch.utils.data import DataLoader
from transformers import GPT2Config, GPT2LMHeadModel

from lightning_lowvram import (
    ActivationCheckpointingCallback,
    AutoMicroBatchCallback,
    DynamicQuantCallback,
    estimate_step_memory,
    format_bytes,
    memory_budget,
)


class CausalLM(L.LightningModule):
    def __init__(self, model: torch.nn.Module, lr: float = 3e-3):
        super().__init__()
        self.model, self.lr = model, lr

    def training_step(self, batch, batch_idx):
        loss = self.model(**batch).loss
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def test_step(self, batch, batch_idx):
        self.log("test_loss", self.model(**batch).loss)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def text_batches(batch_size: int = 16, seq: int = 64) -> DataLoader:
    """Lines of the bundled text as bytes, right-padded; labels are the ids with -100 on the padding."""
    text = (resources.files("lightning_lowvram.demo") / "tiny_text.txt").read_bytes()
    lines = [line[:seq] for line in text.splitlines() if len(line) > 8]

    def collate(rows):
        ids = torch.zeros(len(rows), seq, dtype=torch.long)
        mask = torch.zeros(len(rows), seq, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(list(row)), 1
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}

    return DataLoader(lines, batch_size=batch_size, collate_fn=collate)


def main() -> None:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=256, n_positions=64, n_embd=64, n_layer=4, n_head=4, bos_token_id=0, eos_token_id=0)
    module, data = CausalLM(GPT2LMHeadModel(config)), text_batches()
    batch = next(iter(data))
    # a card with room for a quarter of the batch (with checkpointing), not for all of it
    quarter = estimate_step_memory(module, batch, micro_batch_size=4, activation_checkpointing=True)
    micro = AutoMicroBatchCallback(count_fn="causal_lm_tokens")
    quant = DynamicQuantCallback(stages=("test",))
    callbacks = [micro, ActivationCheckpointingCallback(), quant]
    trainer = L.Trainer(max_epochs=2, callbacks=callbacks, logger=False, enable_checkpointing=False)
    with memory_budget(int(quarter.peak * 1.2), device="cpu"):
        trainer.fit(module, data)
    trainer.test(module, data, verbose=False)
    print(f"budget {format_bytes(int(quarter.peak * 1.2))}: batch 16 ran as micro-batches of {micro.sizes['train']}")
    print(f"test loss: float {quant.comparison['test']['test_loss']['float']:.3f}, "
          f"int8 {quant.comparison['test']['test_loss']['int8']:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
