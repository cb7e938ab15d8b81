import pytest
import torch
from torch import nn

from lightning_lowvram.cores.dynamic_quant import (
    available_backends,
    choose_backend,
    gradient_check,
    linear_bytes,
    quantize_dynamic_int8,
    quantized_layers,
)
from lightning_lowvram.demo import DigitsMLP


def test_backend_per_device_and_clear_errors():
    assert choose_backend("cpu") == "torch_ao" and choose_backend("cuda") == "torchao_dynamic"
    assert "torch_ao" not in available_backends("cuda")
    with pytest.raises(ValueError, match="backend='torch_ao' does not run on cuda; here: 'auto', 'torchao_dynamic'"):
        choose_backend("cuda", "torch_ao")


# torchao keeps a float scale and zero point per output row: 0.2704x on layers this narrow (64 inputs)
@pytest.mark.parametrize(
    ("backend", "limit"), [("torch_ao", 0.27), ("torchao_weight_only", 0.271), ("torchao_dynamic", 0.271)]
)
def test_int8_copy_is_about_a_quarter_of_the_float_bytes_and_leaves_the_float_model_alone(backend, limit):
    torch.manual_seed(0)
    model = DigitsMLP(hidden=128)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    int8 = quantize_dynamic_int8(model, backend)
    assert quantized_layers(int8) == ["net.0", "net.2", "net.4"]
    assert linear_bytes(int8) <= limit * linear_bytes(model)
    assert all(type(m) is nn.Linear for m in model.net if isinstance(m, nn.Linear))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    x = torch.randn(16, 64)
    assert torch.allclose(int8(x), model(x), atol=0.05)


@pytest.mark.parametrize(("backend", "flows"), [("torchao_weight_only", True), ("torch_ao", False)])
def test_gradient_check_tells_which_backends_keep_autograd(backend, flows):
    layer = nn.Linear(32, 16)
    int8 = quantize_dynamic_int8(nn.Sequential(layer), backend)[0]
    similarity = gradient_check(layer, int8)
    assert (similarity > 0.99) is flows


@pytest.mark.parametrize("backend", ["torch_ao", "torchao_weight_only"])
def test_multihead_attention_keeps_its_float_out_proj_and_still_runs(backend):
    from tests.cores.test_pruning import MHANet

    torch.manual_seed(0)
    model, x = MHANet().eval(), torch.randint(0, 50, (2, 6))
    int8 = quantize_dynamic_int8(model, backend)
    assert quantized_layers(int8) == ["out"]
    assert torch.allclose(int8(x), model(x), atol=0.1)
