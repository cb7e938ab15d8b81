"""Compare ``estimate_step_memory`` (CUDA rules) with ``torch.cuda.max_memory_allocated`` on a real GPU.

For the demo models at several micro-batch sizes, fp32 and bf16 autocast: the same two training steps run for real on
the GPU (allocator peak) and on fake tensors under the CUDA rules of *this* card (its compute capability picks the
attention kernel; the estimate is taken without the context allowance). The GPT runs with and without dropout (with
dropout a CPU trace would take the math attention path). Then the families no GPU has checked yet (issue 12): HF
Llama (grouped-query attention) and BERT at hidden 768 x 4 layers, sequence 512, and resnet18, batch 8/32, fp32 and
bf16-mixed, as dict batches through ``tests/real_models``' LightningModule wrappers. Goal: within 5 %, never more than
3 % low.
Needs CUDA; on a machine without it, it says so and exits. Not yet run: no GPU was lent to the task that wrote it.

Run: ``python -m benchmarks.gpu_validate_estimate``.
"""

from __future__ import annotations

import copy
import dataclasses
import sys

import torch
from lightning.pytorch.utilities import move_data_to_device

from lightning_lowvram.demo import DigitsMLP, TinyGPT
from lightning_lowvram.memory.profiles import detect_gpu
from lightning_lowvram.planner.cuda_rules import sdpa_backend
from lightning_lowvram.planner.estimate import _autocast, _optimizer, estimate_step_memory


def measured(module: torch.nn.Module, batch: tuple[torch.Tensor, ...], precision: str) -> int:
    model = copy.deepcopy(module).cuda().train()
    model.__dict__["log"] = lambda *args, **kwargs: None
    batch = move_data_to_device(batch, torch.device("cuda"))
    opt = _optimizer(model, None)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    for _ in range(2):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            loss = model.training_step(batch, 0)
        loss.backward()
        del loss
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base + sum(p.nbytes for p in model.parameters())


_FAMILIES = ("hf llama", "hf bert", "resnet18")


def _other_families() -> dict[str, tuple[torch.nn.Module, object]]:
    """HF Llama and BERT (random init from configs) and resnet18's shapes, as users wrap them."""
    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

    from lightning_lowvram.demo.hf import HFModule
    from lightning_lowvram.demo.resnet import ResNetModule, resnet18

    def tokens(n: int, labels: str = "ids") -> dict[str, torch.Tensor]:
        ids = torch.randint(1, 1000, (n, 512))
        return {"input_ids": ids, "labels": ids if labels == "ids" else torch.randint(0, 2, (n,))}

    llama = LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=4,
                        num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=512)  # fmt: skip
    bert = BertConfig(vocab_size=30522, hidden_size=768, num_hidden_layers=4, num_attention_heads=12,
                      intermediate_size=3072, max_position_embeddings=512, num_labels=2)  # fmt: skip
    resnet = ResNetModule()
    resnet.net = resnet18()
    return {
        "hf llama": (HFModule(LlamaForCausalLM(llama), optimizer="adamw"), tokens),
        "hf bert": (HFModule(BertForSequenceClassification(bert), optimizer="adamw"), lambda n: tokens(n, "class")),
        "resnet18": (resnet, lambda n: (torch.randn(n, 3, 224, 224), torch.randint(0, 1000, (n,)))),
    }


def main() -> None:
    if not torch.cuda.is_available():
        print("gpu_validate_estimate: needs a CUDA device; this machine has none")
        sys.exit(0)
    assert _autocast  # the estimator's autocast mirrors the one above
    card = dataclasses.replace(detect_gpu(), context_mib=0.0, free_gib=None)  # this card's rules, no allowance
    print(f"card: {card.display_name}, compute capability {card.compute_capability}\n")

    def text(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randint(0, 256, (n, 256)), torch.randint(0, 256, (n, 256))

    cases = {
        "digits_mlp": (DigitsMLP(hidden=1024, depth=3), lambda n: (torch.randn(n, 64), torch.randint(0, 10, (n,)))),
        "tiny_gpt": (TinyGPT(seq_len=256, d_model=256, n_head=8, n_layer=4), text),
        "tiny_gpt dropout 0.1": (TinyGPT(seq_len=256, d_model=256, n_head=8, n_layer=4, dropout=0.1), text),
    }
    cases.update(_other_families())
    q = torch.zeros(1, 8, 256, 32, requires_grad=True)
    for dtype in (torch.float32, torch.bfloat16):
        kernel = sdpa_backend(q.to(dtype), q.to(dtype), q.to(dtype), compute_capability=card.compute_capability)
        print(f"attention kernel the rules pick for the GPT in {dtype}: {kernel}")
    print("\n| model | batch | precision | estimate (MiB) | measured (MiB) | estimate/measured |")
    print("|---|---|---|---|---|---|")
    for name, (module, make) in cases.items():
        for n in (8, 32) if name in _FAMILIES else (4, 16, 64):
            for precision in ("32-true", "bf16-mixed"):
                batch = make(n)
                estimate = estimate_step_memory(module, batch, precision=precision, gpu=card)
                real = measured(module, batch, precision)
                print(
                    f"| {name} | {n} | {precision} | {estimate.peak / 2**20:.1f} | {real / 2**20:.1f} | "
                    f"{estimate.peak / real:.3f} |"
                )


if __name__ == "__main__":
    main()
