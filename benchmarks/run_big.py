"""Running a model bigger than the card (issue 24's showcase): the evaluation plan, beside accelerate's device_map.

Part 1, predictions (nothing here ran on a GPU): Llama-3.1-8B's shape (bf16 weights, 15 GiB) on ``gtx1660_6gb`` and
``rtx3060_12gb``, Llama-3.1-70B's shape (bf16, 131 GiB) on ``rtx4090_24gb``, built on the meta device. One
``predict_step`` (the logits) of a batch of 1 x 2048 tokens, ``bf16-true``. ``plan_eval`` picks the fastest setting
that fits (eval micro-batch, streaming with the most resident blocks that fit); its time per forward is the step-time
model's (compute plus every streamed byte over PCIe at the profile's ``pcie_gbs``, not overlapped: the slow side).
Beside it, what accelerate's ``infer_auto_device_map`` (``max_memory`` = the card's tensor budget) places on the card:
it counts parameters only (no activations, no logits), and our estimator's peak for that many resident blocks (the
safe side: ours keeps the head on the card, where accelerate's map puts it in host memory).

Part 2, real runs at a scaled-down size on this machine's CPU under the emulated budget (``memory_budget``): a Llama
of 16 blocks (hidden 256) whose card holds half its weights, GPT-2 and BERT likewise; the plan's callbacks run
``Trainer.predict``/``validate``; outputs compared with the in-memory model's, the meter's peak with the plan's.

    python -m benchmarks.run_big
"""

from __future__ import annotations

import dataclasses
import datetime
import platform
import time
import warnings

import lightning as L
import torch
from accelerate import infer_auto_device_map
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from lightning_lowvram import MemoryMeter, gpu_profile, memory_budget, plan_eval
from lightning_lowvram.compose import eval_plan_callbacks
from lightning_lowvram.memory.profiles import GiB, format_bytes
from lightning_lowvram.planner.evaluation import estimate_eval_memory, with_resident

SHAPES = {
    "Llama-3.1-8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32),
    "Llama-3.1-70B": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64),
}
CASES = (("Llama-3.1-8B", "gtx1660_6gb"), ("Llama-3.1-8B", "rtx3060_12gb"), ("Llama-3.1-70B", "rtx4090_24gb"))


class Predictor(L.LightningModule):
    """A user's module for running a HF model: dict batches, the logits (or the loss) out."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def predict_step(self, batch, batch_idx):
        return self.model(**{k: v for k, v in batch.items() if k != "labels"}).logits

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.model(**batch).loss)


def _llama(shape: str) -> Predictor:
    config = LlamaConfig(vocab_size=128256, num_key_value_heads=8, max_position_embeddings=131072,
                         rope_theta=500000.0, tie_word_embeddings=False, **SHAPES[shape])  # fmt: skip
    with torch.device("meta"):
        return Predictor(LlamaForCausalLM(config).to(torch.bfloat16))


def _accelerate(module: Predictor, budget: int) -> tuple[int, int]:
    """Blocks and weight bytes accelerate's device_map="auto" puts on a card of ``budget`` bytes (parameters only)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        placed = infer_auto_device_map(module.model, max_memory={0: budget, "cpu": 1024 * GiB},
                                       no_split_module_classes=["LlamaDecoderLayer"], dtype=torch.bfloat16)  # fmt: skip
    on_card = {name for name, device in placed.items() if device == 0}
    blocks = sum(1 for name in on_card if ".layers." in name)
    weights = sum(p.numel() * 2 for n, p in module.model.named_parameters()
                  if any(n == m or n.startswith(m + ".") for m in on_card))  # fmt: skip
    return blocks, weights


def predictions() -> None:
    print("\n## predicted: one forward of 1 x 2048 tokens (predict_step, bf16-true), plan_eval vs accelerate")
    print("| model | card | budget | in memory | plan's choice | predicted peak | host | s / forward | "
          "accelerate device_map: blocks on the card (weights) | our peak for that placement |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    batch = {"input_ids": torch.zeros(1, 2048, dtype=torch.long)}
    for shape, card in CASES:
        module = _llama(shape)
        start = time.perf_counter()
        chosen = plan_eval(module, batch, card, "predict", precision="bf16-true")
        took = time.perf_counter() - start
        plain, picked = chosen.candidates[0], chosen.chosen
        profile = gpu_profile(card)
        blocks, weights = _accelerate(module, chosen.budget)
        streamed = estimate_eval_memory(module, batch, "predict", precision="bf16-true", gpu=card, resident_blocks=0)
        theirs = with_resident(streamed, module, min(blocks, SHAPES[shape]["num_hidden_layers"]), "bf16-true")
        fits = "fits" if theirs.peak - theirs.allowance <= chosen.budget else "over the budget"
        print(
            f"| {shape} | {card} | {format_bytes(chosen.budget)} | {format_bytes(plain.tensor_peak)} | "
            f"{picked.label if picked else 'nothing fits'} | {format_bytes(picked.tensor_peak) if picked else '-'} | "
            f"{format_bytes(picked.estimate.host) if picked else '-'} | {picked.seconds if picked else 0:.2f} | "
            f"{blocks} of {SHAPES[shape]['num_hidden_layers']} ({format_bytes(weights)}) | "
            f"{format_bytes(theirs.peak - theirs.allowance)} ({fits}) |"
        )
        print(f"<!-- planned in {took:.1f} s; pcie {profile.pcie_gbs} GB/s -->")


def _tiny(name: str) -> tuple[Predictor, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    if name == "llama":
        config = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=16,
                             num_attention_heads=8, num_key_value_heads=2)  # fmt: skip
        model = LlamaForCausalLM(config)
    elif name == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=1024, n_embd=256, n_layer=16, n_head=8))
    else:
        model = BertForSequenceClassification(BertConfig(vocab_size=1024, hidden_size=256, intermediate_size=512,
                                                         num_hidden_layers=16, num_attention_heads=8))  # fmt: skip
    ids = torch.randint(0, 1024, (2, 32), generator=torch.Generator().manual_seed(1))
    return Predictor(model.eval()), {"input_ids": ids, "labels": ids if name != "bert" else torch.zeros(2).long()}


def real_runs() -> None:
    print("\n## measured on this machine's CPU: the plan's setting under a budget of half the weights")
    print("| model | weights | budget | plan's choice | predicted peak (card's rules) | predicted (CPU rules) | "
          "measured peak (CPU) | max abs diff vs in memory |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for name in ("llama", "gpt2", "bert"):
        module, batch = _tiny(name)
        weights = sum(p.numel() * p.element_size() for p in module.parameters())
        card = dataclasses.replace(gpu_profile("rtx3060_12gb"), name="half", memory_gib=weights / 2 / GiB,
                                   context_mib=0.0)  # fmt: skip
        stage = "validate" if name == "bert" else "predict"
        chosen = plan_eval(module, batch, card, stage)
        trainer = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False}
        loader = torch.utils.data.DataLoader([batch], batch_size=None)  # one batch, as is
        if stage == "predict":
            expected = L.Trainer(accelerator="cpu", **trainer).predict(module, loader)
        else:
            expected = L.Trainer(accelerator="cpu", **trainer).validate(module, loader, verbose=False)
        with memory_budget(card.usable_bytes), MemoryMeter() as meter:
            run = L.Trainer(accelerator="cpu", callbacks=eval_plan_callbacks(chosen), **trainer)
            got = run.predict(module, loader) if stage == "predict" else run.validate(module, loader, verbose=False)
        picked = chosen.chosen
        here = estimate_eval_memory(module, batch, stage, micro_batch_size=picked.micro_batch_size,  # type: ignore[arg-type]
                                    resident_blocks=picked.resident_blocks)  # fmt: skip
        if stage == "predict":
            diff = max((a - b).abs().max().item() for a, b in zip(got, expected, strict=True))
        else:
            diff = abs(got[0]["val_loss"] - expected[0]["val_loss"])
        print(
            f"| {name} ({stage}) | {format_bytes(weights)} | {format_bytes(card.usable_bytes)} | "
            f"{picked.label} | {format_bytes(picked.tensor_peak)} | {format_bytes(here.peak)} | "
            f"{format_bytes(meter.peak.total)} | {diff:.1e} |"
        )


def main() -> None:
    print(f"# run_big — {datetime.date.today()} — {platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")  # fmt: skip
    predictions()
    real_runs()


if __name__ == "__main__":
    main()
