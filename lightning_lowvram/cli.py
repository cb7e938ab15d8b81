"""The ``lowvram`` command: a Hydra app over the shipped ``conf/`` tree.

``lowvram fit [overrides...]`` composes ``conf/lowvram.yaml``, instantiates the model, data, callbacks and Trainer,
runs the fit (under the chosen GPU's memory, emulated when that GPU is not here) and prints a summary;
``strategy=auto`` lets the planner choose the strategies first. ``lowvram plan gpu=<card>`` prints the plan for the
model and data and writes a PNG chart, without training.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import shlex
import signal
import sys
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from lightning_lowvram._files import check_writable
from lightning_lowvram.callbacks.memory_report import MemoryReportCallback
from lightning_lowvram.hydra_setup import (
    NodeError,
    NothingFitsError,
    auto_options,
    compose_strategies,
    planned_devices,
    trainer_strategy_node,
)
from lightning_lowvram.memory.budget import memory_budget
from lightning_lowvram.memory.meter import memory_table
from lightning_lowvram.memory.profiles import GPUProfile, format_bytes

COMMANDS = ("fit", "plan")


class NothingFits(RuntimeError):
    """Even the smallest setting exceeds the budget: printed as one paragraph of advice, exit status 1."""


class ConfigError(ValueError):
    """Bad configuration, reported as ``lowvram: error: <key>=<value>: <reason>`` before any training starts.

    Args:
        key: The config key at fault (dotted, as on the command line).
        value: Its value.
        reason: Why it was rejected.

    """

    def __init__(self, key: str, value: Any, reason: str) -> None:
        self.key, self.value, self.reason = key, value, reason
        super().__init__(f"{key}={_show(value)}: {reason}")


def _show(value: Any) -> str:
    """A config value as it is written on the command line."""
    if isinstance(value, DictConfig | ListConfig):
        value = OmegaConf.to_container(value, resolve=False)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple):
        return "[" + ",".join(_show(v) for v in value) + "]"
    return str(value)


def _user_overrides() -> list[str]:
    """The command line's overrides (``key=value``), when running as the Hydra app."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def _blame(node: Any, prefix: str, reason: str) -> ConfigError:
    """The error for a rejected node: the argument its reason names (the user's override first), else its target."""
    pick = _blamed_key(node, prefix, reason)
    if pick is not None:
        return ConfigError(f"{prefix}.{pick}", node.get(pick), _drop_key(reason, f"{prefix}.{pick}"))
    group = prefix.split(".")[0]
    choice = next((o.split("=", 1)[1] for o in _user_overrides() if o.lstrip("+").startswith(f"{group}=")), None)
    if choice is not None and prefix == group:
        return ConfigError(group, choice, reason)
    return ConfigError(f"{prefix}._target_", node.get("_target_") if isinstance(node, DictConfig) else None, reason)


def _blamed_key(node: Any, prefix: str, reason: str) -> str | None:
    """The node's key a reason names (one the user overrode first), else the only one the user overrode."""
    keys = [k for k in (node.keys() if isinstance(node, DictConfig) else []) if not str(k).startswith("_")]
    named = [k for k in keys if re.search(rf"(?<!\w){re.escape(str(k))}(?!\w)", reason, re.IGNORECASE)]
    overridden = {o.lstrip("+~").split("=", 1)[0] for o in _user_overrides()}
    given = [k for k in keys if f"{prefix}.{k}" in overridden]
    pick = next((k for k in named if k in given), None) or (named[0] if named else None)
    return given[0] if pick is None and len(given) == 1 and not named else pick


def _drop_key(reason: str, key: str) -> str:
    """``"gpu.memory_gib must be > 0"`` -> ``"must be > 0"`` when the line already names the key."""
    for prefix in (key, key.rsplit(".", 1)[-1]):
        if reason.startswith(prefix + " "):
            return reason[len(prefix) + 1 :]
    return reason


def _reason(err: BaseException) -> str:
    """The first line of what went wrong, without Hydra's "Error in call to target" wrapper."""
    cause = err.__cause__ if err.__cause__ is not None and str(err.__cause__) else err
    lines = [line.strip() for line in str(cause).strip().splitlines() if line.strip()] or [type(cause).__name__]
    text = " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]
    text = re.sub(r"^Error in call to target '[^']*':\s*", "", text)
    if type(cause).__name__ not in ("ValueError", "TypeError", "MisconfigurationException", "InstantiationException"):
        text = f"{type(cause).__name__}: {text}"
    return text


def _instantiate(node: Any, key: str, **kwargs: Any) -> Any:
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    target = node.get("_target_") if isinstance(node, Mapping | DictConfig) else None
    if target is None:
        raise ConfigError(key, _show(node), "a `_target_` is required")
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
    if not is_overridden("training_step", model, L.LightningModule):
        raise ConfigError("model._target_", cfg.model._target_, "has no training_step: `lowvram fit` cannot train it")
    data = _instantiate(cfg.data, "data")
    batch = _first_batch(data) if isinstance(data, L.LightningDataModule) else None  # for the check and the plan
    if batch is not None:
        _check_batch(cfg, model, batch)
    _check_strategy_keys(cfg)
    if trainer_strategy_node(cfg) is not None and cfg.trainer.get("strategy") is not None:
        reason = f"strategy={cfg.strategy.name} sets the Trainer's strategy; drop trainer.strategy"
        raise ConfigError("trainer.strategy", cfg.trainer.strategy, reason)
    callbacks, trainer_kwargs, chosen = _compose(cfg, model, batch, profile)
    _check_frozen_base(cfg, model, callbacks)
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
    extra = []
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


def _compose(
    cfg: DictConfig, model: L.LightningModule, batch: Any, profile: GPUProfile
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
        return compose_strategies(cfg, profile, model, batch, instantiate=_instantiate, plan_only=cfg.command == "plan")
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


def _check_top_level(cfg: DictConfig) -> None:
    """The app's own keys: one line naming the key and value for a wrong type."""
    if cfg.command not in COMMANDS:
        raise ConfigError("command", cfg.command, f"unknown; allowed: {', '.join(COMMANDS)}")
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int):
        raise ConfigError("seed", cfg.seed, "must be an integer")
    for key in ("emulate_gpu", "test_after_fit", "max_context"):
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


def _check_frozen_base(cfg: DictConfig, model: L.LightningModule, callbacks: dict[str, Any]) -> None:
    """A low-bit base needs frozen layers, the chunked loss a HF causal LM: named before training, not at setup."""
    from lightning_lowvram.callbacks.chunked_cross_entropy import ChunkedCrossEntropyCallback
    from lightning_lowvram.callbacks.low_bit_base import LowBitBaseCallback
    from lightning_lowvram.chunked_ce_hf import require_chunkable
    from lightning_lowvram.lowbit import require_frozen_base

    for name, callback in callbacks.items():
        if isinstance(callback, ChunkedCrossEntropyCallback):
            try:
                require_chunkable(model)
            except ValueError as err:
                group = name.partition(".")[0]
                raise ConfigError(group, _choice(cfg, group), f"model={_choice(cfg, 'model')}: {err}") from err
        if isinstance(callback, LowBitBaseCallback):
            try:
                require_frozen_base(model, callback.bits)
            except ValueError as err:
                group = name.partition(".")[0]
                hint = "; this model takes +model.lora_rank=8" if "lora_rank" in model.hparams else ""
                raise ConfigError(group, _choice(cfg, group), f"model={_choice(cfg, 'model')}: {err}{hint}") from err


def _check_batch(cfg: DictConfig, model: L.LightningModule, batch: Any) -> None:
    """The model's training_step on the data's first batch, on fake tensors: a mismatch is named before training."""
    from lightning_lowvram.planner.estimate import check_batch

    try:
        check_batch(model, batch)
    except ValueError as err:
        why = str(err).split(": ", 1)[-1]
        reason = f"its training_step does not take data={_choice(cfg, 'data')}'s batches: {why}"
        raise ConfigError("model", _choice(cfg, "model"), reason) from err


def _choice(cfg: DictConfig, group: str) -> str:
    """The option chosen for a config group (``model=tiny_gpt``), or its target when composed otherwise."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        choice = HydraConfig.get().runtime.choices.get(group)
        if choice:
            return str(choice)
    return str(cfg[group].get("_target_"))


def _run_dir() -> str:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else os.getcwd()


@contextmanager
def _gpu_memory(profile: GPUProfile, trainer: L.Trainer, emulate: bool) -> Iterator[str]:
    """Run under the profile's memory when the profile names a card that is not the local device."""
    device = trainer.strategy.root_device
    detected = profile.name.startswith("cuda:")
    if not emulate or detected or profile.usable_bytes is None:
        yield f"{profile.display_name or profile.name} (no budget)"
        return
    how = "emulated on cpu" if device.type == "cpu" else f"capped allocator on {device}"
    with memory_budget(profile, device=str(device)) if device.type in ("cpu", "cuda") else nullcontext():
        yield f"{profile.name}: {profile.memory_gib} GiB, {how} (budget {format_bytes(profile.usable_bytes)})"


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run ``cfg.command`` (``fit`` or ``plan``) and return the summary as a dict (also printed)."""
    parts = build(cfg)
    if cfg.command == "plan":
        for line in parts["context"] or []:
            print(line)
        return {**_print_plan(parts["plan"]), "max_context": parts["context"]}
    trainer, data = parts["trainer"], parts["data"]
    if isinstance(data, L.LightningDataModule):
        # datasets live in host memory: build them before an emulated device budget starts counting
        data.prepare_data()
        data.setup("fit")
    with _gpu_memory(parts["profile"], trainer, cfg.emulate_gpu) as gpu_line:
        oom = _fit(cfg, parts, gpu_line)
        metrics = _metrics(trainer) if oom is None else {}
        if oom is None and cfg.test_after_fit and _can_test(parts["model"], data) and not trainer.interrupted:
            trainer.test(parts["model"], datamodule=data, verbose=False)  # the summary has the metrics
            metrics.update(_metrics(trainer))
    if oom is not None:  # advice from the planner, outside the budget
        raise NothingFits(_advice(parts, oom)) from oom
    summary = _summary(cfg, parts, gpu_line, metrics)
    if trainer.is_global_zero:  # one summary for a run on several processes (rank 0's metrics and memory)
        print(format_summary(summary))
    return summary


def _fit(cfg: DictConfig, parts: dict[str, Any], gpu_line: str) -> torch.OutOfMemoryError | None:
    """``trainer.fit``; the budget's OOM is returned (for the advice), Ctrl-C prints the summary and how to resume."""
    trainer = parts["trainer"]
    try:
        trainer.fit(parts["model"], datamodule=parts["data"], ckpt_path=_ckpt_path(cfg))
    except torch.OutOfMemoryError as err:
        if "budget" not in gpu_line:
            raise
        return err
    except SystemExit:  # Lightning's answer to Ctrl-C: a graceful shutdown, then exit(1)
        if trainer.interrupted:
            signal.signal(signal.SIGINT, signal.default_int_handler)  # Lightning ignores further Ctrl-C
            print(format_summary(_summary(cfg, parts, gpu_line, _metrics(trainer))))
            print(_resume_line(trainer))
        raise
    return None


def _metrics(trainer: L.Trainer) -> dict[str, float]:
    return {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}


def _resume_line(trainer: L.Trainer) -> str:
    """Where an interrupted run's checkpoint is and the command that resumes it."""
    saved = [p for p in Path(trainer.default_root_dir).glob("**/*.ckpt") if p.is_file()]
    if not saved:
        return "interrupted before any checkpoint was written: nothing to resume from"
    newest = max(saved, key=lambda p: p.stat().st_mtime)
    kept = [o for o in _user_overrides() if not o.startswith("ckpt_path=")]
    command = shlex.join(
        ["lowvram", "fit", *kept, f"ckpt_path='{newest}'" if "=" in str(newest) else f"ckpt_path={newest}"]
    )
    return f"interrupted: last checkpoint {newest}\n  resume: {command}"


def _advice(parts: dict[str, Any], err: BaseException) -> str:
    """One paragraph for a fit that ran out of the budget: the budget, what did not fit, what to try next."""
    profile: GPUProfile = parts["profile"]
    lines = [
        f"out of memory on {profile.name} (budget {format_bytes(profile.usable_bytes)} for tensors): "
        + str(err).splitlines()[0].split(". Next:")[0]
    ]
    data = parts["data"]
    if isinstance(data, L.LightningDataModule):
        try:
            from lightning_lowvram.planner import plan

            chosen = plan(copy.deepcopy(parts["model"]), _first_batch(data), profile)
        except Exception:  # the advice is best effort: the OOM is the error  # noqa: BLE001
            chosen = None
        if chosen is not None and chosen.chosen is None:
            lines.append(f"The planner agrees: {chosen.nothing_fits()}.")
        elif chosen is not None:
            lines.append(f"The planner predicts that {chosen.chosen.label} fits: run `lowvram fit strategy=auto ...`.")
    lines.append("Try next: a larger card or more free memory (gpu.free_gib), a smaller batch (data.batch_size), "
                 "or strategy=auto to let the planner choose.")  # fmt: skip
    return " ".join(lines)


def _print_plan(chosen: Any) -> dict[str, Any]:
    from lightning_lowvram.planner.chart import chart

    path = chart(chosen, os.path.join(_run_dir(), "plan.png"))
    print(chosen.table())
    if chosen.chosen is not None:
        devices = f" trainer.devices={chosen.devices}" if chosen.devices > 1 else ""
        print(
            f"  apply it: lowvram fit strategy=auto gpu=...{devices} , or these overrides: "
            + " ".join(chosen.overrides())
        )
    print(f"  chart: {path}")
    return {"plan": chosen, "chart": path}


def _can_test(model: L.LightningModule, data: Any) -> bool:
    from lightning.pytorch.utilities.model_helpers import is_overridden

    return is_overridden("test_step", model, L.LightningModule) and is_overridden(
        "test_dataloader", data, L.LightningDataModule
    )


def _summary(cfg: DictConfig, parts: dict[str, Any], gpu_line: str, metrics: dict[str, float]) -> dict[str, Any]:
    trainer: L.Trainer = parts["trainer"]
    loader_batch = getattr(trainer.train_dataloader, "batch_size", None) or getattr(parts["data"], "batch_size", None)
    accumulate, world = trainer.accumulate_grad_batches, trainer.world_size
    effective = loader_batch * accumulate * world if loader_batch else None
    strategy_lines: list[str] = []
    details: list[str] = []  # multi-line summaries (tables) of strategy callbacks
    for name, callback in parts["callbacks"].items():
        if name.startswith("strategy."):
            extra = callback.summary() if hasattr(callback, "summary") else ""
            if "\n" in extra:
                details.append(extra)
                extra = ""
            strategy_lines.append(f"{type(callback).__name__}{f' ({extra})' if extra else ''}")
    from lightning_lowvram.fsdp2 import FSDP2Strategy

    if isinstance(trainer.strategy, FSDP2Strategy):  # the Trainer's own strategy, from strategy=fsdp2 or a plan
        s = trainer.strategy
        offload = ", CPU offload" if s.cpu_offload else ""
        reshard = {None: "", True: ", resharded after forward", False: ", kept to backward"}[s.reshard_after_forward]
        strategy_lines.insert(0, f"FSDP2Strategy ({trainer.world_size} rank(s){reshard}{offload})")
    elif trainer.world_size > 1:  # DDP and the like: the state is not sharded
        strategy_lines.insert(0, f"{type(trainer.strategy).__name__} ({trainer.world_size} ranks)")
    reports = next((c.reports for c in parts["callbacks"].values() if isinstance(c, MemoryReportCallback)), {})
    return {
        "model": cfg.model._target_,
        "parameters": sum(p.numel() for p in parts["model"].parameters()),
        "gpu": gpu_line,
        "effective_batch": effective,
        "effective_batch_formula": f"{loader_batch} per batch x {accumulate} accumulation x {world} device(s)",
        "strategies": strategy_lines or ["none"],
        "details": details,
        "metrics": dict(sorted(metrics.items())),
        "memory": reports,
        "run_dir": str(trainer.default_root_dir),
        "checkpoints": sorted(
            {str(p) for p in Path(trainer.default_root_dir).glob("**/*.ckpt") if p.is_file()},
        ),
    }


def format_summary(summary: dict[str, Any]) -> str:
    """The end-of-run summary as text."""
    lines = [
        "lowvram summary",
        f"  model            {summary['model']} ({summary['parameters']:,} parameters)",
        f"  gpu              {summary['gpu']}",
        f"  effective batch  {summary['effective_batch']} = {summary['effective_batch_formula']}",
        f"  strategies       {', '.join(summary['strategies'])}",
        "  metrics          " + ", ".join(f"{k} {v:.4g}" for k, v in summary["metrics"].items()),
    ]
    for detail in summary.get("details", []):
        lines += ["  " + line for line in detail.splitlines()]
    if summary["memory"]:
        lines += ["  peak memory by stage and category:"]
        lines += ["    " + line for line in memory_table(summary["memory"]).splitlines()]
    if summary.get("run_dir"):
        lines.append(f"  run directory    {summary['run_dir']}")
        checkpoints = summary.get("checkpoints") or ["none (trainer.enable_checkpointing=false)"]
        lines += [f"  checkpoint       {path}" for path in checkpoints]
    return "\n".join(lines)


# Lightning's informational lines the CLI drops (its summary says what matters); the library leaves them alone
_NOISE = (
    "GPU available",
    "TPU available",
    "HPU available",
    "Seed set to",
    "💡 Tip",
    "`Trainer.fit` stopped",
    "LowBitBaseCallback: ",  # this line and the next: the summary's strategies line says the same
    "ActivationCheckpointingCallback: ",
)
_NOISY_WARNINGS = (
    r"`\.fit\(ckpt_path=None\)` was called",  # OnExceptionCheckpoint makes Lightning look for a checkpoint to resume
    r"\.fit\(ckpt_path=\"last\"\) is set, but there is no last checkpoint",
    r"Starting from v1\.9\.0, `tensorboardX` has been removed",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).lstrip().startswith(_NOISE)


def _quiet_lightning() -> None:
    """Lightning's tips and banners off, each other warning once: in the app only."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.seed",
                 "lightning.fabric.utilities.rank_zero", "lightning.pytorch.accelerators.cuda"):  # fmt: skip
        logging.getLogger(name).addFilter(_DropNoise())
    warnings.filterwarnings("once", category=UserWarning)
    for pattern in _NOISY_WARNINGS:  # inserted before "once": they win
        warnings.filterwarnings("ignore", message=pattern)


def _hydra_main(cfg: DictConfig) -> None:
    _quiet_lightning()
    try:
        run(cfg)
    except ConfigError as err:
        print(f"lowvram: error: {err}", file=sys.stderr)
        sys.exit(2)
    except NothingFits as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"lowvram: {err}", file=sys.stderr)
        sys.exit(1)


def _check_gpu_choice(overrides: list[str]) -> str | None:
    """One line for an unknown `gpu=<name>` (Hydra's own message spans many), unless a search path adds configs."""
    from lightning_lowvram.memory.profiles import known_gpus

    if any(o.lstrip("+~").startswith("hydra.searchpath") for o in overrides):
        return None
    for override in overrides:
        if override.startswith("gpu="):
            name = override.split("=", 1)[1]
            if name not in known_gpus():
                return f"gpu={name}: not a known GPU profile; known: {', '.join(known_gpus())}"
    return None


def _composition_error(overrides: list[str]) -> str | None:
    """Compose once before Hydra's app does, so an override Hydra rejects is one line naming it (Hydra exits 1)."""
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException

    if any(o.startswith("-") for o in overrides) or any(o.lstrip("+~").startswith("hydra") for o in overrides):
        return None  # Hydra's own flags and settings: let Hydra handle them
    try:
        with initialize_config_module("lightning_lowvram.conf", version_base="1.3"):
            compose("lowvram", overrides=overrides)
    except HydraException as err:
        return _override_error(overrides, err)
    return None


def _override_error(overrides: list[str], err: Exception) -> str:
    """Hydra's composition error as one line naming the override at fault."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = "; ".join(line for line in lines if not line.startswith("See https://")) or type(err).__name__
    unparsable = []
    for override in overrides:
        try:
            OverridesParser.create().parse_overrides([override])
        except HydraException:
            unparsable.append(override)
    if unparsable:
        return f"{unparsable[0]}: not a valid override ({text}); quote a value with '=' or spaces: key='value'"
    keys = [(o, o.lstrip("+~").split("=", 1)[0]) for o in overrides]
    quoted = next((o for o, k in keys if k and f"'{k}'" in text), None)
    culprit = quoted or next((o for o, k in keys if k in text), None)
    return f"{culprit}: {text}" if culprit else text


def main(argv: list[str] | None = None) -> None:
    """Console entry point: ``lowvram <command> [hydra overrides...]``."""
    import hydra

    args = list(sys.argv[1:] if argv is None else argv)
    overrides = args
    if args and not args[0].startswith("-") and "=" not in args[0]:
        if args[0] not in COMMANDS:
            print(f"lowvram: error: unknown command {args[0]!r}; allowed: {', '.join(COMMANDS)}", file=sys.stderr)
            sys.exit(2)
        overrides = [*args[1:], f"command={args[0]}"]  # last, so Hydra flags (`--cfg job`) may come first
    error = _check_gpu_choice(overrides)
    if error:
        print(f"lowvram: error: {error}", file=sys.stderr)
        sys.exit(2)
    error = _composition_error(overrides)
    if error:
        print(f"lowvram: error: {error}", file=sys.stderr)
        sys.exit(2)
    sys.argv = [sys.argv[0], *overrides]
    app = hydra.main(config_path="pkg://lightning_lowvram.conf", config_name="lowvram", version_base="1.3")
    app(_hydra_main)()


if __name__ == "__main__":
    main()
