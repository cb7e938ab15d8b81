"""LoRA on a float, int8 and NF4 frozen base: bytes of the base, step time and final training loss.

A Llama-style model (random init from its config, no download: hidden 256, 4 layers, 8 query / 4 key-value heads,
byte vocabulary) fits the bundled text (``lightning_lowvram/demo/tiny_text.txt``, sequences of 128 bytes, batch 8)
with peft's LoRA (r=8, alpha 16, on the attention projections q/k/v/o), AdamW lr 3e-3, the same seed, batches and
steps for the three bases. The base is converted by ``quantize_frozen_base`` (what ``LowBitBaseCallback`` runs in
``setup``). Final loss: the mean of the last 20 steps. Step time: median over the run, same process, back to back.

Run: ``python -m benchmarks.low_bit_base`` from the repository root (about three minutes on 2 CPU cores).
"""

from __future__ import annotations

import platform
import statistics
import time
from datetime import date
from importlib import resources

import torch

from lightning_lowvram.cores.dynamic_quant import linear_bytes
from lightning_lowvram.cores.low_bit_base import frozen_linear_layers, quantize_frozen_base

STEPS, SEQ, BATCH = 200, 128, 8


def model() -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=SEQ)  # fmt: skip
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    return get_peft_model(LlamaForCausalLM(config), lora)


def batches() -> list[torch.Tensor]:
    text = (resources.files("lightning_lowvram.demo") / "tiny_text.txt").read_bytes()
    data = torch.tensor(list(text), dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(0, len(data) - SEQ, (STEPS, BATCH), generator=g)
    return [torch.stack([data[s : s + SEQ] for s in row]) for row in starts]


def run(bits: int | None, data: list[torch.Tensor]) -> dict[str, float]:
    net = model()
    frozen = frozen_linear_layers(net)
    float_bytes = linear_bytes(net, frozen)
    if bits is not None:
        report = quantize_frozen_base(net, bits)
        assert not report.kept, report.kept
    base_bytes = linear_bytes(net, frozen)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=3e-3)
    losses, times = [], []
    for ids in data:
        start = time.perf_counter()
        loss = net(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    return {"bytes": base_bytes, "float_bytes": float_bytes, "step": statistics.median(times),
            "first": statistics.mean(losses[:5]), "final": statistics.mean(losses[-20:])}  # fmt: skip


def main() -> None:
    torch.set_num_threads(2)
    data = batches()
    print(f"# low_bit_base — {date.today()} — {platform.machine()}, torch {torch.__version__}")
    print(
        f"Llama-style, hidden 256 x 4 layers (GQA 8/4), LoRA r=8 on q/k/v/o, {STEPS} steps of {BATCH} x {SEQ} bytes\n"
    )
    rows = {name: run(bits, data) for name, bits in (("float32", None), ("int8", 8), ("NF4", 4))}
    ref = rows["float32"]
    print(
        "| frozen base | base bytes | vs float32 | s / step | vs float32 | loss, first 5 | loss, last 20 | vs float32 |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        size = f"{r['bytes'] / 2**20:.2f} MiB | {r['bytes'] / ref['float_bytes']:.3f}"
        speed = f"{r['step']:.3f} | {r['step'] / ref['step']:.2f}"
        print(f"| {name} | {size} | {speed} | {r['first']:.3f} | {r['final']:.3f} | {r['final'] / ref['final']:.3f} |")


if __name__ == "__main__":
    main()
