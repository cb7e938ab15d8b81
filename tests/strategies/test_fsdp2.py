"""apply_fsdp2 and FSDP2Strategy in one process (a world of one); on two gloo ranks: in
tests/callbacks/test_auto_micro_batch.py."""

import os

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule

from lightning_lowvram import FSDP2Strategy, apply_fsdp2
from lightning_lowvram.demo import DigitsDataModule, DigitsMLP, TinyGPT
from tests.helpers import quiet_trainer

pytestmark = pytest.mark.usefixtures("one_process_group")  # no environment variable or process group outlives a test


@pytest.fixture
def world_of_one():
    os.environ.update(MASTER_ADDR="localhost", MASTER_PORT="29571")
    dist.init_process_group("gloo", rank=0, world_size=1)
    return init_device_mesh("cpu", (1,))


def test_each_repeated_block_is_a_unit_then_the_rest(world_of_one):
    model = TinyGPT(n_layer=3)  # holds no parameter itself: its embeddings, final norm and head are children
    assert apply_fsdp2(model, world_of_one) == 3 + 4  # three blocks, then each child outside them
    assert sum(isinstance(m, FSDPModule) for m in model.modules()) == 7 and isinstance(model.head, FSDPModule)
    out = model.training_step((torch.zeros(2, 8, dtype=torch.long), torch.zeros(2, 8, dtype=torch.long)), 0)
    out.backward()  # runs sharded


def test_a_wrapped_hugging_face_model_is_sharded_through_its_child():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2,
    )  # fmt: skip

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = transformers.LlamaForCausalLM(config)

    os.environ.update(MASTER_ADDR="localhost", MASTER_PORT="29572")
    dist.init_process_group("gloo", rank=0, world_size=1)
    wrapper = Wrapper()
    assert apply_fsdp2(wrapper, init_device_mesh("cpu", (1,))) == 3  # two decoder layers, then the HF model
    assert isinstance(wrapper.model, FSDPModule) and not isinstance(wrapper, FSDPModule)
    ids = torch.zeros(2, 8, dtype=torch.long)
    wrapper.model(input_ids=ids, labels=ids).loss.backward()


def _fit(model, strategy):
    try:
        quiet_trainer(accelerator="cpu", devices=1, strategy=strategy, max_steps=1, limit_val_batches=0).fit(
            model, datamodule=DigitsDataModule()
        )
    finally:
        if dist.is_initialized():  # a failed setup leaves the group behind; the next fit starts its own
            dist.destroy_process_group()


def test_the_strategy_refuses_what_it_cannot_do_before_any_step():
    model = DigitsMLP()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="cpu_offload=True needs CUDA devices .*got cpu"):
        _fit(model, FSDP2Strategy(cpu_offload=True))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))

    class Forgets(DigitsMLP):
        def configure_model(self):
            pass

    with pytest.raises(ValueError, match="Forgets.configure_model applies no fully_shard"):
        _fit(Forgets(), FSDP2Strategy())
    with pytest.raises(ValueError, match="cpu_offload must be true or false, got 'yes'"):
        FSDP2Strategy(cpu_offload="yes")


def test_the_strategy_trains_a_module_without_configure_model():
    model = DigitsMLP()
    before = [p.detach().clone() for p in model.parameters()]
    _fit(model, FSDP2Strategy(reshard_after_forward=False))
    assert not hasattr(model, "configure_model") or "configure_model" not in vars(model)  # the stand-in is gone
    assert isinstance(model.net, FSDPModule) and not all(
        torch.equal(a, b.full_tensor()) for a, b in zip(before, model.parameters(), strict=True)
    )


def test_with_the_micro_batching_callback_micro_batches_train_like_the_whole_batch():
    import lightning as L

    from lightning_lowvram import AutoMicroBatchCallback
    from tests.callbacks.test_auto_micro_batch import WideNet

    def fit(**kwargs):
        L.seed_everything(0)
        model = WideNet()
        quiet_trainer(accelerator="cpu", devices=1, max_steps=2, limit_val_batches=0, **kwargs).fit(
            model, datamodule=DigitsDataModule(batch_size=64, dtype="float64")
        )
        return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in model.state_dict().items()}

    whole = fit(strategy=FSDP2Strategy())  # (its distributed sampler orders the data unlike a plain loader)
    dist.destroy_process_group()
    split = fit(strategy=FSDP2Strategy(), callbacks=[AutoMicroBatchCallback(micro_batch_size=16)])
    assert all(torch.allclose(split[k], v, rtol=0, atol=1e-9) for k, v in whole.items())
