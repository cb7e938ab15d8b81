"""The functional chunked linear + cross-entropy: equal to the plain loss and gradients, without the whole logits."""

import pytest
import torch
import torch.nn.functional as F

from lightning_lowvram import MemoryMeter
from lightning_lowvram.cores.chunked_cross_entropy import head_cross_entropy, linear_cross_entropy


def _close(a, b, rel=1e-5):
    return (a - b).abs().max() <= rel * b.abs().max()


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("num_items", [None, 37])
def test_loss_and_gradients_equal_the_plain_computation(softcap, bias, num_items):
    torch.manual_seed(0)
    h = torch.randn(3, 40, 24, requires_grad=True)
    w = torch.randn(500, 24, requires_grad=True)
    b = torch.randn(500, requires_grad=True) if bias else None
    y = torch.randint(0, 500, (3, 40))
    y[0, :9] = -100
    inputs = [h, w] + ([b] if bias else [])

    logits = F.linear(h, w, b)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    reduction = "sum" if num_items else "mean"
    plain = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100, reduction=reduction)
    plain = plain / num_items if num_items else plain
    chunked = linear_cross_entropy(h, w, y, b, softcap=softcap, num_items=num_items, chunk_size=7)
    assert _close(chunked, plain)
    expected, got = torch.autograd.grad(plain * 2, inputs), torch.autograd.grad(chunked * 2, inputs)
    for g_plain, g_chunked in zip(expected, got, strict=True):
        assert _close(g_chunked, g_plain)


def test_a_module_with_its_own_linear_head_trains_through_the_functional_form():
    torch.manual_seed(0)
    body, head = torch.nn.Linear(8, 16), torch.nn.Linear(16, 300)
    x, y = torch.randn(4, 10, 8), torch.randint(0, 300, (4, 10))
    plain = F.cross_entropy(head(body(x)).flatten(0, 1), y.flatten())
    grads = torch.autograd.grad(plain, [*body.parameters(), *head.parameters()])
    chunked = linear_cross_entropy(body(x), head.weight, y, head.bias, chunk_size=6)
    for g, c in zip(grads, torch.autograd.grad(chunked, [*body.parameters(), *head.parameters()]), strict=True):
        assert _close(c, g)


def test_frozen_head_gets_no_gradient_and_no_grad_computes_only_the_loss():
    torch.manual_seed(0)
    h, w = torch.randn(64, 16, requires_grad=True), torch.randn(200, 16)  # w frozen (requires_grad False)
    y = torch.randint(0, 200, (64,))
    loss = linear_cross_entropy(h, w, y, chunk_size=10)
    (grad,) = torch.autograd.grad(loss, [h])
    assert _close(grad, torch.autograd.grad(F.cross_entropy(h @ w.T, y), [h])[0])
    with torch.no_grad():
        assert _close(linear_cross_entropy(h, w, y, chunk_size=10), F.cross_entropy(h @ w.T, y))
    trained, modes = w.clone().requires_grad_(True), []

    def head(t):
        modes.append(torch.is_grad_enabled())  # a gradient pass would run the head with grad enabled
        return t @ trained.T

    with torch.no_grad():  # a trainable head too: no gradient is computed for it
        assert _close(head_cross_entropy(h, head, [trained], y, chunk_size=10), F.cross_entropy(h @ w.T, y))
    assert modes and not any(modes)


def test_only_one_chunk_of_logits_lives_at_a_time():
    """Bytes, by the meter: the plain loss holds tokens x vocab float32 logits (and their log-softmax); chunks don't."""
    torch.manual_seed(0)
    tokens, vocab, width = 2048, 8000, 32
    h, w = torch.randn(tokens, width, requires_grad=True), torch.randn(vocab, width, requires_grad=True)
    y = torch.randint(0, vocab, (tokens,))
    peaks = []
    for fn in (lambda: F.cross_entropy(h @ w.T, y), lambda: linear_cross_entropy(h, w, y, chunk_size=128)):
        with MemoryMeter(h, w) as meter:
            fn().backward()
        peaks.append(meter.peak.total)
    logits = tokens * vocab * 4
    assert peaks[0] >= 2 * logits  # the logits and their log-softmax (or gradient)
    assert peaks[1] <= 4 * 128 * vocab * 4 + 4 * (h.numel() + w.numel()) * 4  # a few chunks' worth + gradients


@pytest.mark.parametrize("chunk_size", [0, -3, True])
def test_a_chunk_size_below_one_is_refused_naming_it(chunk_size):
    h, w, y = torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match=rf"chunk_size must be an integer >= 1 \(tokens a chunk\), got {chunk_size!r}"):
        head_cross_entropy(h, lambda t: t @ w.T, [], y, chunk_size=chunk_size)
