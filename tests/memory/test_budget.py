import pytest
import torch
from torch import nn

from lightning_lowvram import MemoryMeter, gpu_profile, memory_budget
from lightning_lowvram.demo import DigitsDataModule, DigitsMLP
from lightning_lowvram.memory import active_budget
from tests.helpers import quiet_trainer


def test_allocations_just_under_the_limit_pass_and_just_over_raise():
    with memory_budget(4000, device="cpu"):
        a = torch.zeros(1000)  # 4000 bytes: exactly the limit
        del a
        with pytest.raises(
            torch.OutOfMemoryError, match=r"CUDA out of memory \(emulated on CPU\)\. Tried to allocate 3.91 KiB"
        ):
            torch.zeros(1001)


def test_after_an_oom_memory_is_released_and_work_goes_on():
    with memory_budget(13_000, device="cpu"):
        keep = torch.ones(1000)  # 4000 bytes
        with pytest.raises(torch.OutOfMemoryError) as info:
            keep.repeat(3)  # 12000 bytes more
        assert "of which 8.79 KiB is free" in str(info.value)
        # the failed output is gone: 4000 + 4000 + 4000 bytes fit
        more = torch.ones(1000)
        assert (keep + more).sum().item() == 2000


def test_nested_budgets_use_the_tightest_and_restore_the_outer():
    with memory_budget(100_000, device="cpu"):
        big = torch.zeros(10_000)  # 40 kB
        with memory_budget(50_000, device="cpu"):
            assert active_budget() == 50_000
            with pytest.raises(torch.OutOfMemoryError):
                torch.zeros(5_000)  # 40 kB + 20 kB > 50 kB
        assert active_budget() == 100_000
        torch.zeros(5_000)  # fits the outer budget
        del big
    assert active_budget() is None


def test_no_dispatch_mode_when_inactive():
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    with memory_budget(1 << 20, device="cpu"):
        assert _get_current_dispatch_mode() is not None
    assert _get_current_dispatch_mode() is None


def _step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    loss = model(torch.randn(256, 512)).square().mean()
    loss.backward()
    opt.step()
    opt.zero_grad()


def test_training_step_under_too_small_budget_raises_the_real_exception():
    model = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512))
    opt = torch.optim.AdamW(model.parameters())
    with MemoryMeter(model, opt) as meter:
        _step(model, opt)
        _step(model, opt)
    needed = meter.peak.total
    weights = [p.detach().clone() for p in model.parameters()]
    with memory_budget(needed - 4096, device="cpu"), pytest.raises(torch.OutOfMemoryError) as info:
        _step(model, opt)
    assert type(info.value) is torch.OutOfMemoryError
    with memory_budget(needed + 4096, device="cpu"):
        _step(model, opt)  # the same step fits with the measured peak
    assert any(not torch.equal(w, p) for w, p in zip(weights, model.parameters(), strict=False))


def test_parameters_made_before_the_budget_count_when_the_module_runs():
    model = nn.Linear(1000, 1000)  # 4 MB of parameters, created outside the budget
    with memory_budget(1_000_000, device="cpu"), pytest.raises(torch.OutOfMemoryError, match="parameters"):
        model(torch.zeros(1, 1000))


def test_lightning_fit_under_a_budget_raises_oom_when_too_small():
    model, data = DigitsMLP(hidden=256), DigitsDataModule(batch_size=64)
    with memory_budget(200_000, device="cpu"), pytest.raises(torch.OutOfMemoryError):
        quiet_trainer(max_steps=2, limit_val_batches=0).fit(model, datamodule=data)


@pytest.mark.parametrize("bad", [0, -1, -0.5, 0.5, 1024.5, float("nan"), float("inf")])
def test_a_limit_that_is_not_a_whole_number_of_bytes_is_refused(bad):
    with pytest.raises(ValueError, match=r"memory_budget\(limit=.*whole number of bytes >= 1"):
        with memory_budget(bad):
            pass


def test_profile_limits_and_errors():
    with memory_budget("t4_16gb", device="cpu") as limit:
        assert limit == gpu_profile("t4_16gb").usable_bytes
    with pytest.raises(ValueError, match="no memory limit"):
        with memory_budget("cpu"):
            pass
    with pytest.raises(ValueError, match="known: .*rtx3060_12gb"):
        with memory_budget("rtx9999"):
            pass
    with pytest.raises(ValueError, match="device="):
        with memory_budget(1000, device="mps"):
            pass


@pytest.mark.gpu
def test_cuda_budget_caps_the_real_allocator():
    with memory_budget(256 * 2**20, device="cuda"):
        with pytest.raises(torch.OutOfMemoryError):
            torch.empty(512 * 2**20, dtype=torch.uint8, device="cuda")
        torch.cuda.empty_cache()
        torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda")


def test_peers_that_recognise_a_cuda_oom_by_its_message_recognise_the_emulated_one():
    from lightning.pytorch.utilities.memory import is_oom_error as lightning_is_oom_error

    with memory_budget(1024, device="cpu"), pytest.raises(torch.OutOfMemoryError) as caught:
        torch.ones(1024)
    assert lightning_is_oom_error(caught.value)  # what Lightning's BatchSizeFinder/Tuner catch
