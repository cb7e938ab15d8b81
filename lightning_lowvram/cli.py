"""The ``lowvram`` command: a Hydra app over the shipped ``conf/`` tree.

``lowvram fit [overrides...]`` composes ``conf/lowvram.yaml``, instantiates the model, data, callbacks and Trainer,
runs the fit (under the chosen GPU's memory, emulated when that GPU is not here) and prints a summary;
``strategy=auto`` lets the planner choose the strategies first. ``lowvram plan gpu=<card>`` prints the plan for the
model and data and writes a PNG chart, without training.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf

from lightning_lowvram.callbacks.from_plan import plan_callbacks
from lightning_lowvram.callbacks.memory_report import MemoryReportCallback
from lightning_lowvram.memory.budget import memory_budget
from lightning_lowvram.memory.meter import memory_table
from lightning_lowvram.memory.profiles import GPUProfile, format_bytes

COMMANDS = ("fit", "plan")


class ConfigError(ValueError):
    """Bad configuration, reported as one line naming the key and value before any training starts."""


def _instantiate(node: Any, key: str, **kwargs: Any) -> Any:
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    target = node.get("_target_") if isinstance(node, Mapping | DictConfig) else None
    if target is None:
        raise ConfigError(f"{key}: a `_target_` is required")
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        # Hydra's first line only names the target; the reason (a constructor's ValueError...) is its cause
        cause = str(err).splitlines()[0]
        if err.__cause__ is not None and str(err.__cause__):
            cause += f" {type(err.__cause__).__name__}: {str(err.__cause__).splitlines()[0]}"
        raise ConfigError(f"{key}._target_={target!r} could not be instantiated: {cause}") from err


def _callback_nodes(cfg: DictConfig) -> Iterator[tuple[str, Any]]:
    for group in ("callbacks", "strategy"):
        for name, node in (cfg.get(group) or {}).items():
            if isinstance(node, DictConfig) and "_target_" in node:
                yield f"{group}.{name}", node


def build(cfg: DictConfig) -> dict[str, Any]:
    """Instantiate everything ``cfg`` names and check it, before anything runs.

    Returns:
        ``profile``, ``model``, ``data``, ``callbacks`` (name -> callback) and ``trainer``.

    Raises:
        ConfigError: For an unknown command, a bad GPU profile, a ``_target_`` that does not resolve, or a model that
            cannot be trained.

    """
    from lightning.pytorch.utilities.model_helpers import is_overridden

    if cfg.command not in COMMANDS:
        raise ConfigError(f"command={cfg.command!r} is unknown; allowed: {', '.join(COMMANDS)}")
    try:
        profile = GPUProfile.from_config(OmegaConf.to_container(cfg.gpu, resolve=True))
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err).splitlines()[0]) from err
    model = _instantiate(cfg.model, "model")
    if not isinstance(model, L.LightningModule):
        raise ConfigError(f"model._target_={cfg.model._target_!r} is a {type(model).__name__}, not a LightningModule")
    if not is_overridden("training_step", model, L.LightningModule):
        raise ConfigError(f"model._target_={cfg.model._target_!r} has no training_step: `lowvram fit` cannot train it")
    data = _instantiate(cfg.data, "data")
    callbacks = {name: _instantiate(node, name) for name, node in _callback_nodes(cfg)}
    trainer_kwargs: dict[str, Any] = {}
    chosen = None
    auto = cfg.strategy.get("name") == "auto" and profile.usable_bytes is not None  # no card, no limit: plain
    if cfg.command == "plan" or auto:
        margin, allow_int8 = float(cfg.strategy.get("margin", 0.1)), bool(cfg.strategy.get("allow_int8_base", False))
        chosen = _plan(model, data, profile, margin, allow_int8)
        if cfg.command == "fit":
            if chosen.chosen is None:
                raise ConfigError(f"strategy=auto: nothing fits {profile.name}\n{chosen.table()}")
            callbacks.update({f"strategy.{type(c).__name__}": c for c in plan_callbacks(chosen)})
            trainer_kwargs.update(chosen.trainer_kwargs())
    trainer_kwargs["callbacks"] = list(callbacks.values())
    if cfg.trainer.get("default_root_dir") is None:
        trainer_kwargs["default_root_dir"] = _run_dir()
    trainer = _instantiate(cfg.trainer, "trainer", **trainer_kwargs)
    return {
        "profile": profile,
        "model": model,
        "data": data,
        "callbacks": callbacks,
        "trainer": trainer,
        "plan": chosen,
    }


def _plan(model: L.LightningModule, data: Any, profile: GPUProfile, margin: float, allow_int8_base: bool) -> Any:
    from lightning_lowvram.planner import plan

    if profile.usable_bytes is None:
        raise ConfigError(f"gpu={profile.name!r} has no memory size to plan for; pick a card, e.g. gpu=rtx3060_12gb")
    if not isinstance(data, L.LightningDataModule):
        raise ConfigError("planning needs data._target_ to be a LightningDataModule (its first training batch)")
    data.prepare_data()
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    try:
        return plan(model, batch, profile, margin=margin, allow_int8_base=allow_int8_base)
    except ValueError as err:
        raise ConfigError(str(err).splitlines()[0]) from err


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
    L.seed_everything(cfg.seed, workers=True)
    parts = build(cfg)
    if cfg.command == "plan":
        return _print_plan(parts["plan"])
    trainer, model, data = parts["trainer"], parts["model"], parts["data"]
    if isinstance(data, L.LightningDataModule):
        # datasets live in host memory: build them before an emulated device budget starts counting
        data.prepare_data()
        data.setup("fit")
    with _gpu_memory(parts["profile"], trainer, cfg.emulate_gpu) as gpu_line:
        trainer.fit(model, datamodule=data)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        if cfg.test_after_fit and _can_test(model, data):
            trainer.test(model, datamodule=data)
            metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1})
    summary = _summary(cfg, parts, gpu_line, metrics)
    print(format_summary(summary))
    return summary


def _print_plan(chosen: Any) -> dict[str, Any]:
    from lightning_lowvram.planner.chart import chart

    path = chart(chosen, os.path.join(_run_dir(), "plan.png"))
    print(chosen.table())
    if chosen.chosen is not None:
        print("  apply it: lowvram fit strategy=auto gpu=... , or these overrides: " + " ".join(chosen.overrides()))
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
    return "\n".join(lines)


def _hydra_main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except ConfigError as err:
        print(f"lowvram: error: {err}", file=sys.stderr)
        sys.exit(2)


def _check_gpu_choice(overrides: list[str]) -> str | None:
    """One line for an unknown `gpu=<name>` (Hydra's own message spans many), unless a search path adds configs."""
    from lightning_lowvram.memory.profiles import known_gpus

    if any(o.lstrip("+~").startswith("hydra.searchpath") for o in overrides):
        return None
    for override in overrides:
        if override.startswith("gpu="):
            name = override.split("=", 1)[1]
            if name not in known_gpus():
                return f"gpu={name!r} is not a known GPU profile; known: {', '.join(known_gpus())}"
    return None


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
    sys.argv = [sys.argv[0], *overrides]
    app = hydra.main(config_path="pkg://lightning_lowvram.conf", config_name="lowvram", version_base="1.3")
    app(_hydra_main)()


if __name__ == "__main__":
    main()
