"""The strategies on the architectures users bring: one table, one run.

Models (random init, no download; builders in ``tests/real_models/models.py``): HF GPT-2, Llama (GQA 4/2 heads) and
BERT-for-classification at hidden 256, 4 layers, sequence 128, batch 16; a ResNet-style Conv+BatchNorm net (width 32,
8 basic blocks) on 32x32 images, batch 32. For each:

- parameters after ``prune_structured(0.5)``: the transformer blocks' (attention + MLP units) and the whole model's;
- bytes after int8 (``quantize_dynamic_int8``, torch_ao on CPU; shared tensors counted once) vs float;
- train-step time after pruning / before (forward + backward + SGD step in a plain loop, median of 20 steps, 3
  rounds alternating the order, median of the rounds' ratios);
- exactness of micro-batching: max |weight difference| after 2 SGD steps, micro-batches of 2 of 8 vs the whole batch
  (tiny configs as in the tests; the HF loss's count preset for the causal LMs).

Run: ``python -m benchmarks.real_models`` from the repository root (about two minutes on 2 CPU cores).
"""

from __future__ import annotations

import copy
import logging
import platform
import statistics
import time
import warnings
from datetime import date

import torch
from torch import nn

from benchmarks.common import quiet_trainer
from lightning_lowvram import AutoMicroBatchCallback
from lightning_lowvram.cores.dynamic_quant import module_bytes, quantize_dynamic_int8
from lightning_lowvram.cores.pruning import prune_structured
from lightning_lowvram.cores.pruning_units import find_units
from lightning_lowvram.demo.hf import HFModule, hf_batches, hf_model
from lightning_lowvram.demo.resnet import TinyResNet

NAMES = ("gpt2", "llama", "bert", "resnet")
COUNTS = {"gpt2": "causal_lm_tokens", "llama": "causal_lm_tokens", "bert": None, "resnet": None}


def model_and_batch(name: str) -> tuple[nn.Module, object]:
    if name == "resnet":
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(1)
        return TinyResNet(width=32), (torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 10, (32,), generator=g))
    return hf_model(name, layers=4, hidden=256), next(iter(hf_batches(name, n=16, batch_size=16, seq=128)))


def loss_of(model: nn.Module, batch) -> torch.Tensor:
    if isinstance(batch, tuple):
        return nn.functional.cross_entropy(model(batch[0]), batch[1])
    return model(**batch).loss


def step_seconds(model: nn.Module, batch, steps: int = 20) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    times = []
    for _ in range(steps + 2):
        start = time.perf_counter()
        loss_of(model, batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])


def block_params(model: nn.Module) -> int:
    units = find_units(model)
    modules = [u.module for u in units] or [model]
    return sum(p.numel() for m in modules for p in m.parameters())


def exactness(name: str) -> float:
    if name == "resnet":
        return float("nan")  # BatchNorm: a micro-batch normalises with its own statistics (the callback warns)
    runs = []
    for callbacks in ([], [AutoMicroBatchCallback(micro_batch_size=2, count_fn=COUNTS[name])]):
        module = HFModule(hf_model(name), lr=0.5)
        quiet_trainer(max_steps=2, callbacks=callbacks).fit(module, hf_batches(name))
        runs.append(module.state_dict())
    return max(float((runs[0][k] - runs[1][k]).abs().max()) for k in runs[0])


def row(name: str) -> dict[str, float]:
    model, batch = model_and_batch(name)
    example = batch if isinstance(batch, dict) else batch[0]
    pruned = copy.deepcopy(model)
    prune_structured(pruned, 0.5, example)
    float_bytes = module_bytes(model)
    int8_bytes = module_bytes(quantize_dynamic_int8(model))
    ratios = []
    for r in range(3):
        order = (model, pruned) if r % 2 == 0 else (pruned, model)
        times = {id(m): step_seconds(m, batch) for m in order}
        ratios.append(times[id(pruned)] / times[id(model)])
    return {
        "blocks": block_params(pruned) / block_params(model),
        "params": sum(p.numel() for p in pruned.parameters()) / sum(p.numel() for p in model.parameters()),
        "int8": int8_bytes / float_bytes,
        "step": statistics.median(ratios),
        "exact": exactness(name),
    }


def main() -> None:
    logging.getLogger("lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    machine = platform.processor() or platform.machine()
    print(f"{machine}, {torch.get_num_threads()} threads, torch {torch.__version__}, {date.today()}")
    print("| model | blocks' params after prune 0.5 | all params | int8 bytes / float | step time pruned / dense "
          "| micro-batching max abs diff |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for name in NAMES:
        r = row(name)
        exact = "n/a (BatchNorm)" if r["exact"] != r["exact"] else f"{r['exact']:.1e}"
        print(f"| {name} | {r['blocks']:.3f}x | {r['params']:.3f}x | {r['int8']:.3f}x | {r['step']:.2f}x | {exact} |")


if __name__ == "__main__":
    main()
