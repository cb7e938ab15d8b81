"""Per-rank estimates: FSDP2 traced over a fake process group (the real two-process check is in
tests/callbacks/test_auto_micro_batch.py, which runs FSDP2 on gloo)."""

import lightning as L
import pytest
import torch

from lightning_lowvram.demo import TinyGPT
from lightning_lowvram.planner import estimate_step_memory
from lightning_lowvram.planner.estimate import _run
from lightning_lowvram.planner.sharding import shard_spec

BATCH = (torch.zeros(8, 64, dtype=torch.long), torch.zeros(8, 64, dtype=torch.long))


def test_fake_tensors_trace_what_real_tensors_allocate_and_sharding_shrinks_the_state():
    spec = shard_spec(2, "full", "none")
    step = (TinyGPT(n_layer=4), BATCH, False, "32-true", None, (False, False, False, False, False, ()), None, spec)
    fake, real = (_run(*step, fake=f)[0] for f in (1, 0))
    assert {k: v.total for k, v in fake.items()} == {k: v.total for k, v in real.items()}  # nothing allocated
    best = max(fake, key=lambda k: fake[k].total)
    assert fake[best].by_category == real[best].by_category  # the same bytes at the peak
    one = estimate_step_memory(TinyGPT(n_layer=4), BATCH)
    two, four = (estimate_step_memory(TinyGPT(n_layer=4), BATCH, devices=n, sharding="full") for n in (2, 4))
    assert two.method == "fake" and two.devices == 2 and "per rank of 2" in str(two)
    assert four.by_category["optimizer"] * 4 == pytest.approx(one.by_category["optimizer"], rel=0.02)  # AdamW state
    assert four.peak < two.peak < one.peak  # activations stay: the local micro-batch is the same
    kept = estimate_step_memory(TinyGPT(n_layer=4), BATCH, devices=2, sharding="grad_op")
    assert kept.by_category["parameters"] > two.by_category["parameters"]  # unsharded between forward and backward


def test_offload_moves_the_sharded_state_and_the_optimizer_step_to_host_memory():
    full = estimate_step_memory(TinyGPT(n_layer=2), BATCH, devices=2, sharding="full")
    params = estimate_step_memory(TinyGPT(n_layer=2), BATCH, devices=2, sharding="full", offload="params")
    optim = estimate_step_memory(TinyGPT(n_layer=2), BATCH, devices=2, sharding="full", offload="optimizer")
    shard = sum(p.numel() * 4 for p in TinyGPT(n_layer=2).parameters()) / 2  # one rank's parameters (float32)
    # host: the rank's parameters, gradients and AdamW moments (4 x the shard), and the step's temporaries
    assert 4 * shard <= params.host <= 6 * shard and params.by_category["optimizer"] == 0
    assert params.peak < full.peak and optim.peak < full.peak and optim.host < params.host
    # the card keeps what the forward and backward hold: not the optimizer step, nor the sharded state
    assert params.by_phase["optimizer"] < params.by_phase["backward"]
    assert params.peak == max(params.by_phase.values())
    assert "in host memory" in str(params)
    one_card = estimate_step_memory(TinyGPT(n_layer=2), BATCH, devices=1, sharding="full", offload="params")
    alone = estimate_step_memory(TinyGPT(n_layer=2), BATCH)
    assert one_card.devices == 1 and one_card.host > 0 and one_card.peak < alone.peak  # FSDP2 on one card, offloaded


class NoShard(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(4, 2)

    def configure_model(self):
        pass  # forgets fully_shard

    def training_step(self, batch, batch_idx):
        return self.net(batch).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"devices": 0}, "devices must be an integer >= 1, got 0"),
        ({"devices": 1, "sharding": "full"}, "sharding='full' needs devices >= 2 .* or an offload"),
        ({"devices": 2, "sharding": "zero3"}, "sharding must be 'full', 'grad_op' or 'none'"),
        ({"devices": 2, "sharding": "none", "offload": "params"}, "offload='params' needs a sharded strategy"),
        ({"devices": 2, "sharding": "full", "offload": "disk"}, "offload must be 'none', 'optimizer' or 'params'"),
    ],
)
def test_bad_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        estimate_step_memory(TinyGPT(n_layer=1), BATCH, **kwargs)


def test_configure_model_without_fully_shard_is_named():
    with pytest.raises(ValueError, match="NoShard.configure_model applies no fully_shard"):
        estimate_step_memory(NoShard(), torch.zeros(2, 4), devices=2, sharding="full")


def test_ddp_ranks_hold_one_device_s_step_plus_the_gradient_buckets():
    one = estimate_step_memory(TinyGPT(n_layer=2), BATCH)
    ddp = estimate_step_memory(TinyGPT(n_layer=2), BATCH, devices=4)  # sharding="none": DDP
    grads = sum(p.numel() * 4 for p in TinyGPT(n_layer=2).parameters())
    assert ddp.devices == 4 and ddp.peak == one.peak + grads and ddp.host == 0
    assert ddp.by_category["gradients"] == one.by_category["gradients"] + grads
