"""FSDP2Strategy's units and the per-rank estimate on the architectures users bring (HF GPT-2, Llama, BERT wrapped in a
LightningModule, a Conv+BatchNorm net); two ranks of the same mechanism: tests/callbacks/test_auto_micro_batch.py."""

import pytest
import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

from lightning_lowvram import FSDP2Strategy
from lightning_lowvram.cores.activation_checkpointing import repeated_blocks
from lightning_lowvram.planner import estimate_step_memory
from tests.helpers import quiet_trainer
from tests.real_models.models import NAMES, build

pytestmark = pytest.mark.usefixtures("one_process_group")


def _fit(name, **kwargs):
    torch.manual_seed(0)
    module, loader = build(name)
    # the loader as it is (no distributed sampler, which would reorder it): the same batches as the plain run
    trainer = quiet_trainer(accelerator="cpu", devices=1, max_steps=2, use_distributed_sampler=False, **kwargs)
    trainer.fit(module, loader)
    weights = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in module.state_dict().items()}
    return module, weights


@pytest.mark.parametrize("name", NAMES)
def test_fsdp2strategy_shards_each_block_and_trains_like_the_plain_run(name):
    _, plain = _fit(name)
    module, sharded = _fit(name, strategy=FSDP2Strategy())
    dist.destroy_process_group()
    blocks = dict(module.named_modules())
    assert all(isinstance(blocks[b], FSDPModule) for b in repeated_blocks(module)) and repeated_blocks(module)
    for key, value in plain.items():  # BatchNorm's running statistics included
        assert torch.allclose(sharded[key], value, rtol=1e-5, atol=1e-6), key


@pytest.mark.parametrize("name", NAMES)
def test_the_per_rank_estimate_shards_the_state(name):
    module, loader = build(name)
    batch = next(iter(loader))
    adam = torch.optim.AdamW
    one = estimate_step_memory(module, batch, optimizer=adam)
    two = estimate_step_memory(module, batch, optimizer=adam, devices=2, sharding="full")
    ddp = estimate_step_memory(module, batch, optimizer=adam, devices=2)
    assert two.method == "fake" and two.devices == 2
    assert two.by_category["optimizer"] == pytest.approx(one.by_category["optimizer"] / 2, rel=0.05)  # AdamW sharded
    grads = sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
    assert ddp.peak == one.peak + grads  # DDP: the whole state plus its gradient buckets
