"""Run a built config: the fit under the card's memory, the test, the summary, the plan's printout."""

from __future__ import annotations

import copy
import logging
import os
import shlex
import signal
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig

from lightning_lowvram.callbacks.memory_report import MemoryReportCallback
from lightning_lowvram.cli.build import _first_batch, _run_dir, build
from lightning_lowvram.cli.checks import _ckpt_path
from lightning_lowvram.cli.errors import ConfigError, NothingFits, _user_overrides
from lightning_lowvram.memory.budget import memory_budget
from lightning_lowvram.memory.meter import memory_table
from lightning_lowvram.memory.profiles import GPUProfile, format_bytes


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
    """Run ``cfg.command`` (fit, plan, validate, test, predict); return the summary as a dict (also printed)."""
    parts = build(cfg)
    if cfg.command == "plan":
        for line in parts["context"] or []:
            print(line)
        return {**_print_plan(parts["plan"]), "max_context": parts["context"]}
    trainer, data = parts["trainer"], parts["data"]
    if isinstance(data, L.LightningDataModule) and cfg.command == "fit":
        # datasets live in host memory: build them before an emulated device budget starts counting
        data.prepare_data()
        data.setup("fit")
    evaluated: dict[str, Any] = {}
    with _gpu_memory(parts["profile"], trainer, cfg.emulate_gpu) as gpu_line:
        if cfg.command == "fit":
            oom = _fit(cfg, parts, gpu_line)
        else:
            oom, evaluated = _evaluate(cfg, parts, gpu_line)
        metrics = _metrics(trainer) if oom is None else {}
        testing = cfg.command == "fit" and cfg.test_after_fit and _can_test(parts["model"], data)
        if oom is None and testing and not trainer.interrupted:
            trainer.test(parts["model"], datamodule=data, verbose=False)  # the summary has the metrics
            metrics.update(_metrics(trainer))
    if oom is not None:  # advice from the planner, outside the budget
        raise NothingFits(_advice(parts, oom) if cfg.command == "fit" else _eval_advice(parts, oom)) from oom
    summary = {**_summary(cfg, parts, gpu_line, metrics), **evaluated}
    if trainer.is_global_zero:  # one summary for a run on several processes (rank 0's metrics and memory)
        print(format_summary(summary))
        if cfg.get("summary_json", True):
            path = Path(trainer.default_root_dir) / "summary.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(summary_json(summary))
            print(f"  summary as JSON  {path}")
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


def _evaluate(
    cfg: DictConfig, parts: dict[str, Any], gpu_line: str
) -> tuple[torch.OutOfMemoryError | None, dict[str, Any]]:
    """The evaluation stage (:mod:`.evaluate`): its OOM under the budget is returned, for the advice."""
    from lightning_lowvram.cli.evaluate import evaluate

    try:
        return None, evaluate(cfg, parts)
    except torch.OutOfMemoryError as err:
        if "budget" not in gpu_line:
            raise
        return err, {}


def _eval_advice(parts: dict[str, Any], err: BaseException) -> str:
    profile: GPUProfile = parts["profile"]
    stage = parts["stage"]
    return (
        f"out of memory on {profile.name} (budget {format_bytes(profile.usable_bytes)} for tensors) in {stage}: "
        + str(err).splitlines()[0]
        + f". Try next: strategy=auto (the planner streams weights, splits the batch), `lowvram plan stage={stage}` "
        "to see what fits, or a larger card."
    )


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

    if not hasattr(chosen, "settings"):  # an evaluation plan: a table, no chart
        print(chosen.table())
        if chosen.chosen is not None:
            print(f"  apply it: lowvram {chosen.stage} strategy=auto gpu={chosen.gpu.name} , or these overrides: "
                  + (" ".join(chosen.overrides()) or "none"))  # fmt: skip
        return {"plan": chosen, "chart": None}
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
    from lightning_lowvram.strategies import FSDP2Strategy

    if isinstance(trainer.strategy, FSDP2Strategy):  # the Trainer's own strategy, from strategy=fsdp2 or a plan
        s = trainer.strategy
        offload = ", CPU offload" if s.cpu_offload else ""
        reshard = {None: "", True: ", resharded after forward", False: ", kept to backward"}[s.reshard_after_forward]
        strategy_lines.insert(0, f"FSDP2Strategy ({trainer.world_size} rank(s){reshard}{offload})")
    elif trainer.world_size > 1:  # DDP and the like: the state is not sharded
        strategy_lines.insert(0, f"{type(trainer.strategy).__name__} ({trainer.world_size} ranks)")
    strategy_lines += [f"restored: {line}" for line in parts.get("restored", [])]
    reports = next((c.reports for c in parts["callbacks"].values() if isinstance(c, MemoryReportCallback)), {})
    return {
        **_before_after(parts, reports),
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


def _before_after(parts: dict[str, Any], reports: dict[str, Any]) -> dict[str, Any]:
    """For a planned fit: the plain setting's prediction, and the chosen one's predicted and measured peak and time."""
    from lightning_lowvram.planner.search import tensor_peak

    chosen, trainer, timer = parts.get("plan"), parts["trainer"], parts.get("timer")
    if chosen is None or chosen.chosen is None:
        return {}
    if parts.get("stage", "fit") != "fit":  # an evaluation plan (planner.eval_search)
        plain, picked, done = chosen.candidates[0], chosen.chosen, reports.get(parts["stage"])
        return {
            "budget": chosen.budget,
            "before": {"setting": plain.label, "predicted_peak": plain.tensor_peak, "fits": plain.fits,
                       "predicted_step_s": plain.seconds},
            "after": {"setting": picked.label, "predicted_peak": picked.tensor_peak,
                      "measured_peak": done.total if done else None, "predicted_step_s": picked.seconds,
                      "measured_step_s": None},
        }  # fmt: skip
    plain, picked = chosen.candidates[0], chosen.chosen
    steps = trainer.global_step
    seconds = timer.time_elapsed("train") / steps if timer is not None and steps else None
    fit = reports.get("fit")
    return {
        "budget": chosen.budget,
        "before": {"setting": plain.label, "predicted_peak": tensor_peak(plain), "fits": plain.fits,
                   "predicted_step_s": plain.step_time},
        "after": {"setting": picked.label, "predicted_peak": tensor_peak(picked),
                  "measured_peak": fit.total if fit else None, "predicted_step_s": picked.step_time,
                  "measured_step_s": seconds},
    }  # fmt: skip


def _plan_lines(summary: dict[str, Any], card: str) -> list[str]:
    before, after = summary["before"], summary["after"]
    unit = "s/batch" if "seconds" in summary else "s/step"
    fits = "fits" if before["fits"] else "does not fit"
    measured = after["measured_peak"]
    here = f", measured {format_bytes(measured)} in this run" if measured is not None else ""
    step = after["measured_step_s"]
    step_here = f", {step:.3f} s/step measured in this run (this machine's speed)" if step else ""
    budget = format_bytes(summary["budget"])
    return [
        f"  before           {before['setting']}: predicted {format_bytes(before['predicted_peak'])} against "
        f"{budget} (the budget less the plan's margin): {fits}; {before['predicted_step_s']:.4f} {unit} on {card}",
        f"  after            {after['setting']}: predicted {format_bytes(after['predicted_peak'])}{here}; "
        f"{after['predicted_step_s']:.4f} {unit} predicted{step_here}",
    ]


def summary_json(summary: dict[str, Any]) -> str:
    """The summary as JSON, for scripts (memory by stage: ``total`` and ``by_category`` bytes)."""
    import json

    memory = {stage: {"total": s.total, "by_category": dict(s.by_category)} for stage, s in summary["memory"].items()}
    return json.dumps({**summary, "memory": memory}, indent=1, default=str)


def format_summary(summary: dict[str, Any]) -> str:
    """The end-of-run summary as text."""
    lines = [
        "lowvram summary",
        f"  model            {summary['model']} ({summary['parameters']:,} parameters)",
        f"  gpu              {summary['gpu']}",
        f"  effective batch  {summary['effective_batch']} = {summary['effective_batch_formula']}"
        if "seconds" not in summary
        else f"  batch            {summary['effective_batch']} per batch (the data's batch_size)",
        f"  strategies       {', '.join(summary['strategies'])}",
        *(_plan_lines(summary, summary["gpu"].split(":")[0]) if "before" in summary else []),
        "  metrics          " + ", ".join(f"{k} {v:.4g}" for k, v in summary["metrics"].items()),
    ]
    if "seconds" in summary:
        batches, seconds = summary["batches"], summary["seconds"]
        per = f" ({seconds / batches:.3f} s/batch on this machine)" if batches else ""
        lines.append(f"  time             {batches} batches in {seconds:.2f} s{per}")
    if summary.get("predictions"):
        lines.append(f"  predictions      {summary['predictions']} (torch.load(path, weights_only=True))")
    for detail in summary.get("details", []):
        lines += ["  " + line for line in detail.splitlines()]
    if summary["memory"]:
        lines += ["  peak memory by stage and category:"]
        lines += ["    " + line for line in memory_table(summary["memory"]).splitlines()]
    if summary.get("run_dir"):
        lines.append(f"  run directory    {summary['run_dir']}")
        if "seconds" in summary:  # an evaluation: the weights it ran
            lines.append(f"  weights          {summary.get('weights') or 'as the model was built (no ckpt_path)'}")
        else:
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
    # validate/test/predict from a `lowvram fit` checkpoint: the fit's Timer and checkpoint callbacks are not needed
    r"Be aware that when using `ckpt_path`, callbacks used to create the checkpoint need to be provided during "
    r"`Trainer` instantiation. Please add the following callbacks: \[('(Timer|ModelCheckpoint|OnExceptionCheckpoint)"
    r"'(, )?)+\]",
    r"The dirpath has changed from",
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
