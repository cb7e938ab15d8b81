"""AutoMicroBatchCallback: the largest micro-batch that fits, the exact effective batch, OOM recovery."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils._python_dispatch import _disable_current_modes
from typing_extensions import override

from lightning_lowvram.batching import (
    COUNTS,
    SliceFn,
    batch_size_of,
    has_ignored_labels,
    merge_outputs,
    micro_batch_bounds,
    slice_batch,
)
from lightning_lowvram.callbacks._metrics import snapshot_metrics
from lightning_lowvram.callbacks._patching import patch_method
from lightning_lowvram.memory.oom import is_oom_error

Size = int | Literal["auto"]
_EVAL_STEPS = {"validate": "validation_step", "test": "test_step", "predict": "predict_step"}
_NEXT_STEPS = (
    "lower precision (trainer.precision=bf16-mixed), activation checkpointing, an 8-bit optimizer, "
    "or run `lowvram plan` to see what fits"
)


class AutoMicroBatchCallback(Callback):
    """Split every batch into the largest micro-batches that fit; accumulate so the optimizer sees the whole batch.

    Each batch the dataloader yields is cut into micro-batches; each micro-batch's loss is weighted by its share of the
    batch (samples, or ``count_fn`` units such as tokens) and back-propagated, so the gradient is the full batch's and
    the effective batch (loader batch x ``accumulate_grad_batches`` x world size) never changes. With ``"auto"`` the
    first attempt is the whole batch; on an out-of-memory error in forward or backward the *same* batch is redone at
    half the size, after gradients, BatchNorm running statistics, torchmetrics states and the GradScaler are put back.
    Sizes that failed are never tried again. Validation, test and predict have their own size: an OOM there continues
    the batch with the remaining samples at a smaller size and never shrinks the training size. Under DDP every
    attempt ends with one all-reduce of an OOM flag, so all ranks retry together and settle on the same size.

    Every backward runs inside the wrapped ``training_step`` (so a failed attempt leaves no graph in Lightning's
    closure); the step returns the full batch's loss, detached. Under DDP it carries a zero-valued graph to every
    parameter, so Lightning's own backward adds nothing and all-reduces the accumulated gradients once.

    Know this: side effects of ``training_step`` other than torchmetrics updates run again when a batch is redone, and
    values it logs with ``self.log`` are logged per micro-batch (the loss Lightning records is the full batch's).
    ``torch.compile``d modules work; each new micro-batch size is one more compilation. With
    ``accumulate_grad_batches > 1`` the gradients of a window's earlier batches are copied to host memory before each
    later batch, so that a failure can put them back: one gradient-sized device-to-host copy per such batch (within
    the benchmark's noise on CPU; not measured on a GPU).

    Args:
        micro_batch_size: ``"auto"`` (start at the whole batch) or a starting size in samples.
        eval_micro_batch_size: Same for validation/test/predict; ``None`` leaves evaluation alone.
        min_micro_batch_size: Smallest size to try; if it does not fit, a clear error is raised.
        count_fn: ``count_fn(batch) -> number`` of loss units when the module's loss is a mean over those units
            rather than over samples, or a preset: ``"causal_lm_tokens"`` (Hugging Face causal LMs: the shifted
            ``labels`` that are not -100) or ``"label_tokens"`` (masked LM, token classification: ``labels`` not
            -100). A first dict batch whose ``labels`` hold -100 with no ``count_fn`` gets one warning: its split is not
            exact. Micro-batches with a count of 0 are skipped (their weight is 0).
        slice_fn: ``slice_fn(batch, start, end)`` for batch types :mod:`lightning_lowvram.batching` does not know.

    Raises:
        ValueError: For sizes that are not ``"auto"`` or an integer >= ``min_micro_batch_size`` >= 1.
        MisconfigurationException: At setup, for manual optimization, FSDP or DeepSpeed.

    Example:
        >>> from lightning_lowvram.demo import DigitsDataModule, DigitsMLP
        >>> micro = AutoMicroBatchCallback(micro_batch_size=16)
        >>> trainer = L.Trainer(max_steps=2, callbacks=[micro], logger=False, enable_checkpointing=False,
        ...                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
        >>> trainer.fit(DigitsMLP(hidden=16), DigitsDataModule(batch_size=64))
        >>> micro.micro_batch_size, micro.micro_batches
        (16, 4)

    """

    def __init__(
        self,
        micro_batch_size: Size = "auto",
        eval_micro_batch_size: Size | None = "auto",
        min_micro_batch_size: int = 1,
        count_fn: Callable[[Any], float] | Literal["causal_lm_tokens", "label_tokens"] | None = None,
        slice_fn: SliceFn | None = None,
    ) -> None:
        if not isinstance(min_micro_batch_size, int) or min_micro_batch_size < 1:
            raise ValueError(f"min_micro_batch_size must be an integer >= 1, got {min_micro_batch_size!r}")
        for name, value in (("micro_batch_size", micro_batch_size), ("eval_micro_batch_size", eval_micro_batch_size)):
            if value is None and name == "eval_micro_batch_size":
                continue
            if value != "auto" and (
                isinstance(value, bool) or not isinstance(value, int) or value < min_micro_batch_size
            ):
                raise ValueError(
                    f"{name} must be 'auto' or an integer >= min_micro_batch_size={min_micro_batch_size}, got {value!r}"
                )
        if count_fn is not None and not callable(count_fn) and not (isinstance(count_fn, str) and count_fn in COUNTS):
            raise ValueError(f"count_fn must be a callable or one of {', '.join(map(repr, COUNTS))}, got {count_fn!r}")
        self.min_micro_batch_size = min_micro_batch_size
        self.count_fn = COUNTS[count_fn] if isinstance(count_fn, str) else count_fn
        self.slice_fn = slice_fn
        self._labels_checked = False
        self.eval_enabled = eval_micro_batch_size is not None
        # chosen sizes (None: the whole batch) and the smallest size that failed, per kind ("train" or an eval stage)
        self.sizes: dict[str, int | None] = {"train": None if micro_batch_size == "auto" else micro_batch_size}
        for stage in _EVAL_STEPS:
            self.sizes[stage] = None if eval_micro_batch_size in ("auto", None) else eval_micro_batch_size
        self.failed: dict[str, int] = {}
        self.oom_retries = 0
        self.micro_batch_size: int | None = None  # last training micro-batch size used
        self.micro_batches = 0  # micro-batches in the last training batch
        self._undo: dict[str, Callable[[], None]] = {}  # patched module methods -> how to put them back
        self._zeroed: tuple[int, int] | None = None
        self._warned_bn = False
        self._ran: set[str] = set()  # kinds that ran through the callback
        self._backprop_done = False

    # -- Lightning hooks ----------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._check(trainer, pl_module, stage)
        self._trainer, self._module = trainer, pl_module
        if stage == "fit":
            self._wrap(pl_module, "training_step", self._training_step)
            self._wrap(pl_module, "backward", self._backward)
            self._wrap(pl_module, "optimizer_zero_grad", self._optimizer_zero_grad)
        if self.eval_enabled:
            for eval_stage in ["validate"] if stage == "fit" else [stage] if stage in _EVAL_STEPS else []:
                step = functools.partial(self._eval_step, eval_stage)
                self._wrap(pl_module, _EVAL_STEPS[eval_stage], step)

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for undo in reversed(self._undo.values()):
            undo()
        self._undo.clear()

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int):
        values = {"micro_batch_size": self.micro_batch_size, "micro_batches": self.micro_batches}
        values["oom_retries"] = self.oom_retries
        for key, value in values.items():
            pl_module.log(f"lowvram/{key}", float(value or 0), on_step=True, on_epoch=False, batch_size=1)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"sizes": dict(self.sizes), "failed": dict(self.failed), "oom_retries": self.oom_retries}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.sizes.update(state_dict["sizes"])
        self.failed.update(state_dict["failed"])
        self.oom_retries = state_dict["oom_retries"]

    def summary(self) -> str:
        """One line for the `lowvram` summary: the sizes chosen per stage and the retries it took."""
        chosen = ", ".join(f"{kind} {size or 'whole batch'}" for kind, size in self.sizes.items() if kind in self._ran)
        failed = f", failed: {', '.join(f'{k} {v}' for k, v in self.failed.items())}" if self.failed else ""
        return f"micro-batch {chosen or 'not used'}; {self.oom_retries} OOM retries{failed}"

    # -- setup --------------------------------------------------------------------------------------------------
    @staticmethod
    def _check(trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and not pl_module.automatic_optimization:
            raise MisconfigurationException(
                "AutoMicroBatchCallback supports automatic optimization only: with manual optimization, split the "
                "batch in your training_step with lightning_lowvram.batching.split_batch"
            )
        strategy = type(trainer.strategy).__name__
        if any(name in strategy for name in ("FSDP", "DeepSpeed", "ModelParallel")):
            raise MisconfigurationException(
                f"AutoMicroBatchCallback does not support the {strategy}: use strategy='auto' or 'ddp', "
                "or the strategy's own micro-batching"
            )

    def _wrap(self, module: L.LightningModule, name: str, replacement: Callable[..., Any]) -> None:
        if name not in self._undo:
            self._undo[name] = patch_method(module, name, replacement)

    # -- training -----------------------------------------------------------------------------------------------
    def _optimizer_zero_grad(self, original: Callable[..., Any], epoch: int, batch_idx: int, optimizer: Any) -> None:
        if self._zeroed == (epoch, batch_idx):  # already zeroed before this batch's micro-batches ran
            self._zeroed = None
            return
        original(epoch, batch_idx, optimizer)

    def _training_step(self, original: Callable[..., Any], batch: Any, batch_idx: int, *args: Any, **kwargs: Any):
        trainer = self._trainer
        if self.count_fn is None and not self._labels_checked:
            self._labels_checked = True  # the first batch only: no per-step check (nor device sync) afterwards
            if has_ignored_labels(batch):
                rank_zero_warn(
                    "AutoMicroBatchCallback: the batch's `labels` hold -100 (ignored positions) and no count_fn was "
                    "given, so micro-batches are weighted by samples and a split batch is not exactly the whole batch: "
                    "pass count_fn='causal_lm_tokens' (Hugging Face causal LMs) or 'label_tokens' (masked LM, token "
                    "classification)"
                )
        first_in_window = batch_idx % trainer.accumulate_grad_batches == 0
        if first_in_window:
            # Lightning zeroes gradients *after* training_step; the micro-batches back-propagate inside it
            self._originals_call("optimizer_zero_grad", trainer.current_epoch, batch_idx, trainer.optimizers[0])
            self._zeroed = (trainer.current_epoch, batch_idx)
        restore = self._snapshot(first_in_window)
        run = functools.partial(self._run_train, original, batch, batch_idx, args, kwargs)
        return self._until_it_fits("train", batch, restore, run)

    def _originals_call(self, name: str, *args: Any) -> Any:
        return getattr(self._module, name).__wrapped__(*args)

    def _until_it_fits(self, kind: str, batch: Any, restore: Callable[[], None], run: Callable[[int], Any]) -> Any:
        self._ran.add(kind)
        n = batch_size_of(batch)
        while True:
            size = self._size(kind, n)
            result, oom = self._attempt(run, size)
            if not self._any_rank(oom):
                return result
            restore()
            self._shrink(kind, size)

    def _attempt(self, run: Callable[[int], Any], size: int) -> tuple[Any, bool]:
        try:
            return run(size), False
        except Exception as err:  # noqa: BLE001 - re-raised unless it is an OOM
            if not is_oom_error(err):
                raise
        # outside the except block: the traceback (and the tensors its frames hold) is gone
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return None, True

    def _run_train(self, original, batch, batch_idx, args, kwargs, size: int) -> Any:
        n = batch_size_of(batch)
        bounds = micro_batch_bounds(n, size)
        self.micro_batch_size, self.micro_batches = min(size, n), len(bounds)
        if len(bounds) > 1:
            self._warn_batchnorm()
        total = self._count(batch, n)
        if total <= 0:
            raise ValueError(f"count_fn returned {total:g} for a whole batch (batch {batch_idx}): it must be > 0")
        accumulate = self._trainer.accumulate_grad_batches
        loss: torch.Tensor | float = 0.0
        micros = [self.slice_fn(batch, s, e) if self.slice_fn else slice_batch(batch, s, e, n) for s, e in bounds]
        counts = [self._count(micro, end - start) for micro, (start, end) in zip(micros, bounds, strict=True)]
        last = max(i for i, c in enumerate(counts) if c > 0)
        for i, (micro, count) in enumerate(zip(micros, counts, strict=True)):
            if count == 0:
                continue  # weight 0; a mean over no units would be NaN
            output = original(micro, batch_idx, *args, **kwargs)
            share = count / total
            weighted = _loss_of(output) * share
            # every backward runs here, inside the attempt, so an OOM in any of them is retried and a failed attempt
            # leaves no graph behind in Lightning's closure
            self._trainer.strategy.backward(weighted / accumulate, None)
            loss = loss + weighted.detach()
            if i < last:
                del output, weighted
        if self._trainer.world_size > 1:
            # DDP all-reduces gradients in the backward Lightning runs on the returned loss (the inner ones ran inside
            # DDP's forward, where its hooks stay idle): a zero that reaches every parameter through a cheap graph
            # (sum, no saved activations) makes that backward add nothing and all-reduce the accumulated gradients
            params = [p for p in self._module.parameters() if p.requires_grad]
            loss = loss + 0.0 * sum(p.sum() for p in params)
        else:
            self._backprop_done = True  # Lightning's own backward of the returned (detached) loss is skipped
        return _with_loss(output, loss)

    def _count(self, batch: Any, samples: int) -> float:
        # a Python float: an integer tensor divided by another would give a float32 share (and float32 rounding)
        if self.count_fn is None:
            return float(samples)
        value = self.count_fn(batch)
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise ValueError(f"count_fn must return a finite number >= 0 of loss units, got {value!r}")
        return float(value)

    def _backward(self, original: Callable[..., Any], loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        if self._backprop_done:  # every micro-batch already back-propagated inside training_step
            self._backprop_done = False
            return None
        return original(loss, *args, **kwargs)

    def _snapshot(self, first_in_window: bool) -> Callable[[], None]:
        """Capture what a failed attempt can change; return the function that puts it back."""
        module = self._module
        params = [p for p in module.parameters() if p.requires_grad]
        norms = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        with _disable_current_modes():  # host-side copies: not device memory, not counted by an emulated budget
            buffers = [(b, b.detach().clone()) for m in norms for b in m.buffers()]
            grads = (
                None
                if first_in_window
                else [None if p.grad is None else p.grad.detach().to("cpu", copy=True) for p in params]
            )
        scaler = getattr(self._trainer.precision_plugin, "scaler", None)
        scaler_state = scaler.state_dict() if scaler is not None and scaler.is_enabled() else None
        restore_metrics = snapshot_metrics(module)

        def restore() -> None:
            for buffer, saved in buffers:
                buffer.copy_(saved)
            for i, p in enumerate(params):
                saved = None if grads is None else grads[i]
                # a copy: the next attempt accumulates into p.grad in place, the snapshot must stay as it was
                p.grad = None if saved is None else saved.to(p.device, copy=True)
            if scaler_state is not None:
                scaler.load_state_dict(scaler_state)
                scaler._per_optimizer_states.clear()
            restore_metrics()

        return restore

    # -- evaluation ---------------------------------------------------------------------------------------------
    def _eval_step(self, stage: str, original: Callable[..., Any], batch: Any, batch_idx: int, *args: Any, **kwargs):
        self._ran.add(stage)
        n = batch_size_of(batch)
        outputs, done = [], 0
        while done < n:
            size = min(self._size(stage, n), n - done)
            if size == n:
                piece = batch
            else:
                piece = (
                    self.slice_fn(batch, done, done + size)
                    if self.slice_fn
                    else slice_batch(batch, done, done + size, n)
                )
            restore_metrics = snapshot_metrics(self._module)
            result, oom = self._attempt(lambda _, piece=piece: original(piece, batch_idx, *args, **kwargs), size)
            if self._any_rank(oom):
                restore_metrics()  # a metric updated before the OOM would count this piece twice
                self._shrink(stage, size)  # completed pieces stay done: nothing is counted twice
                continue
            outputs.append(result)
            done += size
        return merge_outputs(outputs) if stage == "predict" or any(o is not None for o in outputs) else None

    # -- decisions ----------------------------------------------------------------------------------------------
    def _size(self, kind: str, n: int) -> int:
        size = self.sizes[kind] or n
        if kind in self.failed:
            size = min(size, self.failed[kind] - 1)
        return max(min(size, n), 1)

    def _any_rank(self, oom: bool) -> bool:
        trainer = self._trainer
        return trainer.strategy.reduce_boolean_decision(oom, all=False) if trainer.world_size > 1 else oom

    def _shrink(self, kind: str, used: int) -> None:
        if used <= self.min_micro_batch_size:
            raise torch.OutOfMemoryError(
                f"AutoMicroBatchCallback: a {kind} micro-batch of {used} sample(s) does not fit in memory "
                f"(min_micro_batch_size={self.min_micro_batch_size}). Next: {_NEXT_STEPS}."
            )
        self.failed[kind] = min(self.failed.get(kind, used), used)
        self.sizes[kind] = max(self.min_micro_batch_size, used // 2)
        self.oom_retries += 1
        rank_zero_info(
            f"AutoMicroBatchCallback: out of memory at {kind} micro-batch {used}; retrying at {self.sizes[kind]}"
        )

    def _warn_batchnorm(self) -> None:
        if self._warned_bn:
            return
        self._warned_bn = True
        if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in self._module.modules()):
            rank_zero_warn(
                "AutoMicroBatchCallback: BatchNorm layers now see micro-batches smaller than the batch, so their "
                "statistics differ from a full-batch run; consider GroupNorm/LayerNorm"
            )


def _loss_of(output: Any) -> torch.Tensor:
    loss = output.get("loss") if isinstance(output, dict) else output
    if not isinstance(loss, torch.Tensor):
        raise MisconfigurationException(
            "AutoMicroBatchCallback: training_step must return a loss tensor (or a dict with 'loss') for every "
            f"micro-batch, got {type(output).__name__}"
        )
    return loss


def _with_loss(output: Any, loss: torch.Tensor) -> Any:
    return {**output, "loss": loss} if isinstance(output, dict) else loss
