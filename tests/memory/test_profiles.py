from pathlib import Path

import pytest
import torch

from lightning_lowvram import GPUProfile, gpu_profile, known_gpus
from lightning_lowvram.memory import detect_gpu

CONF_GPU = Path(__file__).resolve().parents[2] / "conf" / "gpu"


def test_at_least_twelve_real_cards_with_memory_bf16_capability_and_throughput():
    cards = [gpu_profile(n) for n in known_gpus() if n not in ("auto", "cpu")]
    assert len(cards) >= 12
    for card in cards:
        assert card.memory_gib and 5 <= card.memory_gib <= 141, card
        assert card.compute_capability and card.compute_capability[0] >= 7, card
        # the step-time model's spec-sheet numbers: tensor math at least as fast as FP32, plausible bandwidth
        assert card.fp32_tflops <= card.tensor_tflops and 100 <= card.bandwidth_gbs <= 5000, card
        assert isinstance(card.bf16, bool)
        assert card.bf16 == (card.compute_capability >= (8, 0)), card  # bf16 arrived with Ampere
        assert 0 < card.usable_bytes < card.total_bytes
    for name in [
        "rtx3060_12gb",
        "rtx3070_8gb",
        "rtx4090_24gb",
        "t4_16gb",
        "l4_24gb",
        "a10g_24gb",
        "v100_16gb",
        "a100_40gb",
        "a100_80gb",
        "h100_80gb",
    ]:
        assert name in known_gpus()


def test_profiles_are_the_config_group_files():
    assert set(known_gpus()) == {p.stem for p in CONF_GPU.glob("*.yaml")}


def test_unknown_name_lists_known_ones():
    with pytest.raises(ValueError, match=r"gpu='rtx9999' is not a known GPU profile; known: .*h100_80gb"):
        gpu_profile("rtx9999")


def test_auto_detects_cpu_without_cuda():
    profile = gpu_profile("auto")
    if torch.cuda.is_available():
        assert profile.total_bytes == torch.cuda.get_device_properties(0).total_memory
        assert profile.free_gib is not None
    else:
        assert profile == detect_gpu() == gpu_profile("cpu")
        assert profile.usable_bytes is None


@pytest.mark.parametrize(
    ("node", "match"),
    [
        ({"name": "x", "memory_gib": 0}, "gpu.memory_gib must be > 0"),
        ({"name": "x", "memory_gib": -2}, "gpu.memory_gib must be > 0"),
        ({"name": "x", "memory_gib": 8, "colour": "red"}, "unknown keys"),
        ({"memory_gib": 8}, "needs a 'name'"),
        ({"name": "x", "memory_gib": 0.1, "context_mib": 500}, "leaves no memory"),
    ],
)
def test_bad_profiles(node, match):
    with pytest.raises(ValueError, match=match):
        GPUProfile.from_config(node).usable_bytes  # noqa: B018


def test_the_demo_slice_is_an_rtx3060_with_64_mib_free():
    """conf/gpu/demo_slice.yaml repeats rtx3060_12gb's fields (profiles are read without defaults lists): no drift."""
    import dataclasses

    slice_, card = gpu_profile("demo_slice"), gpu_profile("rtx3060_12gb")
    assert slice_.free_gib == 0.0625 and card.free_gib is None
    same = {"name", "display_name", "free_gib"}
    for field in dataclasses.fields(card):
        if field.name not in same:
            assert getattr(slice_, field.name) == getattr(card, field.name), field.name
