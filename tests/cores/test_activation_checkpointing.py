import pytest
import torch

from lightning_lowvram import MemoryMeter
from lightning_lowvram.cores.activation_checkpointing import checkpoint_blocks, uncheckpoint_blocks
from lightning_lowvram.demo import TinyGPT


def _step(model, idx):
    with MemoryMeter(model) as meter:
        loss = model._loss((idx, idx.roll(-1, 1)))
        loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()], meter.peak


def test_checkpointed_blocks_give_the_same_loss_and_gradients_with_fewer_activation_bytes():
    torch.manual_seed(0)
    model, idx = TinyGPT(seq_len=64, d_model=64, n_head=4, n_layer=4), torch.randint(0, 256, (8, 64))
    loss, grads, peak = _step(model, idx)
    model.zero_grad(set_to_none=True)
    assert checkpoint_blocks(model) == ["blocks.0", "blocks.1", "blocks.2", "blocks.3"]
    names = [n for n, _ in model.named_parameters()]
    loss_ckpt, grads_ckpt, peak_ckpt = _step(model, idx)
    assert torch.equal(loss, loss_ckpt)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, grads_ckpt, strict=True))
    assert peak_ckpt["activations"] < 0.6 * peak["activations"], (peak_ckpt, peak)
    uncheckpoint_blocks(model)
    assert [n for n, _ in model.named_parameters()] == names and "forward" not in model.blocks[0].__dict__


def test_named_blocks_and_clear_errors():
    model = TinyGPT(n_layer=2)
    assert checkpoint_blocks(model, ["blocks.1"]) == ["blocks.1"]
    with pytest.raises(ValueError, match="'layers.\\*' matches no module of TinyGPT"):
        checkpoint_blocks(model, ["layers.*"])
    with pytest.raises(ValueError, match="found no repeated blocks"):
        checkpoint_blocks(torch.nn.Linear(2, 2))
