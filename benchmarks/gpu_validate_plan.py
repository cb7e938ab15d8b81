"""Run the planner's top candidates for real on a GPU: predicted vs measured step time and peak.

HF GPT-2 small (random init, AdamW), batch 32 x 1024, planned for an RTX 3070 8 GB; on the local CUDA card each of
the plan's fitting candidates runs a few Lightning steps under
that card's memory (``memory_budget`` caps the allocator, as ANCHORS' H200 runs did), and the median step time after
the first two and the allocator peak are printed beside the predictions (the time model priced for *this* card).
Needs CUDA and transformers; on a machine without CUDA it says so and exits. Not yet run: no GPU was lent to the task
that wrote it.

Run: ``python -m benchmarks.gpu_validate_plan``.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from lightning_lowvram import memory_budget, plan_callbacks
from lightning_lowvram.memory.profiles import detect_gpu, gpu_profile
from lightning_lowvram.planner import plan
from lightning_lowvram.planner.search import Plan


class StepTimer(Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        torch.cuda.synchronize()
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self.start)


def main() -> None:
    if not torch.cuda.is_available():
        print("gpu_validate_plan: needs a CUDA device; this machine has none")
        sys.exit(0)
    from transformers import GPT2Config, GPT2LMHeadModel

    from lightning_lowvram.demo.hf import HFModule

    def module() -> HFModule:
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(n_positions=1024, bos_token_id=0, eos_token_id=0))
        return HFModule(model, optimizer="adamw")

    ids = torch.randint(0, 50257, (32, 1024))
    batch = {"input_ids": ids, "labels": ids}
    target = gpu_profile("rtx3070_8gb")
    here = detect_gpu()
    speed = {k: getattr(here, k) for k in ("fp32_tflops", "tensor_tflops", "bandwidth_gbs", "compute_capability")}
    local = dataclasses.replace(target, **speed)  # the target's memory, this card's speed
    result = plan(module(), batch, local)
    print(f"card: {here.display_name}; memory of {target.name}; plan:\n{result.table()}\n")
    print("| candidate | predicted s/step | measured s/step | predicted/measured | measured peak MiB |")
    print("|---|---|---|---|---|")
    for candidate in [c for c in result.candidates if c.fits]:
        single = Plan(result.gpu, result.batch_size, result.budget, [candidate], candidate)
        timer = StepTimer()
        trainer = L.Trainer(accelerator="cuda", devices=1, max_steps=6, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, precision=candidate.precision,
                            callbacks=[timer, *plan_callbacks(single)])  # fmt: skip
        loader = torch.utils.data.DataLoader([{k: v[i] for k, v in batch.items()} for i in range(32)] * 6, 32)
        torch.cuda.reset_peak_memory_stats()
        with memory_budget(target, device="cuda"):
            trainer.fit(module(), loader)
        seconds = statistics.median(timer.times[2:])
        peak = torch.cuda.max_memory_allocated() / 2**20
        print(f"| {candidate.label} | {candidate.step_time:.3f} | {seconds:.3f} | {candidate.step_time / seconds:.2f} |"
              f" {peak:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
