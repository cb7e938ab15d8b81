"""Run a step until it fits: the retry engine behind ``AutoMicroBatchCallback``, usable without Lightning.

- :class:`SizePolicy`: which micro-batch size to try for a kind of step, the sizes that failed, how to shrink.
- :func:`snapshot_training_state`: capture what a failed attempt can change; returns the function that puts it back.
- :func:`attempt` and :func:`run_until_fits`: try ``run(size)``; on an out-of-memory error put the state back, shrink,
  try again, with one collective decision per attempt when there are several ranks.

Invariants (``AutoMicroBatchCallback`` relies on them; ``tests/cores/test_micro_batch.py`` and the callback's tests hold
them):

1. **Sizes only shrink.** A kind (``"train"``, ``"validate"``, ``"test"``, ``"predict"``) starts at its chosen size
   (``None``: the whole batch) and halves on each failure, never below ``min_size``; a size that failed for a kind
   is never tried again for it. At ``min_size`` the out-of-memory error is raised with what to try next.
   Evaluation kinds never change the training size.
2. **A failed attempt leaves no trace.** Before an attempt, what it can change is captured: the trainable
   parameters' gradients (a host copy, only when the accumulation window already holds some; else they are zeroed),
   BatchNorm running statistics, the GradScaler's state and torchmetrics states. The restore puts them back exactly.
   The gradients' host copy (:class:`GradientStore`) reuses its host buffers from step to step and, on CUDA, runs
   asynchronously on a side stream into pinned memory while the first micro-batch's forward runs: nothing writes a
   gradient before :meth:`GradientStore.ready` (called before every backward and before a restore), which makes the
   device's stream wait for the copy, without a host synchronisation.
3. **Every backward of an attempt runs inside it**, so a failed attempt leaves no autograd graph behind, and the
   attempt's gradients are exactly the batch's (each micro-batch's loss weighted by its share of samples or units).
4. **Ranks agree.** Each attempt ends with one collective decision (``agree``: any rank out of memory means every
   rank retries, at the same smaller size), so ranks run the same number of collectives and stay in step.
5. **What the callback patches** (instance attributes, undone at ``teardown``): the module's ``training_step``,
   ``backward`` and ``optimizer_zero_grad`` in fit, and the evaluation steps. Gradients are zeroed once per
   accumulation window, before its first batch's micro-batches run (Lightning would zero them after
   ``training_step``: that call is skipped), and Lightning's own backward of the returned loss is skipped on one
   device (under DDP it back-propagates a zero that triggers the gradient all-reduce once).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal, TypeVar

import torch
from torch.utils._python_dispatch import _disable_current_modes

from lightning_lowvram._metrics import snapshot_metrics
from lightning_lowvram.memory.oom import is_oom_error

T = TypeVar("T")
NEXT_STEPS = (
    "lower precision (trainer.precision=bf16-mixed), activation checkpointing, an 8-bit optimizer, "
    "or run `lowvram plan` to see what fits"
)


@dataclasses.dataclass
class SizePolicy:
    """The micro-batch size per kind of step, the smallest size that failed, and the retries so far.

    Args:
        min_size: The smallest size to try; failing at it raises ``torch.OutOfMemoryError``.
        sizes: Chosen size per kind (``None``: the whole batch).
        failed: Smallest failed size per kind.
        retries: Out-of-memory retries so far, all kinds.
        owner: Names who raises, in the final error.

    Example:
        >>> policy = SizePolicy()
        >>> policy.size("train", 64)  # nothing chosen: the whole batch
        64
        >>> policy.shrink("train", 64)
        32
        >>> policy.size("train", 128), policy.failed  # 64 failed: never tried again
        (32, {'train': 64})

    """

    min_size: int = 1
    sizes: dict[str, int | None] = dataclasses.field(default_factory=dict)
    failed: dict[str, int] = dataclasses.field(default_factory=dict)
    retries: int = 0
    owner: str = "micro-batching"

    def size(self, kind: str, n: int) -> int:
        """The size to try for a batch of ``n`` samples."""
        size = self.sizes.get(kind) or n
        if kind in self.failed:
            size = min(size, self.failed[kind] - 1)
        return max(min(size, n), 1)

    def shrink(self, kind: str, used: int) -> int:
        """Record that ``used`` did not fit; return the next size.

        Raises:
            torch.OutOfMemoryError: ``used`` is already ``min_size`` or less.

        """
        if used <= self.min_size:
            raise torch.OutOfMemoryError(
                f"{self.owner}: a {kind} micro-batch of {used} sample(s) does not fit in memory "
                f"(min_micro_batch_size={self.min_size}). Next: {NEXT_STEPS}."
            )
        self.failed[kind] = min(self.failed.get(kind, used), used)
        self.sizes[kind] = max(self.min_size, used // 2)
        self.retries += 1
        return self.sizes[kind]

    def state_dict(self) -> dict[str, Any]:
        """Sizes, failures and retries (a checkpoint resumes at the size chosen)."""
        return {"sizes": dict(self.sizes), "failed": dict(self.failed), "oom_retries": self.retries}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The inverse of :meth:`state_dict`."""
        self.sizes.update(state["sizes"])
        self.failed.update(state["failed"])
        self.retries = state["oom_retries"]


class PeerOutOfMemory(torch.OutOfMemoryError):
    """Another rank ran out of memory in this attempt (raised by :class:`CollectiveGuard` before a collective)."""


Failure = Literal["here", "peer"] | None


def attempt(run: Callable[[int], T], size: int) -> tuple[T | None, Failure]:
    """``(run(size), None)``, or ``(None, "here" | "peer")`` when this rank or another ran out of memory.

    Other errors propagate. The error's traceback (and the tensors its frames hold) is released before returning, and
    CUDA's cached blocks are handed back, so the retry starts from the memory the attempt found.
    """
    try:
        return run(size), None
    except PeerOutOfMemory:
        failure: Failure = "peer"
    except Exception as err:  # noqa: BLE001 - re-raised unless it is an OOM
        if not is_oom_error(err):
            raise
        failure = "here"
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return None, failure


def decided(failure: Failure, agree: Callable[[bool], bool]) -> bool:
    """Whether every rank retries: a peer's failure was already agreed on (before a collective); else ask."""
    return True if failure == "peer" else agree(failure == "here")


def run_until_fits(
    run: Callable[[int], T],
    n: int,
    policy: SizePolicy,
    kind: str = "train",
    restore: Callable[[], None] = lambda: None,
    agree: Callable[[bool], bool] = lambda oom: oom,
    on_shrink: Callable[[str, int, int], None] = lambda kind, used, size: None,
) -> T:
    """Call ``run(size)`` for a batch of ``n`` samples, shrinking on out-of-memory errors until it fits.

    Args:
        run: Does the whole batch at micro-batch ``size`` (every backward included).
        n: Samples in the batch.
        policy: Sizes per kind; updated in place.
        kind: Which size to use and shrink.
        restore: Puts back what a failed attempt changed (:func:`snapshot_training_state`).
        agree: Every rank's decision from this rank's "out of memory?" (one collective per attempt); on one
            process, the identity.
        on_shrink: Called with ``(kind, failed size, next size)`` before each retry.

    Raises:
        torch.OutOfMemoryError: Nothing down to ``policy.min_size`` fits.

    Example:
        >>> def run(size):  # micro-batches above 16 do not fit
        ...     if size > 16:
        ...         raise torch.OutOfMemoryError("CUDA out of memory")
        ...     return size
        >>> policy = SizePolicy()
        >>> run_until_fits(run, 64, policy), policy.failed, policy.retries
        (16, {'train': 32}, 2)

    """
    while True:
        size = policy.size(kind, n)
        result, failure = attempt(run, size)
        if not decided(failure, agree):
            return result  # type: ignore[return-value]
        restore()
        on_shrink(kind, size, policy.shrink(kind, size))


class GradientStore:
    """Host copies of gradients for :func:`snapshot_training_state`, its buffers kept from one step to the next.

    CUDA gradients are copied into pinned host buffers on a side stream, asynchronously: the caller's stream goes on
    (the next forward) while the copy runs. :meth:`ready` makes the caller's stream wait for the copy (no host
    synchronisation): call it before anything writes the gradients (a backward) or reads the copies (a restore).
    Host gradients are copied synchronously into the kept buffers. Other gradient types (FSDP2's ``DTensor``) are
    copied to the host as they are.

    Example:
        >>> net = torch.nn.Linear(2, 2)
        >>> net(torch.ones(1, 2)).sum().backward()
        >>> store = GradientStore()
        >>> first = store.copy([net.weight])[0]
        >>> store.ready()  # before a backward writes net.weight.grad
        >>> store.copy([net.weight])[0] is first  # the next step reuses the buffer
        True

    """

    def __init__(self) -> None:
        self._host: dict[int, torch.Tensor] = {}
        self._stream: Any = None
        self._event: Any = None

    def copy(self, params: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """Start copying ``params``' gradients to the host; return the copies (``None``: no gradient).

        The copies are valid after :meth:`ready` and until the next :meth:`copy`.
        """
        grads = [p.grad for p in params]
        cuda = any(type(g) is torch.Tensor and g.is_cuda for g in grads)
        if cuda:
            self._stream = self._stream or torch.cuda.Stream()
            self._stream.wait_stream(torch.cuda.current_stream())  # the gradients as the last backward left them
        saved: list[torch.Tensor | None] = []
        with _disable_current_modes(), torch.cuda.stream(self._stream) if cuda else contextlib.nullcontext():
            for p, g in zip(params, grads, strict=True):
                if g is None or type(g) is not torch.Tensor:
                    saved.append(None if g is None else g.detach().to("cpu", copy=True))
                    continue
                buffer = self._host.get(id(p))
                if buffer is None or buffer.shape != g.shape or buffer.dtype != g.dtype:
                    buffer = torch.empty(g.shape, dtype=g.dtype, pin_memory=g.is_cuda)
                    self._host[id(p)] = buffer
                buffer.copy_(g.detach(), non_blocking=g.is_cuda)
                saved.append(buffer)
        if cuda:
            self._event = torch.cuda.Event()
            self._event.record(self._stream)
        return saved

    def ready(self) -> None:
        """Make the current CUDA stream wait for the last copy (nothing to do on the host)."""
        if self._event is not None:
            torch.cuda.current_stream().wait_event(self._event)


def snapshot_training_state(
    module: torch.nn.Module, grads: bool = True, scaler: Any = None, store: GradientStore | None = None
) -> Callable[[], None]:
    """Capture what a failed training attempt can change in ``module``; return the function that puts it back.

    Args:
        module: The model: its trainable parameters' gradients, BatchNorm buffers and torchmetrics states.
        grads: Keep the current gradients (a host copy: no device memory); ``False`` when the attempt starts from
            no gradients, which the restore then puts back (``None``).
        scaler: A ``torch.amp.GradScaler`` whose state the attempt may change (fp16 mixed precision), or ``None``.
        store: Where the gradients' host copies go (kept buffers; asynchronous on CUDA: call ``store.ready()``
            before the next backward). ``None``: a fresh store.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
        >>> restore = snapshot_training_state(net)
        >>> net(torch.randn(4, 2)).sum().backward()  # an attempt: gradients, BatchNorm statistics
        >>> restore()
        >>> net[0].weight.grad is None, float(net[1].running_mean.abs().sum())
        (True, 0.0)

    """
    params = [p for p in module.parameters() if p.requires_grad]
    norms = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    store = store or GradientStore()
    with _disable_current_modes():  # host-side copies: not device memory, not counted by an emulated budget
        buffers = [(b, b.detach().clone()) for m in norms for b in m.buffers()]
    saved = store.copy(params) if grads else None
    scaler_state = scaler.state_dict() if scaler is not None and scaler.is_enabled() else None
    restore_metrics = snapshot_metrics(module)

    def restore() -> None:
        store.ready()
        for buffer, value in buffers:
            buffer.copy_(value)
        for i, p in enumerate(params):
            value = None if saved is None else saved[i]
            # a copy: the next attempt accumulates into p.grad in place, the snapshot must stay as it was
            p.grad = None if value is None else value.to(p.device, copy=True)
        if scaler_state is not None:
            scaler.load_state_dict(scaler_state)
            scaler._per_optimizer_states.clear()
        restore_metrics()

    return restore


def reset_fsdp2(module: torch.nn.Module) -> None:
    """Put FSDP2 (``fully_shard``) modules back in their between-steps state after an exception aborted a step.

    torch >= 2.13: ``FSDPModule.reset_iter_state()`` on each root (waits on in-flight collectives, reshards, clears
    the iteration's trackers: PyTorch's supported recovery). Older torch: ``reshard()`` on every FSDP module.
    The aborted step's gradients are discarded by FSDP; :func:`snapshot_training_state` puts the window's back.
    """
    from torch.distributed.fsdp import FSDPModule

    modules = [m for m in module.modules() if isinstance(m, FSDPModule)]
    inner = {id(child) for m in modules for child in m.modules() if child is not m}
    for m in modules:
        if hasattr(m, "reset_iter_state"):
            if id(m) not in inner:  # a root
                m.reset_iter_state()
        else:
            m.reshard()


class CollectiveGuard:
    """Keeps ranks in step when one runs out of memory between the collectives of a sharded step (FSDP2).

    FSDP2 all-gathers parameters in forward and reduce-scatters gradients in backward. A rank that runs out of memory
    between two of them leaves the others waiting in the next one (a hang). Inside the guard, each of those
    collectives is preceded by one flag all-reduce on a CPU (gloo) group: every rank says "still going"; a rank that
    failed says "out of memory" from :meth:`agree` instead. The others then raise :class:`PeerOutOfMemory` before
    entering the collective, so every rank leaves the attempt after the same number of collectives. The flags are
    host tensors: no device synchronisation.

    Args:
        group: A process group whose backend takes CPU tensors (``dist.new_group(backend="gloo")``); ``None``: the
            default group (which must then be gloo).

    """

    #: torch.distributed functions FSDP2 calls for its collectives (torch 2.13 calls the ``*_single`` ones; the
    #: others are their older names, patched when present)
    NAMES = ("all_gather_single", "reduce_scatter_single", "all_gather_into_tensor", "reduce_scatter_tensor")

    def __init__(self, group: Any = None) -> None:
        import torch.distributed as dist

        self.group = group
        self._all_reduce = dist.all_reduce

    def agree(self, failed: bool) -> bool:
        """One flag all-reduce: whether any rank failed (``run_until_fits``'s ``agree``)."""
        import torch.distributed as dist

        flag = torch.tensor([int(failed)], dtype=torch.int32)
        self._all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())

    @contextmanager
    def active(self) -> Iterator[None]:
        """Guard FSDP2's collectives in this block."""
        import torch.distributed as dist

        from lightning_lowvram._patching import patched

        def collective(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            if self.agree(False):
                raise PeerOutOfMemory("another rank ran out of memory in this attempt; retrying together")
            return original(*args, **kwargs)

        with contextlib.ExitStack() as stack:
            for name in self.NAMES:
                if hasattr(dist, name):
                    stack.enter_context(patched(dist, name, collective, wrap=True))
            yield
