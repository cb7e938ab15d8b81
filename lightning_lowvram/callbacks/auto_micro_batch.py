"""AutoMicroBatchCallback: the largest micro-batch that fits, the exact effective batch, OOM recovery."""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from lightning_lowvram._metrics import snapshot_metrics
from lightning_lowvram._patching import patch
from lightning_lowvram.cores.batches import (
    COUNTS,
    SliceFn,
    batch_size_of,
    has_ignored_labels,
    merge_outputs,
    micro_batch_bounds,
    slice_batch,
)
from lightning_lowvram.cores.micro_batch import (
    CollectiveGuard,
    GradientStore,
    SizePolicy,
    attempt,
    decided,
    reset_fsdp2,
    run_until_fits,
    snapshot_training_state,
)

Size = int | Literal["auto"]
_EVAL_STEPS = {"validate": "validation_step", "test": "test_step", "predict": "predict_step"}


class AutoMicroBatchCallback(Callback):
    """Split every batch into the largest micro-batches that fit; accumulate so the optimizer sees the whole batch.

    The Lightning shell of :mod:`lightning_lowvram.cores.micro_batch` (the retry engine and its invariants, usable
    without a Trainer).

    Each batch the dataloader yields is cut into micro-batches; each micro-batch's loss is weighted by its share of the
    batch (samples, or ``count_fn`` units such as tokens) and back-propagated, so the gradient is the full batch's and
    the effective batch (loader batch x ``accumulate_grad_batches`` x world size) never changes. With ``"auto"`` the
    first attempt is the whole batch; on an out-of-memory error in forward or backward the *same* batch is redone at
    half the size, after gradients, BatchNorm running statistics, torchmetrics states and the GradScaler are put back.
    Sizes that failed are never tried again. Validation, test and predict have their own size: an OOM there continues
    the batch with the remaining samples at a smaller size and never shrinks the training size. Under DDP every
    attempt ends with one all-reduce of an OOM flag, so all ranks retry together and settle on the same size; under
    FSDP2 (``ModelParallelStrategy``, ``fully_shard`` in ``configure_model``) each of FSDP's collectives inside an
    attempt is preceded by the same flag, so a rank out of memory between two of them never leaves the others waiting.

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
        slice_fn: ``slice_fn(batch, start, end)`` for batch types :mod:`lightning_lowvram.cores.batches` does not know.

    Raises:
        ValueError: For sizes that are not ``"auto"`` or an integer >= ``min_micro_batch_size`` >= 1.
        MisconfigurationException: At setup, for manual optimization, FSDP1 (``FSDPStrategy``) or DeepSpeed.

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
        self.policy = SizePolicy(min_micro_batch_size, owner="AutoMicroBatchCallback")
        self.count_fn = COUNTS[count_fn] if isinstance(count_fn, str) else count_fn
        self.slice_fn = slice_fn
        self._labels_checked = False
        self.eval_enabled = eval_micro_batch_size is not None
        # chosen sizes (None: the whole batch) per kind ("train" or an eval stage)
        self.sizes["train"] = None if micro_batch_size == "auto" else micro_batch_size
        for stage in _EVAL_STEPS:
            self.sizes[stage] = None if eval_micro_batch_size in ("auto", None) else eval_micro_batch_size
        self.micro_batch_size: int | None = None  # last training micro-batch size used
        self.micro_batches = 0  # micro-batches in the last training batch
        self._undo: dict[str, Callable[[], None]] = {}  # patched module methods -> how to put them back
        self._zeroed: tuple[int, int] | None = None
        self._gradient_store = GradientStore()  # host copies of a window's gradients, buffers kept between steps
        self._warned_bn = False
        self._ran: set[str] = set()  # kinds that ran through the callback
        self._backprop_done = False
        self._guard: CollectiveGuard | None = None  # FSDP2 across ranks (ModelParallelStrategy)

    @property
    def sizes(self) -> dict[str, int | None]:
        """Chosen micro-batch size per kind (``None``: the whole batch)."""
        return self.policy.sizes

    @property
    def failed(self) -> dict[str, int]:
        """Smallest size that failed, per kind: never tried again."""
        return self.policy.failed

    @property
    def oom_retries(self) -> int:
        """Out-of-memory retries so far."""
        return self.policy.retries

    # -- Lightning hooks ----------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._check(trainer, pl_module, stage)
        self._trainer, self._module = trainer, pl_module
        if self._guard is None and trainer.world_size > 1 and isinstance(trainer.strategy, ModelParallelStrategy):
            import torch.distributed as dist

            # FSDP2 runs collectives inside forward and backward: a guard keeps ranks in step through an OOM
            self._guard = CollectiveGuard(dist.new_group(backend="gloo"))
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
        self._gradient_store = GradientStore()  # the host buffers go with the run

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int):
        values = {"micro_batch_size": self.micro_batch_size, "micro_batches": self.micro_batches}
        values["oom_retries"] = self.oom_retries
        for key, value in values.items():
            pl_module.log(f"lowvram/{key}", float(value or 0), on_step=True, on_epoch=False, batch_size=1)

    @override
    def state_dict(self) -> dict[str, Any]:
        return self.policy.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.policy.load_state_dict(state_dict)

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
                "batch in your training_step with lightning_lowvram.cores.batches.split_batch"
            )
        strategy = type(trainer.strategy).__name__
        if "DeepSpeed" in strategy:
            raise MisconfigurationException(
                f"AutoMicroBatchCallback does not support the {strategy}: DeepSpeed runs its own gradient "
                "accumulation and optimizer step (use its train_micro_batch_size_per_gpu), or use FSDP2 through "
                "ModelParallelStrategy, 'ddp' or a single device"
            )
        if isinstance(trainer.strategy, FSDPStrategy):  # FSDP1 (FSDP2Strategy is a ModelParallelStrategy)
            raise MisconfigurationException(
                f"AutoMicroBatchCallback is not tested with the {strategy} (FSDP1): Lightning runs training_step "
                "inside FSDP1's forward, where a backward per micro-batch is not shown to work; use FSDP2 "
                "(ModelParallelStrategy with fully_shard in configure_model), which is tested"
            )

    def _wrap(self, module: L.LightningModule, name: str, replacement: Callable[..., Any]) -> None:
        if name not in self._undo:
            self._undo[name] = patch(module, name, replacement, wrap=True)

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
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        snapshot = snapshot_training_state(self._module, not first_in_window, scaler, self._gradient_store)

        def restore() -> None:
            self._reset_sharding()
            snapshot()

        run = functools.partial(self._run_train, original, batch, batch_idx, args, kwargs)
        self._ran.add("train")
        with self._guarded():
            return run_until_fits(
                run, batch_size_of(batch), self.policy, "train", restore, self._any_rank, self._retrying
            )

    def _originals_call(self, name: str, *args: Any) -> Any:
        return getattr(self._module, name).__wrapped__(*args)

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
            self._gradient_store.ready()  # the window's gradients copied (asynchronously on CUDA) before they change
            self._trainer.strategy.backward(weighted / accumulate, None)
            loss = loss + weighted.detach()
            if i < last:
                del output, weighted
        if isinstance(self._trainer.strategy, DDPStrategy) and self._trainer.world_size > 1:
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

    # -- evaluation ---------------------------------------------------------------------------------------------
    def _eval_step(self, stage: str, original: Callable[..., Any], batch: Any, batch_idx: int, *args: Any, **kwargs):
        self._ran.add(stage)
        n = batch_size_of(batch)
        outputs, done = [], 0
        while done < n:
            size = min(self.policy.size(stage, n), n - done)
            if size == n:
                piece = batch
            else:
                piece = (
                    self.slice_fn(batch, done, done + size)
                    if self.slice_fn
                    else slice_batch(batch, done, done + size, n)
                )
            restore_metrics = snapshot_metrics(self._module)
            with self._guarded():
                result, failure = attempt(lambda _, piece=piece: original(piece, batch_idx, *args, **kwargs), size)
            if decided(failure, self._any_rank):
                self._reset_sharding()
                restore_metrics()  # a metric updated before the OOM would count this piece twice
                self._retrying(stage, size, self.policy.shrink(stage, size))  # completed pieces stay done
                continue
            outputs.append(result)
            done += size
        return merge_outputs(outputs) if stage == "predict" or any(o is not None for o in outputs) else None

    # -- decisions ----------------------------------------------------------------------------------------------
    def _any_rank(self, oom: bool) -> bool:
        if self._guard is not None:
            return self._guard.agree(oom)
        trainer = self._trainer
        return trainer.strategy.reduce_boolean_decision(oom, all=False) if trainer.world_size > 1 else oom

    def _guarded(self) -> Any:
        return self._guard.active() if self._guard is not None else contextlib.nullcontext()

    def _reset_sharding(self) -> None:
        """After an aborted FSDP2 step: FSDP's per-iteration state reset, every parameter sharded again."""
        if self._guard is not None:
            reset_fsdp2(self._module)

    @staticmethod
    def _retrying(kind: str, used: int, size: int) -> None:
        rank_zero_info(f"AutoMicroBatchCallback: out of memory at {kind} micro-batch {used}; retrying at {size}")

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
