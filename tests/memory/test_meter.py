import pytest
import torch
from torch import nn

from lightning_lowvram import MemoryMeter
from tests.helpers import state_bytes

IN, OUT = 100, 50
PARAM_BYTES = (IN * OUT + OUT) * 4  # weight + bias, float32


def test_parameters_gradients_optimizer_state_match_hand_computed_sizes():
    layer = nn.Linear(IN, OUT)
    opt = torch.optim.AdamW(layer.parameters())
    x = torch.randn(32, IN)
    with MemoryMeter(layer, opt) as meter:
        assert meter.current["parameters"] == PARAM_BYTES
        layer(x).sum().backward()
        assert meter.current["gradients"] == PARAM_BYTES
        opt.step()
        # AdamW keeps exp_avg and exp_avg_sq (2x params) plus one float32 `step` scalar per parameter tensor
        assert meter.current["optimizer"] == 2 * PARAM_BYTES + 2 * 4
        opt.zero_grad(set_to_none=True)
        assert meter.current["gradients"] == 0
    peak = meter.peak
    assert peak.total >= 3 * PARAM_BYTES + 2 * PARAM_BYTES  # params + grads + states were live together
    assert peak.total == sum(peak.by_category.values())
    assert meter.current["optimizer"] == 2 * PARAM_BYTES + 8


def test_activations_are_the_tensors_saved_for_backward():
    layer = nn.Linear(IN, OUT)
    x = torch.randn(32, IN)
    with MemoryMeter(layer) as meter:
        y = layer(x)
    # the output (32 x 50 float32) is the only new tensor still alive
    assert meter.current["activations"] == state_bytes(y)
    assert meter.current["parameters"] == PARAM_BYTES


def test_views_of_tensors_made_before_the_region_allocate_nothing():
    dataset = torch.zeros(1_000_000)  # 4 MB of "host" data
    with MemoryMeter() as meter:
        first = dataset[:10]  # a view: no allocation
        doubled = first * 2  # 40 bytes
    assert meter.peak.total == state_bytes(doubled)
    del first


def test_module_created_inside_is_counted_and_freed():
    with MemoryMeter() as meter:
        layer = nn.Linear(IN, OUT)
        layer(torch.zeros(1, IN))
        del layer
    assert meter.peak.total >= PARAM_BYTES
    assert meter.current.total == 0


def test_meter_outside_region_errors_and_leaves_no_mode_behind():
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    meter = MemoryMeter()
    with pytest.raises(RuntimeError, match="not been entered"):
        meter.peak  # noqa: B018
    with meter:
        assert _get_current_dispatch_mode() is not None
    assert _get_current_dispatch_mode() is None


def test_metrics_and_str():
    layer = nn.Linear(IN, OUT)
    with MemoryMeter(layer) as meter:
        pass
    metrics = meter.peak.as_metrics("lowvram/memory/fit")
    assert metrics["lowvram/memory/fit/parameters_mib"] == pytest.approx(PARAM_BYTES / 2**20)
    assert "parameters" in str(meter.peak)


def test_forward_inside_an_optimizer_closure_counts_as_activations_not_optimizer_state():
    """Lightning runs training_step and backward inside optimizer.step(closure)."""
    layer = nn.Linear(IN, OUT)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)  # no state
    kept = []

    def closure():
        opt.zero_grad()
        out = layer(torch.randn(32, IN))
        kept.append(out)
        out.sum().backward()
        return out.sum()

    with MemoryMeter(layer, opt) as meter:
        opt.step(closure)
    assert meter.current["optimizer"] == 0
    assert meter.current["activations"] >= state_bytes(kept[0])
