"""The retry engine on its own: no Trainer, no Lightning."""

import pytest
import torch
from torch import nn

from lightning_lowvram import memory_budget
from lightning_lowvram.cores.micro_batch import (
    GradientStore,
    SizePolicy,
    attempt,
    run_until_fits,
    snapshot_training_state,
)


def _fits_up_to(limit, calls):
    def run(size):
        calls.append(size)
        if size > limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return f"done at {size}"

    return run


def test_sizes_halve_failed_sizes_are_never_retried_and_eval_kinds_are_separate():
    policy, calls = SizePolicy(), []
    assert run_until_fits(_fits_up_to(20, calls), 100, policy) == "done at 12"
    assert calls == [100, 50, 25, 12] and policy.failed == {"train": 25} and policy.retries == 3
    calls.clear()
    assert run_until_fits(_fits_up_to(20, calls), 100, policy) == "done at 12"  # the next batch: straight there
    assert calls == [12]
    policy.sizes["train"] = 64  # even if asked for more, a size that failed is never tried again
    assert policy.size("train", 100) == 24
    assert run_until_fits(_fits_up_to(40, calls), 30, policy, kind="validate") == "done at 30"
    assert policy.sizes.get("validate") is None and "validate" not in policy.failed


def test_at_the_minimum_the_error_says_what_to_try():
    policy = SizePolicy(min_size=4, owner="MyLoop")
    with pytest.raises(torch.OutOfMemoryError, match=r"MyLoop: a train micro-batch of 4 sample\(s\) does not fit"):
        run_until_fits(_fits_up_to(2, []), 16, policy)
    assert policy.failed == {"train": 8}


def test_other_errors_propagate_and_the_state_round_trips():
    def broken(size):
        raise ValueError("a bug, not memory")

    with pytest.raises(ValueError, match="a bug"):
        attempt(broken, 4)
    policy = SizePolicy()
    run_until_fits(_fits_up_to(10, []), 64, policy)
    fresh = SizePolicy()
    fresh.load_state_dict(policy.state_dict())
    assert fresh == SizePolicy(sizes={"train": 8}, failed={"train": 16}, retries=3)


def test_every_attempt_asks_the_ranks_and_follows_their_decision():
    asked, calls = [], []

    def agree(oom):  # another rank ran out of memory at 32 even though this one did not
        asked.append(oom)
        return oom or len(asked) == 1

    policy = SizePolicy()
    assert run_until_fits(_fits_up_to(64, calls), 64, policy, agree=agree) == "done at 32"
    assert asked == [False, False] and calls == [64, 32] and policy.failed == {"train": 64}


def test_a_failed_attempt_leaves_no_trace_under_the_budget():
    """A failure after some micro-batches back-propagated (the budget's real OOM): gradients as the accumulation window
    held them, BatchNorm statistics and the GradScaler are put back, so the result is the clean run's."""
    import copy

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 1))
    earlier, x = torch.randn(4, 8), torch.randn(64, 8)
    net(earlier).sum().backward()  # an earlier batch of the accumulation window
    reference = copy.deepcopy(net)
    for p, q in zip(net.parameters(), reference.parameters(), strict=True):
        q.grad = p.grad.clone()  # deepcopy leaves gradients behind

    def run_on(model, scaler, budget_hog):
        def run(size):
            for start in range(0, 64, size):
                scaler.scale(model(x[start : start + size]).sum() * size / 64).backward()
                if size > 16:
                    torch.empty(budget_hog)  # the next micro-batch does not fit
            scaler.update(scaler.get_scale() * 2)
            return size

        return run

    scaler, reference_scaler = (torch.amp.GradScaler("cpu", init_scale=8.0) for _ in range(2))
    policy = SizePolicy()
    restore = snapshot_training_state(net, grads=True, scaler=scaler)
    with memory_budget(4096):
        assert run_until_fits(run_on(net, scaler, 4096), 64, policy, restore=restore) == 16
    assert policy.failed == {"train": 32} and policy.retries == 2
    run_on(reference, reference_scaler, 0)(16)  # the clean run at the size that fits
    for p, q in zip(net.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-6)
    for a, b in zip(net[1].buffers(), reference[1].buffers(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert scaler.get_scale() == reference_scaler.get_scale() == 16.0


def test_the_gradient_store_keeps_its_buffers_and_each_snapshot_restores_its_own_step():
    net = nn.Linear(4, 3)
    store = GradientStore()
    net(torch.ones(2, 4)).sum().backward()
    first = [p.grad.clone() for p in net.parameters()]
    restore_first = snapshot_training_state(net, store=store)
    buffers = [b.data_ptr() for b in store.copy(list(net.parameters()))]  # what the next step would reuse
    net(torch.full((2, 4), 3.0)).sum().backward()  # the window goes on: the gradients change
    restore_first()
    assert all(torch.equal(p.grad, g) for p, g in zip(net.parameters(), first, strict=True))
    net(torch.full((2, 4), 2.0)).sum().backward()
    second = [p.grad.clone() for p in net.parameters()]
    restore_second = snapshot_training_state(net, store=store)
    assert [b.data_ptr() for b in store.copy(list(net.parameters()))] == buffers  # no new host memory a step
    net(torch.full((2, 4), 5.0)).sum().backward()  # a failed attempt's partial gradients
    restore_second()
    restore_second()  # the next attempt fails too: the copies stay as they were
    assert all(torch.equal(p.grad, g) for p, g in zip(net.parameters(), second, strict=True))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_copy_is_asynchronous_into_pinned_memory_and_exact():
    net = nn.Sequential(nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 4096)).cuda()
    x = torch.randn(256, 4096, device="cuda")
    net(x).sum().backward()
    window = [p.grad.clone() for p in net.parameters()]
    store = GradientStore()
    restore = snapshot_training_state(net, store=store)
    assert all(b.is_pinned() for b in store.copy(list(net.parameters())))
    for _ in range(3):  # forward while the copy runs; the backward waits for it on the device
        out = net(x).sum()
        store.ready()
        out.backward()
    restore()
    torch.cuda.synchronize()
    assert all(torch.equal(p.grad, g) for p, g in zip(net.parameters(), window, strict=True))
