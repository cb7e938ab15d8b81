"""Evaluation on the architectures users bring (HF GPT-2, Llama, BERT, the Conv+BatchNorm net): streamed outputs
equal the in-memory model's, and the evaluation estimates match the meter's real CPU run, plain and streamed."""

import pytest
import torch

from lightning_lowvram import estimate_eval_memory
from lightning_lowvram.cores.streaming import is_streamed, stream_blocks, streamable_blocks, unstream_blocks
from lightning_lowvram.planner.evaluation import STAGES, with_resident
from tests.planner.test_evaluation import _measured
from tests.real_models.models import NAMES, build


def _outputs(module, batch):
    if isinstance(batch, dict):
        return module.model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    return module(batch[0])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("resident", [0, 1])
def test_streamed_outputs_equal_the_in_memory_models(name, resident):
    module, loader = build(name)
    batch = next(iter(loader))
    module.eval()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with torch.inference_mode():
        expected = _outputs(module, batch)
    names = streamable_blocks(module)
    host = sum(p.numel() * p.element_size() for n in names[resident:] for p in module.get_submodule(n).parameters())
    streaming = stream_blocks(module, "cpu", resident=resident)
    assert streaming.resident == names[:resident] and streaming.streamed == names[resident:]
    assert streaming.host_bytes == host
    assert all(p.is_meta for n in streaming.streamed for p in module.get_submodule(n).parameters())
    with torch.inference_mode():
        got = _outputs(module, batch)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    unstream_blocks(module)
    assert not is_streamed(module)
    assert all(p.device.type == "cpu" and p.requires_grad for p in module.parameters())
    for key, value in module.state_dict().items():
        assert torch.equal(value, before[key]), key


def _cases():
    for name in NAMES:
        for stage in STAGES:
            if not (name == "resnet" and stage == "predict"):  # the CNN module has no predict_step
                yield name, stage


@pytest.mark.parametrize(("name", "stage"), list(_cases()))
def test_within_5_percent_of_the_meter_on_the_families_users_bring(name, stage):
    module, loader = build(name)
    batch = next(iter(loader))
    estimate = estimate_eval_memory(module, batch, stage)
    assert estimate.by_category["gradients"] == estimate.by_category["optimizer"] == 0
    assert estimate.stage == stage and estimate.method == "fake"
    assert estimate.peak == pytest.approx(_measured(module, batch, stage), rel=0.05)


@pytest.mark.parametrize("name", NAMES)
def test_streamed_estimates_are_within_5_percent_of_the_streamed_run(name):
    module, loader = build(name)
    batch = next(iter(loader))
    streamed = estimate_eval_memory(module, batch, "validate", resident_blocks=0)
    assert streamed.peak == pytest.approx(_measured(module, batch, "validate", 0), rel=0.05)
    assert streamed.host == streamed.streamed > 0
    one = with_resident(streamed, module, 1)
    assert one.peak >= _measured(module, batch, "validate", 1)  # the safe side: one block may count twice
    assert one.peak <= streamed.peak + (streamed.host - one.host)
