"""Build what a config names (model, data, callbacks, Trainer, plan), checked, before anything runs."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf, open_dict

from lightning_lowvram._files import check_writable
from lightning_lowvram.cli.checks import _check_batch, _check_requirements, _check_strategy_keys, _check_top_level
from lightning_lowvram.cli.errors import ConfigError, NothingFits, _blame, _reason
from lightning_lowvram.cli.evaluate import EVAL_COMMANDS, check_eval_model, eval_loader, restore_structure
from lightning_lowvram.hydra_setup import (
    NodeError,
    NothingFitsError,
    compose_strategies,
    planned_devices,
    show,
    trainer_strategy_node,
)
from lightning_lowvram.memory.profiles import GPUProfile


def _instantiate(node: Any, key: str, **kwargs: Any) -> Any:
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    target = node.get("_target_") if isinstance(node, Mapping | DictConfig) else None
    if target is None:
        raise ConfigError(key, show(node), "a `_target_` is required")
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        raise _blame(node, key, _reason(err)) from err


def build(cfg: DictConfig) -> dict[str, Any]:
    """Instantiate everything ``cfg`` names and check it, before anything runs.

    Returns:
        ``profile``, ``model``, ``data``, ``callbacks`` (name -> callback) and ``trainer``.

    Raises:
        ConfigError: For an unknown command, a bad GPU profile, a ``_target_`` that does not resolve, or a model that
            cannot be trained.

    """
    from lightning.pytorch.utilities.model_helpers import is_overridden

    _check_top_level(cfg)
    L.seed_everything(cfg.seed, workers=True)  # the model is built seeded
    try:
        profile = GPUProfile.from_config(OmegaConf.to_container(cfg.gpu, resolve=True))
    except (TypeError, ValueError) as err:
        raise _blame(cfg.gpu, "gpu", str(err).splitlines()[0]) from err
    model = _instantiate(cfg.model, "model")
    if not isinstance(model, L.LightningModule):
        raise ConfigError("model._target_", cfg.model._target_, f"a {type(model).__name__}, not a LightningModule")
    stage = stage_of(cfg)
    if cfg.command in EVAL_COMMANDS:
        check_eval_model(cfg, model)
    elif not is_overridden("training_step", model, L.LightningModule):
        raise ConfigError("model._target_", cfg.model._target_, "has no training_step: `lowvram fit` cannot train it")
    data = _instantiate(cfg.data, "data")
    loader = None
    if stage != "fit" and isinstance(data, L.LightningDataModule):
        loader, source = eval_loader(cfg if cfg.command != "plan" else _with_command(cfg, stage), data)
        if stage == "predict" and source != "predict_dataloader":
            print(f"lowvram: predict on the data's {source} (it has no predict_dataloader)")
        batch = next(iter(loader))
    else:
        batch = _first_batch(data) if isinstance(data, L.LightningDataModule) else None  # for the check and the plan
        if batch is not None:
            _check_batch(cfg, model, batch)
    _check_strategy_keys(cfg)
    if trainer_strategy_node(cfg) is not None and cfg.trainer.get("strategy") is not None:
        reason = f"strategy={cfg.strategy.name} sets the Trainer's strategy; drop trainer.strategy"
        raise ConfigError("trainer.strategy", cfg.trainer.strategy, reason)
    callbacks, trainer_kwargs, chosen = _compose(cfg, model, batch, profile, stage)
    if stage != "fit" and any(type(c).__name__ == "LowBitBaseCallback" for c in callbacks.values()):
        model.requires_grad_(False)  # evaluation trains nothing: every Linear layer is the frozen base to store
    restored = restore_structure(cfg, model, callbacks) if cfg.command in EVAL_COMMANDS else []
    _check_requirements(cfg, model, callbacks)
    for callback in callbacks.values():
        if hasattr(callback, "print_table"):
            callback.print_table = False  # the summary prints each table once
    context = _max_context(cfg, model, batch, profile) if cfg.command == "plan" and cfg.max_context else None
    root = cfg.trainer.get("default_root_dir") or _run_dir()
    try:  # checkpoints, logs and the plan's chart go here: refuse a path that cannot hold them before any work
        check_writable(Path(root) / "checkpoints" / "x.ckpt", "the run directory")
    except ValueError as err:
        raise ConfigError("trainer.default_root_dir", root, str(err)) from err
    trainer_kwargs["default_root_dir"] = root
    from lightning.pytorch.callbacks import Timer

    timer = Timer()  # the summary's measured time per optimizer step
    extra: list[Any] = [timer] if cfg.command == "fit" else []
    if cfg.command == "fit" and cfg.trainer.get("enable_checkpointing", True):
        from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint, OnExceptionCheckpoint

        if not any(isinstance(c, Checkpoint) for c in callbacks.values()):
            extra.append(ModelCheckpoint())  # Lightning's default, which any Checkpoint callback would replace
        # Ctrl-C (or any error) mid-run leaves a checkpoint to resume from (`ckpt_path=...`)
        extra.append(OnExceptionCheckpoint(os.path.join(root, "checkpoints"), filename="interrupted"))
    trainer_kwargs["callbacks"] = [*callbacks.values(), *extra]
    trainer = _instantiate(cfg.trainer, "trainer", **trainer_kwargs)
    if trainer.accumulate_grad_batches < 1:
        raise ConfigError("trainer.accumulate_grad_batches", trainer.accumulate_grad_batches, "must be an integer >= 1")
    return {
        "profile": profile,
        "model": model,
        "data": data,
        "callbacks": callbacks,
        "trainer": trainer,
        "plan": chosen,
        "context": context,
        "timer": timer,
        "stage": stage,
        "eval_loader": loader,
        "restored": restored,
    }


def _max_context(cfg: DictConfig, model: L.LightningModule, batch: Any, profile: GPUProfile) -> list[str]:
    """The longest sequence and the largest batch that fit the card with the smallest settings, as report lines."""
    from lightning_lowvram.planner.context import frugal_settings, longest_sequence

    settings = frugal_settings(model, profile)
    margin = cfg.strategy.get("margin", 0.1)
    try:
        tokens = longest_sequence(model, batch, profile, margin=margin, **settings)
        samples = longest_sequence(model, batch, profile, margin=margin, dim=0, step=1, **settings)
    except ValueError as err:
        raise ConfigError("max_context", cfg.max_context, str(err).splitlines()[0]) from err
    return [
        f"longest sequence that fits {profile.name} ({tokens.setting}, batch as given): {tokens.tokens} tokens",
        f"largest batch at the example's sequence: {samples.tokens} samples",
    ]


def stage_of(cfg: DictConfig) -> str:
    """The stage a command runs or plans: ``fit``, or ``validate``/``test``/``predict`` (``lowvram plan stage=...``)."""
    return cfg.command if cfg.command in EVAL_COMMANDS else cfg.get("stage", "fit") if cfg.command == "plan" else "fit"


def _with_command(cfg: DictConfig, command: str) -> DictConfig:
    copied = cfg.copy()
    with open_dict(copied):
        copied.command = command
    return copied


def _compose(
    cfg: DictConfig, model: L.LightningModule, batch: Any, profile: GPUProfile, stage: str = "fit"
) -> tuple[dict[str, Any], dict[str, Any], Any]:
    """``hydra_setup.compose_strategies`` (the one composition path), its errors as one line naming the key."""
    planning = cfg.command == "plan" or (cfg.strategy.get("name") == "auto" and profile.usable_bytes is not None)
    if planning and profile.usable_bytes is None:
        raise ConfigError("gpu", cfg.gpu.name, "has no memory size to plan for; pick a card, e.g. gpu=rtx3060_12gb")
    if planning and batch is None:
        raise ConfigError("data._target_", cfg.data._target_, "planning needs a LightningDataModule (its first batch)")
    try:
        if planning:
            planned_devices(cfg)
    except ValueError as err:
        raise ConfigError("trainer.devices", cfg.trainer.get("devices"), str(err).split(": ", 1)[1]) from err
    try:
        return compose_strategies(
            cfg, profile, model, batch, instantiate=_instantiate, plan_only=cfg.command == "plan", stage=stage
        )
    except ConfigError:
        raise
    except NodeError as err:
        raise ConfigError(err.key, err.value, err.reason) from err
    except NothingFitsError as err:
        raise NothingFits(str(err)) from err
    except ValueError as err:  # the planner refused its options
        raise _blame(cfg.strategy, "strategy", str(err).splitlines()[0]) from err


def _first_batch(data: L.LightningDataModule) -> Any:
    data.prepare_data()
    data.setup("fit")
    return next(iter(data.train_dataloader()))


def _run_dir() -> str:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else os.getcwd()
