"""Weights streamed from host memory (cores/streaming.py): outputs equal the in-memory model's, the card holds one
block's weights at a time, and everything is put back."""

import pytest
import torch
from torch import nn

from lightning_lowvram import MemoryMeter, memory_budget
from lightning_lowvram.cores.streaming import is_streamed, stream_blocks, unstream_blocks
from lightning_lowvram.demo import DigitsMLP, TinyGPT


def test_the_card_holds_one_streamed_block_at_a_time_under_half_the_weights():
    model = TinyGPT(n_layer=8, d_model=128).eval()
    x = torch.zeros(2, 32, dtype=torch.long)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    with torch.inference_mode():
        expected = model(x)
    with memory_budget(weights // 2), torch.inference_mode(), pytest.raises(torch.OutOfMemoryError):
        model(x)  # in memory it does not fit
    streaming = stream_blocks(model, "cpu")
    with memory_budget(weights // 2), MemoryMeter() as meter, torch.inference_mode():
        got = model(x)
    unstream_blocks(model)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert meter.peak.total < weights // 2
    # what stays on the card: everything but the streamed blocks, plus one of them
    assert meter.peak.by_category["parameters"] <= weights - streaming.host_bytes + streaming.block_bytes


def test_model_to_moves_a_streamed_model_without_touching_its_host_weights():
    model = TinyGPT(n_layer=3)
    stream_blocks(model, "cpu")
    model.to(torch.float32)  # Lightning's model_to_device calls Module._apply: the meta placeholders stay meta
    assert model.blocks[0].attn.qkv.weight.is_meta
    unstream_blocks(model)
    assert not model.blocks[0].attn.qkv.weight.is_meta


def test_bad_input_is_one_line_and_changes_nothing():
    model = TinyGPT(n_layer=3)
    for resident in (-1, 4, True):
        with pytest.raises(ValueError, match=rf"resident_blocks={resident!r}: TinyGPT has 3 blocks .* allowed 0 to 3"):
            stream_blocks(model, "cpu", resident=resident)
    assert not is_streamed(model)
    with pytest.raises(ValueError, match=r"DigitsMLP has no repeated blocks .* blocks=\[\.\.\.\] \(its largest "):
        stream_blocks(DigitsMLP(), "cpu")
    with pytest.raises(ValueError, match="has no module 'nope'"):
        stream_blocks(model, "cpu", blocks=["nope"])
    stream_blocks(model, "cpu")
    with pytest.raises(ValueError, match="streamed already"):
        stream_blocks(model, "cpu")
    unstream_blocks(model)


def test_named_modules_stream_where_no_block_repeats():
    net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 8))
    x = torch.randn(4, 8)
    expected = net(x)
    streaming = stream_blocks(net, "cpu", blocks=["0", "2"])
    assert streaming.streamed == ["0", "2"]
    with torch.inference_mode():
        torch.testing.assert_close(net(x), expected, atol=1e-6, rtol=0)
    unstream_blocks(net)
