"""DynamicQuantCallback: int8 Linear layers for evaluation, compared with the float model; int8 frozen bases."""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.rank_zero import rank_zero_deprecation
from torch import nn
from torchmetrics import Metric
from typing_extensions import override

from lightning_lowvram._files import check_writable
from lightning_lowvram._metrics import snapshot_metrics
from lightning_lowvram._patching import patch
from lightning_lowvram.cores.batches import batch_size_of
from lightning_lowvram.cores.dynamic_quant import (
    BACKENDS,
    as_linear,
    available_backends,
    choose_backend,
    format_comparison,
    gradient_check,
    int8_kernel_ok,
    is_linear,
    linear_bytes,
    median_seconds,
    module_bytes,
    quantize_dynamic_int8,
    save_quantized,
    tied_layers,
)
from lightning_lowvram.cores.low_bit_base import frozen_linear_layers, quantize_frozen_base

STAGES = {"validate": ("validation_step", "val_dataloaders"), "test": ("test_step", "test_dataloaders")}
_STEPS = {**STAGES, "predict": ("predict_step", "predict_dataloaders")}
FLOAT = "float"  # what backend="auto" keeps on CUDA when no int8 path measured faster
STAGES_ALL = (*STAGES, "predict")


class DynamicQuantCallback(Callback):
    """Run the chosen stages on int8 copies of the Linear layers; report what int8 costs on the module's own metrics.

    For each stage in ``stages`` the Linear layers are swapped for int8 copies (dynamic: int8 weights, activations
    quantized per batch) while the stage runs and swapped back after it: the float layers are never modified, so
    training and checkpoints keep the float model. With ``compare=True`` (validate/test) the same data then runs
    through the float and the int8 model: every value the module logs (its torchmetrics included), the bytes of the
    model and of its Linear layers, and the latency per batch, as one table to the loggers and the console.

    ``freeze_base=True`` turns every frozen Linear layer (``requires_grad=False``) into int8 weight-only *before*
    training, in place, for QLoRA-style adapter training; a self-test at setup checks that gradients flow through
    the quantized layers as through the float ones, and backends that cut autograd are refused.

    Linear layers and Hugging Face ``Conv1D`` (GPT-2) are converted; a layer whose weight is tied to an embedding
    stays float (int8 would add a copy beside the float embedding), and so does one whose shape the backend's CUDA
    kernel does not take (:func:`lightning_lowvram.cores.dynamic_quant.int8_kernel_ok`); one warning names them.
    ``backend="auto"`` on CUDA (and ``"measure"`` anywhere) times the stage's step on its first batch in float and with
    each int8 backend (one untimed warm-up call each, median of 3) and keeps the fastest, float included, with a
    warning when int8 lost (tested on CPU; no GPU has run it yet); on CPU ``"auto"`` is ``torch_ao``, the fastest
    measured there (benchmarks/RESULTS.md).

    The one trap: dynamic int8 backends cut autograd, so they are for evaluation only; ``torch_ao`` (the CPU default)
    runs on CPU only.

    Args:
        stages: Stages run in int8: any of ``"validate"``, ``"test"``, ``"predict"``.
        compare: Run float and int8 side by side after each validate/test stage.
        backend: ``"auto"`` (CPU: ``torch_ao``; CUDA: as ``"measure"``), ``"measure"`` (time float and every int8
            backend on the stage's first batch, keep the fastest, float included) or one of
            :data:`lightning_lowvram.cores.dynamic_quant.BACKENDS`.
        save_path: Where to write the int8 weights and the recipe after a quantized stage
            (load with :func:`load_quantized`).
        freeze_base: Deprecated (use ``LowBitBaseCallback(bits=8)``): quantize frozen Linear layers (int8
            weight-only) before fit, through the same conversion.
        print_table: Print the comparison table.

    Example:
        >>> from lightning_lowvram.demo import DigitsDataModule, DigitsMLP
        >>> quant = DynamicQuantCallback(print_table=False)
        >>> trainer = L.Trainer(callbacks=[quant], logger=False, enable_progress_bar=False)
        >>> _ = trainer.test(DigitsMLP(hidden=32), DigitsDataModule(), verbose=False)
        >>> sorted(quant.comparison["test"])[:3]
        ['latency_ms', 'linear_bytes', 'model_bytes']

    """

    def __init__(
        self,
        stages: Sequence[str] = ("test", "predict"),
        compare: bool = True,
        backend: str = "auto",
        save_path: str | None = None,
        freeze_base: bool = False,
        print_table: bool = True,
    ) -> None:
        stages = [stages] if isinstance(stages, str) else list(stages)
        unknown = [s for s in stages if s not in STAGES_ALL]
        if unknown:
            raise ValueError(f"stages must be among {', '.join(map(repr, STAGES_ALL))}, got {unknown}")
        if backend not in ("auto", "measure") and backend not in BACKENDS:
            raise ValueError(
                f"backend must be 'auto', 'measure' or one of {', '.join(map(repr, BACKENDS))}, got {backend!r}"
            )
        if save_path is not None:
            check_writable(save_path, "save_path")  # before training, not after the results exist
        for name, flag in (("compare", compare), ("freeze_base", freeze_base), ("print_table", print_table)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be True or False, got {flag!r}")
        self.stages, self.compare, self.backend = stages, compare, backend
        self.save_path, self.freeze_base, self.print_table = save_path, freeze_base, print_table
        self.comparison: dict[str, dict[str, dict[str, float]]] = {}  # stage -> row -> {"float", "int8"}
        self.frozen: list[str] = []
        self._stash: dict[str, nn.Module] = {}
        self._chosen: str | None = None
        self.kept_float: dict[str, str] = {}  # layer -> why it stays float
        self.converted = 0  # layers the latest quantized stage ran in int8
        self.measured: dict[str, str] = {}  # stage -> fastest path on CUDA with backend="auto" (or "float")

    # -- Lightning hooks ----------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        device = trainer.strategy.root_device
        if stage == "fit" and self.freeze_base and not self.frozen:
            self._freeze_base(pl_module, device)
        if any(s in self.stages for s in ("validate", stage)):
            if self.backend != "measure":
                self._chosen = choose_backend(device, self.backend)  # unsupported here: a clear error now

    @override
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if "validate" in self.stages and not trainer.sanity_checking:
            self._start(trainer, pl_module, "validate")

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stage_end(trainer, pl_module, "validate")

    @override
    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if "test" in self.stages:
            self._start(trainer, pl_module, "test")

    @override
    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stage_end(trainer, pl_module, "test")

    @override
    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if "predict" in self.stages:
            self._start(trainer, pl_module, "predict")

    @override
    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stage_end(trainer, pl_module, "predict")

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._swap_out(pl_module)

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._swap_out(pl_module)

    def summary(self) -> str:
        """What was converted, and the float-vs-int8 table(s), for the `lowvram` summary."""
        done = f"{self.converted} layer(s) int8" + (f", {len(self.kept_float)} kept float" if self.kept_float else "")
        done += f", {len(self.frozen)} frozen base layer(s) int8" if self.frozen else ""
        tables = [format_comparison(stage, rows) for stage, rows in self.comparison.items()]
        return "\n".join([done, *tables]) if tables else done

    # -- int8 for a stage ---------------------------------------------------------------------------------------
    def _start(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.backend == "measure" or (self.backend == "auto" and pl_module.device.type == "cuda"):
            if stage not in self.measured:
                self.measured[stage] = self._fastest(trainer, pl_module, stage)
            self._chosen = self.measured[stage]
        if self._chosen != FLOAT:
            self._swap_in(pl_module, self._chosen or "auto")

    def _layers(self, pl_module: nn.Module, backend: str) -> list[str]:
        """Layers to convert; the others, with the reason, in ``kept_float`` (one warning)."""
        tied = set(tied_layers(pl_module))
        names, kept = [], {}
        for name, m in pl_module.named_modules():
            if not is_linear(m) or name in self.frozen:
                continue
            if name in tied:
                kept[name] = "weight tied to another module: int8 would add a copy beside the float one"
            elif not int8_kernel_ok(m, backend, pl_module.device):
                kept[name] = f"{backend} on CUDA has no int8 kernel for this shape (it multiplies on the CPU)"
            else:
                names.append(name)
        if kept and kept != self.kept_float:
            rank_zero_warn(
                "DynamicQuantCallback: kept in float: " + "; ".join(f"{n} ({why})" for n, why in kept.items())
            )
        self.kept_float = kept
        return names

    def _swap_in(self, pl_module: L.LightningModule, backend: str) -> None:
        if self._stash:
            return
        names = self._layers(pl_module, choose_backend(pl_module.device, backend))
        if not names:
            rank_zero_warn(
                f"DynamicQuantCallback: no layer converted to int8 in {type(pl_module).__name__} "
                f"({len(self.kept_float)} kept in float, {len(self.frozen)} frozen; it quantizes nn.Linear and "
                "Conv1D layers): the stage runs in float"
            )
            return
        box = nn.ModuleList(as_linear(copy.deepcopy(pl_module.get_submodule(n))) for n in names).eval()
        quantize_dynamic_int8(box, backend, device=pl_module.device, inplace=True)
        self.converted = len(names)
        for name, int8 in zip(names, box, strict=True):
            self._stash[name] = pl_module.get_submodule(name)
            pl_module.set_submodule(name, int8)

    def _fastest(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> str:
        """Time the stage's step on its first batch in float and with each int8 backend; the fastest wins."""
        step_name, loaders_attr = _STEPS[stage]
        loaders = getattr(trainer, loaders_attr)
        loader = loaders[0] if isinstance(loaders, list | tuple) else loaders
        batch = trainer.strategy.batch_to_device(next(iter(loader)))
        step = getattr(pl_module, step_name)

        def run() -> None:
            with torch.inference_mode():
                step(batch, 0)

        undo = patch(pl_module, "log", lambda original, *args, **kwargs: None, wrap=True)
        restore_metrics = snapshot_metrics(pl_module)  # the timing runs must not count in the stage's metrics
        times: dict[str, float] = {}
        try:
            times[FLOAT] = median_seconds(run, pl_module.device)
            for backend in available_backends(pl_module.device):
                self._swap_in(pl_module, backend)
                times[backend] = median_seconds(run, pl_module.device)
                self._swap_out(pl_module)
        finally:
            self._swap_out(pl_module)
            restore_metrics()
            undo()
        best = min(times, key=times.__getitem__)
        if best == FLOAT:
            rank_zero_warn(
                f"DynamicQuantCallback: no int8 backend was faster than float on this {stage} step here ("
                + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in times.items())
                + "): running float; pass backend= to force one"
            )
        return best

    def _swap_out(self, pl_module: L.LightningModule) -> None:
        for name, original in self._stash.items():
            pl_module.set_submodule(name, original)
        self._stash = {}

    def _stage_end(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not self._stash:
            return
        if self.save_path:
            backend = choose_backend(pl_module.device, self._chosen or "auto")
            save_quantized(pl_module, self.save_path, backend, list(self._stash))
        if self.compare and stage in STAGES:
            names = list(self._stash)
            int8 = _evaluate(trainer, pl_module, stage)
            int8.update(model_bytes=module_bytes(pl_module), linear_bytes=linear_bytes(pl_module, names))
            self._swap_out(pl_module)
            fp = _evaluate(trainer, pl_module, stage)
            fp.update(model_bytes=module_bytes(pl_module), linear_bytes=linear_bytes(pl_module, names))
            self._report(trainer, stage, fp, int8)
        self._swap_out(pl_module)

    def _report(self, trainer: L.Trainer, stage: str, fp: dict[str, float], int8: dict[str, float]) -> None:
        rows = {key: {"float": fp[key], "int8": int8[key]} for key in fp if key in int8}
        self.comparison[stage] = rows
        metrics = {f"lowvram/quant/{stage}/{key}/{kind}": v for key, row in rows.items() for kind, v in row.items()}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        if self.print_table:
            rank_zero_info(format_comparison(stage, rows))
        latency = rows.get("latency_ms", {})
        if latency and latency["int8"] > latency["float"]:
            rank_zero_warn(
                f"DynamicQuantCallback: int8 ({self._chosen}) took {latency['int8'] / latency['float']:.2f}x the float "
                f"time per {stage} batch here: for layers this small, quantizing activations costs more than int8 "
                "matmuls save; the byte savings stand"
            )

    # -- frozen base --------------------------------------------------------------------------------------------
    def _freeze_base(self, pl_module: L.LightningModule, device: torch.device) -> None:
        auto = self.backend in ("auto", "measure")
        name = "torchao_weight_only" if auto else choose_backend(device, self.backend)
        if not BACKENDS[name].keeps_gradients:
            raise ValueError(
                f"backend={name!r} cuts autograd: layers under trainable ones would silently get no gradient; "
                "freeze_base=True needs backend='torchao_weight_only' (or 'auto')"
            )
        rank_zero_deprecation(
            "DynamicQuantCallback(freeze_base=True) is deprecated: use LowBitBaseCallback(bits=8) (or bits=4 for NF4), "
            "which now does the frozen-base conversion for both"
        )
        frozen = frozen_linear_layers(pl_module)
        if not frozen:
            raise ValueError(
                "freeze_base=True found no frozen Linear layer: freeze the base first (requires_grad_(False))"
            )
        floats = {n: copy.deepcopy(as_linear(pl_module.get_submodule(n))) for n in frozen}
        report = quantize_frozen_base(pl_module, bits=8)
        for layer_name in report.converted:
            similarity = gradient_check(floats[layer_name], pl_module.get_submodule(layer_name))
            if similarity < 0.99:
                raise RuntimeError(
                    f"DynamicQuantCallback: gradients through the int8 {layer_name!r} differ from float "
                    f"(cosine {similarity:.3f}); not training on it"
                )
        self.frozen = report.converted
        rank_zero_info(
            f"DynamicQuantCallback: {len(self.frozen)} frozen Linear layers are int8 (torchao_weight_only); "
            "gradients checked"
        )


def _evaluate(trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> dict[str, Any]:
    """Run the stage's step over the stage's batches, capturing what it logs; metrics are reset afterwards."""
    step_name, loaders_attr = STAGES[stage]
    step = getattr(pl_module, step_name)
    loaders = getattr(trainer, loaders_attr)
    loaders = loaders if isinstance(loaders, list | tuple) else [loaders]
    limits = trainer.num_test_batches if stage == "test" else trainer.num_val_batches
    sums: dict[str, list[float]] = {}
    metrics: dict[str, Metric] = {}
    times: list[float] = []

    def log(name: str, value: Any, *args: Any, batch_size: int | None = None, **kwargs: Any) -> None:
        if isinstance(value, Metric):
            metrics[name] = value
            return
        weight = batch_size or current["size"]
        total = sums.setdefault(name, [0.0, 0.0])
        total[0] += float(value) * weight
        total[1] += weight

    current = {"size": 1}
    undo = patch(pl_module, "log", lambda original, *args, **kwargs: log(*args, **kwargs), wrap=True)
    try:
        with torch.inference_mode():
            for index, loader in enumerate(loaders):
                for i, batch in enumerate(loader):
                    if i >= limits[index]:
                        break
                    batch = trainer.strategy.batch_to_device(batch)
                    current["size"] = batch_size_of(batch)
                    start = time.perf_counter()
                    step(batch, i, *([index] if len(loaders) > 1 else []))
                    if pl_module.device.type == "cuda":
                        torch.cuda.synchronize()
                    times.append(time.perf_counter() - start)
    finally:
        undo()
    values: dict[str, Any] = {name: total[0] / max(total[1], 1) for name, total in sums.items()}
    for name, metric in metrics.items():
        values[name] = float(metric.compute())
        metric.reset()
    values["latency_ms"] = sorted(times)[len(times) // 2] * 1e3 if times else float("nan")
    return values
