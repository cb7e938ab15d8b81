"""Estimates and plans compared with values recorded before a refactor: nothing a user sees may change.

The cases cover each kind of setting the planner knows (micro-batching, precision, checkpointing with offload and
tiled MLPs, the chunked loss, 8-bit optimizer state, low-bit and bfloat16 bases, DDP and FSDP2 across cards, CPU
offload) on the demo GPT, a frozen-base MLP and HF Llama. A change that means to move them re-records them::

    PYTHONPATH=. python -m tests.planner.test_recorded --record

and says why in its commit.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

RECORDED = Path(__file__).with_name("recorded.json")


def _card(mib: float, **kwargs: Any):
    from lightning_lowvram import GPUProfile

    return GPUProfile(
        name="tiny_card", memory_gib=mib / 1024, bf16=True, context_mib=0, compute_capability=(8, 6),
        fp32_tflops=20.3, tensor_tflops=40.6, bandwidth_gbs=448, **kwargs,
    )  # fmt: skip


def _gpt(**kwargs: Any):
    from lightning_lowvram.demo import TinyGPT

    return TinyGPT(**{"seq_len": 64, "d_model": 64, "n_head": 4, "n_layer": 4, **kwargs})


def _text(seq: int, batch: int):
    from lightning_lowvram.demo import TinyTextDataModule

    data = TinyTextDataModule(seq_len=seq, batch_size=batch)
    data.setup("fit")
    return next(iter(data.train_dataloader()))


class _Frozen(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.adapter, self.head = nn.Linear(64, 512), nn.Linear(512, 10)
        self.base = nn.Sequential(*[nn.Linear(512, 512) for _ in range(8)]).requires_grad_(False)


def _frozen():
    import lightning as L

    class Frozen(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _Frozen()

        def training_step(self, batch, batch_idx):
            net = self.net
            return F.cross_entropy(net.head(net.base(net.adapter(batch[0]))), batch[1])

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=0.1)

    return Frozen()


def _llama(layers: int = 8):
    from tests.real_models.models import HFModule, causal_lm

    return HFModule(causal_lm("llama", vocab=512, hidden=64, num_hidden_layers=layers), optimizer="adamw")


def _tokens(seq: int, batch: int = 2):
    ids = torch.arange(batch * seq).reshape(batch, seq) % 500 + 1
    return {"input_ids": ids, "labels": ids.clone()}


def _estimate(estimate) -> dict[str, Any]:
    return {
        "peak": estimate.peak,
        "by_category": estimate.by_category,
        "by_phase": estimate.by_phase,
        "allowance": estimate.allowance,
        "host": estimate.host,
        "offloaded_activations": estimate.offloaded_activations,
        "traced_blocks": list(estimate.traced_blocks) if estimate.traced_blocks else None,
        "seconds": round(estimate.step_time(_card(1024)), 12) if estimate.work is not None else None,
    }


def _plan(result) -> dict[str, Any]:
    from lightning_lowvram import plan_callbacks

    kwargs = result.trainer_kwargs()
    strategy = kwargs.get("strategy")
    if strategy is not None and not isinstance(strategy, str):
        s = strategy
        kwargs["strategy"] = f"{type(s).__name__}(reshard={s.reshard_after_forward}, offload={s.cpu_offload})"
    return {
        "table": result.table(),
        "overrides": result.overrides(),
        "trainer_kwargs": kwargs,
        "callbacks": [type(c).__name__ for c in plan_callbacks(result)],
        "callback_args": [_args(c) for c in plan_callbacks(result)],
    }


def _args(callback: Any) -> dict[str, Any]:
    names = ("micro_batch_size", "offload", "tile_mlp", "bits", "chunk_size", "backend")
    return {k: getattr(callback, k) for k in names if isinstance(getattr(callback, k, None), int | str | bool)}


def _cases() -> dict[str, Any]:
    """Name -> a function returning the JSON-able values."""
    from lightning_lowvram.planner import estimate_step_memory, plan

    def est(module, batch, **kwargs):
        return lambda: _estimate(estimate_step_memory(module(), batch(), **kwargs))

    def planned(module, batch, card, **kwargs):
        return lambda: _plan(plan(module(), batch(), card, **kwargs))

    return {
        "estimate/gpt_cpu": est(_gpt, lambda: _text(64, 16), device="cpu"),
        "estimate/gpt_cuda_bf16_ckpt_micro4": est(
            _gpt,
            lambda: _text(64, 16),
            gpu=_card(1024),
            precision="bf16-mixed",
            activation_checkpointing=True,
            micro_batch_size=4,
        ),  # fmt: skip
        "estimate/llama_blocks_all_levers": est(
            _llama,
            lambda: _tokens(256),
            gpu=_card(1024),
            precision="bf16-mixed",
            activation_checkpointing=True,
            offload_activations=True,
            tiled_mlp=True,
            chunked_cross_entropy=True,
            optimizer_8bit=True,
        ),  # fmt: skip
        "estimate/frozen_bf16_base": est(
            _frozen,
            lambda: (torch.zeros(8, 64), torch.zeros(8, dtype=torch.long)),
            gpu=_card(1024),
            precision="bf16-mixed",
            bf16_base=True,
        ),  # fmt: skip
        "estimate/gpt_fsdp2_offload_x2": est(
            lambda: _gpt(seq_len=16, d_model=128),
            lambda: _text(16, 4),
            gpu=_card(1024, interconnect_gbs=31.5, pcie_gbs=31.5),
            devices=2,
            sharding="full",
            offload="params",
        ),  # fmt: skip
        "plan/gpt_micro_batch": planned(_gpt, lambda: _text(64, 32), _card(8)),
        "plan/frozen_low_bit": planned(
            _frozen,
            lambda: (torch.zeros(8, 64), torch.zeros(8, dtype=torch.long)),
            _card(4),
            allow_low_bit_base=True,
        ),  # fmt: skip
        "plan/llama_long_context": planned(_llama, lambda: _tokens(2048, 1), _card(60, pcie_gbs=31.5)),
        "plan/gpt_two_cards": planned(
            lambda: _gpt(seq_len=16, d_model=256),
            lambda: _text(16, 4),
            _card(60, interconnect_gbs=31.5, pcie_gbs=31.5),
            devices=4,
            precisions=("32-true",),
        ),  # fmt: skip
    }


def _recorded() -> dict[str, Any]:
    return json.loads(RECORDED.read_text()) if RECORDED.exists() else {}


@pytest.mark.usefixtures("no_cublas_workspace")
@pytest.mark.parametrize("name", sorted(_cases()))
def test_estimates_and_plans_are_what_they_were(name):
    recorded = _recorded()
    assert name in recorded, f"{name} was never recorded: PYTHONPATH=. python -m tests.planner.test_recorded --record"
    assert json.loads(json.dumps(_cases()[name]())) == recorded[name]


def _record() -> None:
    import os

    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":0:0"  # as the fixture sets it
    values = {name: case() for name, case in sorted(_cases().items())}
    RECORDED.write_text(json.dumps(values, indent=1, sort_keys=True) + "\n")
    print(f"recorded {len(values)} cases in {RECORDED}")


if __name__ == "__main__" and "--record" in sys.argv:
    _record()
