"""The checks ``lowvram`` makes before anything runs: the app's keys, ``strategy``'s, the model against its data."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig

from lightning_lowvram.cli.errors import ConfigError, _user_overrides
from lightning_lowvram.hydra_setup import (
    auto_options,
)

COMMANDS = ("fit", "plan", "validate", "test", "predict")
STAGES = ("fit", "validate", "test", "predict")


def _check_top_level(cfg: DictConfig) -> None:
    """The app's own keys: one line naming the key and value for a wrong type."""
    if cfg.command not in COMMANDS:
        raise ConfigError("command", cfg.command, f"unknown; allowed: {', '.join(COMMANDS)}")
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int):
        raise ConfigError("seed", cfg.seed, "must be an integer")
    if cfg.get("stage", "fit") not in STAGES:
        raise ConfigError("stage", cfg.get("stage"), f"unknown; allowed: {', '.join(STAGES)}")
    if cfg.get("stage", "fit") != "fit" and cfg.command != "plan":
        raise ConfigError("stage", cfg.stage, f"is for `lowvram plan`; run the stage itself: `lowvram {cfg.stage}`")
    for key in ("emulate_gpu", "test_after_fit", "max_context", "summary_json"):
        if not isinstance(cfg.get(key), bool):
            raise ConfigError(key, cfg.get(key), "must be true or false")
    ckpt = cfg.get("ckpt_path")
    if ckpt is not None and ckpt != "last" and not os.path.isfile(str(ckpt)):
        raise ConfigError("ckpt_path", ckpt, "no such checkpoint file (give a .ckpt file, or `last`)")
    if ckpt == "last" and _last_checkpoint() is None:
        raise ConfigError("ckpt_path", ckpt, f"no checkpoint (*.ckpt) of an earlier run under {_runs_root()}")


def _runs_root() -> Path:
    """Where earlier runs are: Hydra's ``outputs/`` (run directories are ``outputs/<date>/<time>``), else the cwd."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir).parents[1]
    return Path.cwd()


def _last_checkpoint() -> Path | None:
    """The newest checkpoint of an earlier run (``ckpt_path=last``)."""
    found = [p for p in _runs_root().glob("**/*.ckpt") if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def _ckpt_path(cfg: DictConfig) -> str | None:
    ckpt = cfg.get("ckpt_path")
    return str(_last_checkpoint()) if ckpt == "last" else ckpt


def _check_strategy_keys(cfg: DictConfig) -> None:
    """``strategy``'s own keys: ``auto`` alone, no unknown key, the auto switches' types."""
    options = auto_options()
    auto = cfg.strategy.get("name") == "auto"
    nodes = [k for k, v in cfg.strategy.items() if isinstance(v, DictConfig) and "_target_" in v]
    if (auto and nodes) or (not auto and any(k in cfg.strategy for k in options)):
        given = next((o.partition("=")[2] for o in _user_overrides() if o.startswith("strategy=")), None)
        reason = (
            "auto stands alone: it picks its own mix (strategy.allow_low_bit_base=true lets it store a frozen base in "
            "4 bits); combine the others, e.g. strategy=[lora_4bit,micro_batch,checkpointing]"
        )
        raise ConfigError("strategy", given or f"[auto, {', '.join(nodes)}]", reason)
    allowed = ["name", *options] if auto else ["name"]
    unknown = [k for k, v in cfg.strategy.items() if k not in allowed and not _is_node(v)]
    if unknown:
        takes = ", ".join([*allowed, *(k for k, v in cfg.strategy.items() if isinstance(v, DictConfig))])
        reason = f"unknown key for strategy={cfg.strategy.name}; it takes {takes}"
        raise ConfigError(f"strategy.{unknown[0]}", cfg.strategy[unknown[0]], reason)
    if auto:
        _check_auto_values(cfg.strategy, options)


def _is_node(value: Any) -> bool:
    return isinstance(value, DictConfig) and "_target_" in value


def _check_auto_values(strategy: DictConfig, options: dict[str, Any]) -> None:
    margin = strategy.get("margin", 0.1)
    if isinstance(margin, bool) or not isinstance(margin, int | float) or not 0 <= margin < 1:
        raise ConfigError("strategy.margin", margin, "must be a number in [0, 1) (a fraction of the card)")
    for key in [k for k in options if k.startswith("allow_")]:
        if not isinstance(strategy.get(key, False), bool):
            raise ConfigError(f"strategy.{key}", strategy.get(key), "must be true or false")


def _check_requirements(cfg: DictConfig, model: L.LightningModule, callbacks: dict[str, Any]) -> None:
    """What each strategy requires of the model (``Strategy.requires``), named before training, not at setup.

    A low-bit base needs frozen layers, the chunked loss a HF causal LM.
    """
    from lightning_lowvram.registry import by_target

    declared = by_target()
    for name, callback in callbacks.items():
        strategy = declared.get(type(callback))
        if strategy is None or strategy.requires is None:
            continue
        try:
            strategy.requires(model, callback)
        except ValueError as err:
            group = name.partition(".")[0]
            hint = (
                "; this model takes +model.lora_rank=8"
                if strategy.name == "low_bit_base" and "lora_rank" in model.hparams
                else ""
            )
            raise ConfigError(group, _choice(cfg, group), f"model={_choice(cfg, 'model')}: {err}{hint}") from err


def _check_batch(cfg: DictConfig, model: L.LightningModule, batch: Any) -> None:
    """The model's training_step on the data's first batch, on fake tensors: a mismatch is named before training."""
    from lightning_lowvram.planner.estimate import check_batch

    _check_vocabulary(cfg, model, batch)
    try:
        check_batch(model, batch)
    except ValueError as err:
        why = str(err).split(": ", 1)[-1]
        reason = f"its training_step does not take data={_choice(cfg, 'data')}'s batches: {why}"
        raise ConfigError("model", _choice(cfg, "model"), reason) from err


def _check_vocabulary(cfg: DictConfig, model: L.LightningModule, batch: Any) -> None:
    """Token ids the model has no embedding for (a tokenizer larger than a random-init config's vocabulary)."""
    vocab = model.vocab_size() if callable(getattr(model, "vocab_size", None)) else None
    ids = batch.get("input_ids") if isinstance(batch, dict) else None
    if vocab is None or ids is None or not ids.numel() or int(ids.max()) < vocab:
        return
    reason = (
        f"its tokenizer gives token ids up to {int(ids.max())}, but the model's vocabulary has {vocab}: give the model "
        f"vocab_size > {int(ids.max())} (model.config) or data.tokenizer of the model's own"
    )
    raise ConfigError("data.tokenizer", cfg.data.get("tokenizer"), reason)


def _choice(cfg: DictConfig, group: str) -> str:
    """The option chosen for a config group (``model=tiny_gpt``), or its target when composed otherwise."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        choice = HydraConfig.get().runtime.choices.get(group)
        if choice:
            return str(choice)
    return str(cfg[group].get("_target_"))
