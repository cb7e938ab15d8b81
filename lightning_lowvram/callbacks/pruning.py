"""PruningCallback: structural pruning that cuts training memory, and masked pruning done without float copies."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import move_data_to_device, rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from typing_extensions import override

from lightning_lowvram._patching import patch
from lightning_lowvram.cores.batches import slice_batch
from lightning_lowvram.cores.pruning import (
    PRUNABLE,
    ROOTS,
    Criterion,
    Forward,
    Op,
    apply_masks,
    call,
    channels,
    check_criterion,
    check_layouts,
    check_runs,
    cubic_sparsity,
    keep_ratios,
    output_layers,
    prunable_layers,
    prune_structured,
    update_masks,
)
from lightning_lowvram.cores.pruning_units import conform_to_state_dict

METHODS = ("structured", "unstructured")
SCHEDULES = ("once", "gradual")


class PruningCallback(Callback):
    """Prune while training: ``structured`` removes neurons/channels/head dimensions, ``unstructured`` masks weights.

    Structured pruning (Torch-Pruning's dependency graph) shrinks parameters, gradients, optimizer state and
    activations together; after each pruning step the optimizers and LR schedulers are rebuilt (their hyperparameters,
    such as the scheduled learning rate, are carried over; per-parameter optimizer state such as momentum restarts).
    Unstructured pruning keeps a ``bool`` mask per pruned weight and zeroes the weights after every optimizer step; it
    saves *no* training memory (the weights stay dense) and is made permanent when fit ends (the model keeps its
    zeros and loses the hook; the masks move to host memory, in this callback's state, for a resumed run).

    ``amount`` is the fraction of channels removed from every prunable group (structured) or of weights masked
    (unstructured). Removing half the channels of a layer whose inputs also halve removes about 3/4 of its weights.
    The output layer is never pruned.

    Transformer blocks of a known layout (Hugging Face GPT-2, Llama-style with grouped-query attention, BERT-style)
    lose whole attention heads and MLP channels and keep their hidden size, so embeddings (tied or not) and the output
    head stay; their configs are updated where they can describe the result. Other models are traced by running the
    module's own ``training_step`` on the first two samples of the first training batch (any batch structure), or
    ``forward(self.example_input_array)`` when the module sets it. A checkpoint from any point of the schedule loads
    (``trainer.fit/validate/test(ckpt_path=...)``, :func:`load_pruned`): the module takes the checkpoint's shapes.

    The one trap: an attention layout the pruner does not know is an error at setup naming the module (``ignore`` it,
    or use ``method="unstructured"``); ``scope="global"`` is refused on transformer blocks.

    Args:
        amount: Final fraction in [0, 1).
        method: ``"structured"`` or ``"unstructured"``.
        criterion: ``"magnitude"`` (L2 of the group for structured, ``|w|`` for unstructured) or ``"random"``.
        schedule: ``"once"`` (before the optimizer exists), ``"gradual"`` (cubic, Zhu & Gupta 2017, from
            ``start_step`` to ``end_step`` every ``frequency`` optimizer steps) or a callable ``step -> fraction``
            evaluated after every optimizer step.
        start_step: First optimizer step of the gradual schedule.
        end_step: Last one; ``None``: half of the run's optimizer steps.
        frequency: Optimizer steps between pruning steps; ``None``: ten pruning steps in all.
        scope: ``"layer"`` (the same fraction in every layer) or ``"global"`` (ranked across layers).
        ignore: fnmatch patterns of layer names never to prune (e.g. ``"blocks.0.*"``).
        seed: Seed of the ``random`` criterion.

    Raises:
        ValueError: For arguments out of range; at setup, for ``ignore`` patterns that match nothing or a model with
            nothing left to prune.

    Example:
        >>> from lightning_lowvram.demo import DigitsDataModule, DigitsMLP
        >>> model = DigitsMLP(hidden=32)
        >>> trainer = L.Trainer(max_steps=2, callbacks=[PruningCallback(0.5, schedule="once")], logger=False,
        ...                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(model, DigitsDataModule())
        >>> model.net[0].out_features
        16

    """

    def __init__(
        self,
        amount: float = 0.5,
        method: Literal["structured", "unstructured"] = "structured",
        criterion: Criterion = "magnitude",
        schedule: Literal["once", "gradual"] | Callable[[int], float] = "gradual",
        start_step: int = 0,
        end_step: int | None = None,
        frequency: int | None = None,
        scope: Literal["layer", "global"] = "layer",
        ignore: Sequence[str] = (),
        seed: int = 0,
    ) -> None:
        if isinstance(amount, bool) or not isinstance(amount, int | float) or not 0.0 <= amount < 1.0:
            raise ValueError(f"amount must be a number in [0, 1), got {amount!r}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}, got {method!r}")
        check_criterion(criterion)
        if not callable(schedule) and schedule not in SCHEDULES:
            raise ValueError(
                f"schedule must be one of {', '.join(map(repr, SCHEDULES))} or a callable, got {schedule!r}"
            )
        if scope not in ("layer", "global"):
            raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
        if (
            start_step < 0
            or (end_step is not None and end_step <= start_step)
            or (frequency is not None and frequency < 1)
        ):
            raise ValueError(
                f"need 0 <= start_step < end_step and frequency >= 1, got start_step={start_step}, "
                f"end_step={end_step}, frequency={frequency}"
            )
        if isinstance(ignore, str):
            ignore = [ignore]
        self.amount, self.method, self.criterion, self.schedule = float(amount), method, criterion, schedule
        self.start_step, self.end_step, self.frequency = start_step, end_step, frequency
        self.scope, self.ignore, self.seed = scope, list(ignore), seed
        # state (see state_dict): what has been pruned so far
        self.fraction = 0.0
        self.ops: list[Op] = []  # structured record, each op tagged with its "event" (optimizer step; -1: setup)
        self.masks: dict[str, torch.Tensor] = {}
        self.events: list[int] = []
        self._example: tuple[Any, Forward | None] | None = None  # (inputs, how to run them), not saved
        self.last_metrics: dict[str, float] | None = None  # after the latest pruning step, for the summary
        self.original_parameters = 0
        self.original_channels: dict[str, int] = {}
        self._layers: dict[str, nn.Module] = {}
        self._hooks: list[Any] = []
        self._undo: Callable[[], None] | None = None  # puts back the module's own on_load_checkpoint

    @override
    @property
    def state_key(self) -> str:
        return self._generate_state_key(amount=self.amount, method=self.method, criterion=self.criterion)

    # -- Lightning hooks ----------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._wrap_on_load_checkpoint(pl_module)
        if stage != "fit":
            return
        self._example = _example_inputs(trainer, pl_module)
        inputs, forward = self._example
        self._layers = prunable_layers(pl_module, self.ignore, output_layers(pl_module, inputs, forward), self._types)
        if self.method == "structured":
            self._check_structure(trainer, pl_module)
        self.original_parameters = self.original_parameters or _count(pl_module)
        self.original_channels = self.original_channels or channels(pl_module)
        if self.schedule == "once" and -1 not in self.events:
            self._prune(trainer, pl_module, self.amount, event=-1)

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.schedule == "gradual" and self.end_step is None:
            total = trainer.estimated_stepping_batches
            if total == float("inf"):
                raise MisconfigurationException("PruningCallback(schedule='gradual') needs end_step= or max_steps")
            self.end_step = max(self.start_step + 1, self.start_step + int(total - self.start_step) // 2)
        if self.frequency is None and self.end_step is not None:
            self.frequency = max(1, (self.end_step - self.start_step) // 10)
        self.masks = {name: mask.to(pl_module.device) for name, mask in self.masks.items()}
        self._hook_optimizers(trainer)

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, i: int):
        step = trainer.global_step
        if self.schedule == "once" or step in self.events:
            return
        target = self._target(step)
        if target > self.fraction + 1e-9:
            self._prune(trainer, pl_module, target, event=step)

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for key, value in self.metrics(pl_module).items():
            pl_module.log(f"lowvram/pruning/{key}", float(value), on_step=False, on_epoch=True)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.masks:  # permanent: the zeros stay in the weights, the hooks go; the masks leave the device but
            apply_masks(self._layers, self.masks)  # stay in this callback's state, so a later fit can resume
            self.masks = {name: mask.cpu() for name, mask in self.masks.items()}
        self._remove_hooks()

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._remove_hooks()
        if self._undo is not None:
            self._undo()
            self._undo = None

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "fraction": self.fraction,
            "ops": self.ops,
            "masks": {name: mask.cpu() for name, mask in self.masks.items()},
            "events": self.events,
            "original_parameters": self.original_parameters,
            "original_channels": self.original_channels,
            "end_step": self.end_step,  # resolved at the first fit: a resumed run keeps the same schedule
            "frequency": self.frequency,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.fraction, self.ops, self.masks = state_dict["fraction"], list(state_dict["ops"]), state_dict["masks"]
        self.events = list(state_dict["events"])
        self.original_parameters = state_dict["original_parameters"]
        self.original_channels = state_dict["original_channels"]
        self.end_step, self.frequency = state_dict["end_step"], state_dict["frequency"]

    def metrics(self, pl_module: nn.Module) -> dict[str, float]:
        """Sparsity (fraction of parameters removed, or of the masked weights zeroed), parameter count and bytes."""
        params = list(pl_module.parameters())
        count = sum(p.numel() for p in params)
        if self.method == "structured":
            sparsity = 1.0 - count / max(self.original_parameters, 1)
        else:
            weights = [layer.weight for layer in self._layers.values()]
            sparsity = sum(int((w == 0).sum()) for w in weights) / max(sum(w.numel() for w in weights), 1)
        return {"sparsity": sparsity, "parameters": count, "parameter_bytes": sum(p.nbytes for p in params)}

    def summary(self) -> str:
        """One line for the `lowvram` summary."""
        stats = self.last_metrics
        done = f", sparsity {stats['sparsity']:.3f} ({stats['parameters']:,} parameters)" if stats else ""
        return f"{self.method} {self.criterion}, target {self.fraction:.2f}{done}, {len(self.events)} pruning steps"

    # -- pruning ------------------------------------------------------------------------------------------------
    @property
    def _types(self) -> tuple[type[nn.Module], ...]:
        return ROOTS if self.method == "structured" else PRUNABLE

    def _target(self, step: int) -> float:
        if callable(self.schedule):
            value = float(self.schedule(step))
            if not 0.0 <= value < 1.0:
                raise ValueError(f"schedule({step}) returned {value!r}; fractions must be in [0, 1)")
            return value
        assert self.end_step is not None and self.frequency is not None
        return cubic_sparsity(step, self.amount, self.start_step, self.end_step, self.frequency)

    def _prune(self, trainer: L.Trainer, pl_module: L.LightningModule, target: float, event: int) -> None:
        before = self.metrics(pl_module)
        if self.method == "structured":
            relative = 1.0 - (1.0 - target) / (1.0 - self.fraction)
            assert self._example is not None
            inputs, forward = self._example
            now = channels(pl_module)
            ops = prune_structured(
                pl_module,
                relative,
                inputs,
                forward=forward,
                criterion=self.criterion,
                ignore=self.ignore,
                global_pruning=self.scope == "global",
                seed=self.seed + len(self.events),
                ratios=keep_ratios(self.original_channels, now, target),
            )
            self.ops += [{**op, "event": event} for op in ops]
            protected = output_layers(pl_module, inputs, forward)
            self._layers = prunable_layers(pl_module, self.ignore, protected, self._types)
            if trainer.optimizers:  # after setup: the optimizers hold the replaced parameters
                _rebuild_optimizers(trainer)
                self._hook_optimizers(trainer)
        else:
            generator = torch.Generator().manual_seed(self.seed + len(self.events))
            scope = "global" if self.scope == "global" else "layer"
            self.masks = update_masks(
                self._layers, target, self.masks, criterion=self.criterion, scope=scope, generator=generator
            )
            apply_masks(self._layers, self.masks)
        previous = self.fraction
        self.fraction = target
        self.events.append(event)
        stats = self.metrics(pl_module)
        self.last_metrics = stats
        rank_zero_info(
            f"PruningCallback: {self.method} {target:.3f} at step {max(event, 0)}: "
            f"{stats['parameters']:,} parameters, sparsity {stats['sparsity']:.3f}"
        )
        if target > previous and stats["sparsity"] <= before["sparsity"]:
            rank_zero_warn(
                f"PruningCallback: pruning to {target:.3f} at step {max(event, 0)} removed nothing: sparsity stays "
                f"{stats['sparsity']:.3f}, {stats['parameters']:,} parameters before and after (a layer is left "
                "whole when the fraction would remove all of its channels, or all are ignored: use a smaller amount)"
            )

    def _check_structure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A pruning that would break the model is an error now, before any step (the model is left as it was)."""
        assert self._example is not None
        inputs, forward = self._example
        if not check_layouts(pl_module, self.ignore, self.scope == "global"):
            self._dry_run(trainer, pl_module)
        else:
            check_runs(pl_module, self.amount, inputs, forward, self.ignore)  # says so when it cannot check

    def _dry_run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Prune a copy by the dependency graph and run it: a model it would break is an error now, not mid-fit."""
        assert self._example is not None
        inputs, forward = self._example
        trial = copy.deepcopy(pl_module, {id(trainer): None})  # the module's weights, not the trainer
        try:
            prune_structured(trial, self.amount, inputs, forward=forward, criterion=self.criterion, ignore=self.ignore)
            with torch.no_grad():
                (forward or call)(trial, inputs)
        except Exception as exc:  # whatever the pruned copy raises: the user's model is untouched
            raise ValueError(
                f"PruningCallback: structured pruning at amount={self.amount} leaves {type(pl_module).__name__} "
                f"unable to run ({type(exc).__name__}: {exc}). A tensor the dependency graph does not see (a buffer "
                "added to activations, a reshape to a fixed size) keeps its width: ignore=[...] the layers that feed "
                "it, or use method='unstructured'"
            ) from exc
        finally:
            del trial

    def _hook_optimizers(self, trainer: L.Trainer) -> None:
        self._remove_hooks()
        if self.method != "unstructured":
            return

        def after_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            apply_masks(self._layers, self.masks)

        self._hooks = [opt.register_step_post_hook(after_step) for opt in trainer.optimizers]

    def _remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def _wrap_on_load_checkpoint(self, pl_module: L.LightningModule) -> None:
        """Loading a checkpoint: give the module its shapes before Lightning loads the weights (any stage)."""
        if self._undo is not None:
            return

        def on_load_checkpoint(original: Callable[..., None], checkpoint: dict[str, Any]) -> None:
            if checkpoint.get("callbacks", {}).get(self.state_key) is not None:
                conform_to_state_dict(pl_module, checkpoint["state_dict"])
            original(checkpoint)

        self._undo = patch(pl_module, "on_load_checkpoint", on_load_checkpoint, wrap=True)


def _rebuild_optimizers(trainer: L.Trainer) -> None:
    """New optimizers/schedulers for the new parameters; learning rates and schedule positions carried over."""
    groups = [[{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] for opt in trainer.optimizers]
    schedulers = [config.scheduler.state_dict() for config in trainer.lr_scheduler_configs]
    strategy = trainer.strategy
    if trainer.world_size > 1 and hasattr(strategy, "_setup_model"):
        strategy.model = strategy._setup_model(strategy.lightning_module)  # DDP: wrap the new parameters
    strategy.setup_optimizers(trainer)
    for opt, old in zip(trainer.optimizers, groups, strict=True):
        for group, hyper in zip(opt.param_groups, old, strict=True):
            group.update(hyper)
    for config, state in zip(trainer.lr_scheduler_configs, schedulers, strict=True):
        config.scheduler.load_state_dict(state)


def _example_inputs(trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[Any, Forward | None]:
    """What traces the model: ``example_input_array`` through ``forward``, else ``training_step`` on 2 samples."""
    if pl_module.example_input_array is not None:
        return pl_module.example_input_array, None
    batch = None
    source = trainer.fit_loop._data_source
    if source.is_defined():
        loader = source.dataloader()
        batch = next(iter(loader), None) if isinstance(loader, torch.utils.data.DataLoader) else None
    if batch is None:
        raise MisconfigurationException(
            "PruningCallback traces the model by running training_step on the first training batch, and found no "
            "training DataLoader: set `self.example_input_array` in your LightningModule"
        )
    return move_data_to_device(slice_batch(batch, 0, 2), pl_module.device), _training_step


def _training_step(module: nn.Module, batch: Any) -> Any:
    """The module's own ``training_step`` (the class's: not a callback's wrapper), logging silenced; its loss."""
    if not isinstance(module, L.LightningModule):
        return call(module, batch)
    undo = [patch(module, name, lambda original, *a, **k: None, wrap=True) for name in ("log", "log_dict")]
    try:
        output = type(module).training_step(module, batch, 0)
    finally:
        for put_back in reversed(undo):
            put_back()
    loss = output.get("loss") if isinstance(output, dict) else output
    if not isinstance(loss, torch.Tensor):
        raise MisconfigurationException(
            "PruningCallback traces the model through training_step, which returned no loss (manual optimization?): "
            "set `self.example_input_array` in your LightningModule"
        )
    return loss


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
