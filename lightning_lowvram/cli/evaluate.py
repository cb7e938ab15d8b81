"""``lowvram validate | test | predict``: the checks before, the stage under the card's memory, predictions saved.

Decisions (a Lightning user's expectations): the stage's own loader (``val_dataloader``, ``test_dataloader``,
``predict_dataloader``); ``predict`` on data without a ``predict_dataloader`` runs on its ``test_dataloader`` (else
``val_dataloader``), said in one line. Predictions go to ``<run dir>/predictions.pt`` as plain lists, dicts and
tensors on the CPU (``torch.load(path, weights_only=True)`` reads them). A ``ckpt_path`` from ``lowvram fit`` loads
with the structure it was saved with: a pruned model's shapes are given to the fresh model first
(``pruning.conform_to_state_dict``), a low-bit base gets its ``LowBitBaseCallback`` back (the checkpoint's bits).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.model_helpers import is_overridden
from omegaconf import DictConfig

from lightning_lowvram.cli.checks import _ckpt_path
from lightning_lowvram.cli.errors import ConfigError

EVAL_COMMANDS = ("validate", "test", "predict")
_STEPS = {"validate": "validation_step", "test": "test_step", "predict": "predict_step"}
_LOADERS = {"validate": ("val_dataloader",), "test": ("test_dataloader",),
            "predict": ("predict_dataloader", "test_dataloader", "val_dataloader")}  # fmt: skip
_SETUP = {"val_dataloader": "validate", "test_dataloader": "test", "predict_dataloader": "predict"}


def check_eval_model(cfg: DictConfig, model: L.LightningModule) -> None:
    """The stage's step exists; ``predict`` has trained weights to predict with (a checkpoint, or a model of yours).

    Raises:
        ConfigError: Naming the key and the value.

    """
    stage = cfg.command
    step = _STEPS[stage]
    own = is_overridden(step, model, L.LightningModule) or (stage == "predict" and is_overridden("forward", model))
    if not own:
        raise ConfigError("model._target_", cfg.model._target_, f"has no {step}: `lowvram {stage}` cannot run it")
    if stage == "predict" and cfg.get("ckpt_path") is None and _random_init(cfg.model):
        raise ConfigError(
            "ckpt_path", None, f"`lowvram predict` with model={cfg.model._target_} (random init) needs trained "
            "weights: ckpt_path=<a .ckpt from lowvram fit> (or last), or a model with its weights "
            "(model=hf_causal_lm model.name=<pretrained>, or model._target_=yours)",
        )  # fmt: skip


#: The shipped models that build random weights: predicting with them needs a checkpoint
_RANDOM_INIT = ("lightning_lowvram.demo.DigitsMLP", "lightning_lowvram.demo.TinyGPT")


def _random_init(node: Any) -> bool:
    target = str(node.get("_target_", ""))
    return target in _RANDOM_INIT or (target.endswith("models.HFCausalLM") and node.get("name") is None) or (
        target.endswith("models.HFSequenceClassifier") and node.get("name") is None
    )  # fmt: skip


def eval_loader(cfg: DictConfig, data: Any) -> tuple[Any, str]:
    """The stage's dataloader and the name of the method it came from.

    Raises:
        ConfigError: The data has no loader for the stage.

    """
    stage = cfg.command
    for name in _LOADERS[stage]:
        if is_overridden(name, data, L.LightningDataModule):
            data.prepare_data()
            data.setup(_SETUP[name])
            return getattr(data, name)(), name
    raise ConfigError("data._target_", cfg.data._target_, f"has no {' or '.join(_LOADERS[stage])}: nothing to {stage}")


def restore_structure(cfg: DictConfig, model: L.LightningModule, callbacks: dict[str, Any]) -> list[str]:
    """Give ``model`` the checkpoint's pruned shapes and its low-bit base's callback; return what was done, in words."""
    path = _ckpt_path(cfg)
    if path is None:
        return []
    from lightning.fabric.utilities.cloud_io import _load

    checkpoint = _load(path, map_location="cpu")
    states = checkpoint.get("callbacks", {})
    done: list[str] = []
    if any(str(key).startswith("PruningCallback") for key in states):
        from lightning_lowvram.cores.pruning_units import conform_to_state_dict

        conform_to_state_dict(model, checkpoint["state_dict"])
        done.append("pruned shapes from the checkpoint")
    from lightning_lowvram.callbacks.low_bit_base import LowBitBaseCallback

    bits = next((s["bits"] for k, s in states.items() if str(k).startswith("LowBitBaseCallback")), None)
    if bits is not None and not any(isinstance(c, LowBitBaseCallback) for c in callbacks.values()):
        callbacks["strategy.LowBitBaseCallback"] = LowBitBaseCallback(bits=bits)
        done.append(f"{bits}-bit base from the checkpoint")
    return done


def evaluate(cfg: DictConfig, parts: dict[str, Any]) -> dict[str, Any]:
    """Run the stage; return the metrics, the predictions' path, the batches and the seconds it took."""
    trainer: L.Trainer = parts["trainer"]
    stage = cfg.command
    loader = parts["eval_loader"]
    start = time.perf_counter()
    if stage == "predict":
        predictions = trainer.predict(parts["model"], dataloaders=loader, ckpt_path=_ckpt_path(cfg))
        batches = len(predictions or [])
    else:
        getattr(trainer, stage)(parts["model"], dataloaders=loader, ckpt_path=_ckpt_path(cfg), verbose=False)
        batches = int(sum(trainer.num_val_batches if stage == "validate" else trainer.num_test_batches))
    seconds = time.perf_counter() - start
    out: dict[str, Any] = {"seconds": seconds, "batches": batches, "weights": _ckpt_path(cfg)}
    if stage == "predict" and trainer.is_global_zero:
        path = Path(trainer.default_root_dir) / "predictions.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(plain(predictions), path)
        out["predictions"] = str(path)
    return out


def plain(value: Any) -> Any:
    """``value`` as lists, dicts and CPU tensors (what ``torch.load(..., weights_only=True)`` reads back).

    Example:
        >>> plain(({"logits": torch.ones(1)}, [torch.zeros(2)]))
        [{'logits': tensor([1.])}, [tensor([0., 0.])]]

    """
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"predict_step returned a {type(value).__name__}: return tensors, lists or dicts to save them")
