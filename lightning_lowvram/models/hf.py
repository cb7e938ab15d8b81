"""Hugging Face models as LightningModules, from a Hub id, a local directory or a config: what `model=hf_*` builds.

``HFCausalLM`` fine-tunes a causal LM on ``{"input_ids", "attention_mask", "labels"}`` batches (``outputs.loss``,
logged as ``train_loss``); ``HFSequenceClassifier`` a sequence classifier on the same with ``labels`` per sample.
Either takes ``name`` (``from_pretrained``: a local directory, or a Hub id Hugging Face can reach) or ``config``
(random init: a dict with ``model_type``, a ``config.json`` or a directory holding one), and an optional peft LoRA
(``lora={"r": 16}``: the base frozen, adapters trained). Needs ``pip install lightning-lowvram[hf]``.

Example:
    >>> tiny = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    ...         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 320}
    >>> module = HFCausalLM(config=tiny, lora={"r": 4})
    >>> module.trainable_parameters() < module.total_parameters()
    True

"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any, Literal

import lightning as L
import torch
from torch import nn

#: LoRA's settings when ``lora`` is given: peft's defaults where they have them; ``r=0``: no LoRA
LORA_DEFAULTS: dict[str, Any] = {"r": 0, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"}


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as err:  # pragma: no cover - an install without the extra
        raise ImportError("Hugging Face models need transformers: pip install 'lightning-lowvram[hf]'") from err
    return transformers


def load_config(config: Mapping[str, Any] | str) -> Any:
    """A transformers config from a dict with ``model_type``, a ``config.json`` path or a directory holding one.

    Raises:
        ValueError: No ``model_type``, or a path that holds no config.

    """
    transformers = _transformers()
    if isinstance(config, str):
        path = os.path.join(config, "config.json") if os.path.isdir(config) else config
        if not os.path.isfile(path):
            raise ValueError(f"config={config!r}: not a config.json file nor a directory holding one")
        with open(path) as f:
            config = json.load(f)
    values = dict(config)
    model_type = values.pop("model_type", None)
    if not model_type:
        raise ValueError(f"config={values}: needs a model_type (llama, gpt2, mistral, qwen2, bert...)")
    try:
        return transformers.AutoConfig.for_model(model_type, **values)
    except ValueError as err:
        raise ValueError(f"config: {str(err).splitlines()[0]}") from err


def load_model(kind: Literal["causal_lm", "sequence_classification"], name: str | None, config: Any, **kwargs: Any):
    """``from_pretrained(name)`` or ``from_config(config)`` of the Auto class for ``kind``.

    Raises:
        ValueError: Neither or both of ``name`` and ``config``; a ``name`` that is neither a local directory nor a
            model Hugging Face can reach (offline: only what is cached).

    """
    transformers = _transformers()
    auto = {
        "causal_lm": transformers.AutoModelForCausalLM,
        "sequence_classification": transformers.AutoModelForSequenceClassification,
    }[kind]
    if (name is None) == (config is None):
        raise ValueError(f"name={name}: give a model name (Hub id or local directory) or a config, not both or neither")
    if config is not None:
        built = load_config(config)
        for key, value in kwargs.items():
            setattr(built, key, value)
        return auto.from_config(built)
    try:
        return auto.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as err:
        where = "a local directory without a model" if os.path.isdir(name) else "neither a local directory nor a model"
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"name={name}: {where} Hugging Face can load here ({reason})") from err


def with_lora(model: nn.Module, lora: Mapping[str, Any] | None, task_type: str | None = None) -> nn.Module:
    """``model`` under peft LoRA adapters (the base frozen), or as it is for ``lora`` None or ``r=0``.

    Raises:
        ValueError: An unknown LoRA key, a negative ``r``, or target modules that match no module (naming the
            model's Linear layers).

    """
    settings = {**LORA_DEFAULTS, **(lora or {})}
    unknown = sorted(set(settings) - set(LORA_DEFAULTS))
    if unknown:
        raise ValueError(f"lora: unknown key {unknown[0]!r}; it takes {', '.join(LORA_DEFAULTS)}")
    r = settings["r"]
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise ValueError(f"lora.r must be an integer >= 0 (0: no LoRA), got {r!r}")
    if r == 0:
        return model
    from peft import LoraConfig, get_peft_model

    targets = settings["target_modules"]
    targets = list(targets) if isinstance(targets, list | tuple) else targets
    config = LoraConfig(
        r=r, lora_alpha=settings["alpha"], lora_dropout=settings["dropout"], target_modules=targets, task_type=task_type
    )  # fmt: skip
    try:
        return get_peft_model(model, config)
    except ValueError as err:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(
            f"lora.target_modules={targets}: matches no module of {type(model).__name__}; its Linear layers are "
            f"{', '.join(linear)} (or all-linear)"
        ) from err


class _HFModule(L.LightningModule):
    """The shared part: build, optional LoRA, the loss from ``outputs.loss``, AdamW or SGD."""

    kind: Literal["causal_lm", "sequence_classification"] = "causal_lm"
    task_type = "CAUSAL_LM"  # peft's: a sequence classifier's head stays trainable under LoRA (SEQ_CLS)

    def __init__(
        self,
        name: str | None = None,
        config: Any = None,
        lora: Mapping[str, Any] | None = None,
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        optimizer: Literal["adamw", "sgd"] = "adamw",
        **model_kwargs: Any,
    ) -> None:
        super().__init__()
        if optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {optimizer!r}")
        if isinstance(lr, bool) or not isinstance(lr, int | float) or lr <= 0:
            raise ValueError(f"lr must be a number > 0, got {lr!r}")
        self.save_hyperparameters()
        model = load_model(self.kind, name, config, **model_kwargs)
        if getattr(model.config, "pad_token_id", 0) is None:
            model.config.pad_token_id = 0  # padded batches: the text-file data's byte tokenizer pads with 0
        self.model = with_lora(model, lora, self.task_type)

    def forward(self, **batch: Any) -> Any:
        return self.model(**batch)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(**batch).loss
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log("val_loss", self.model(**batch).loss, prog_bar=True)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log("test_loss", self.model(**batch).loss)

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.model(**{k: v for k, v in batch.items() if k != "labels"}).logits

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        wd = self.hparams.weight_decay
        if self.hparams.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.hparams.lr, weight_decay=wd)
        return torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=wd)

    def total_parameters(self) -> int:
        """All parameters (the frozen base included)."""
        return sum(p.numel() for p in self.parameters())

    def trainable_parameters(self) -> int:
        """The parameters the optimizer updates (the adapters, under LoRA)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def vocab_size(self) -> int | None:
        """Rows of the input embedding: token ids must stay below it."""
        embeddings = self.model.get_input_embeddings()
        return getattr(embeddings, "num_embeddings", None)


class HFCausalLM(_HFModule):
    """A Hugging Face causal LM fine-tuned on token batches (``labels`` = ids, -100 where padded).

    Args:
        name: A local directory or a Hub id (``from_pretrained``; offline, only what is cached).
        config: Random init instead: a dict with ``model_type`` and sizes, a ``config.json``, or a directory.
        lora: peft LoRA settings (``r``, ``alpha``, ``dropout``, ``target_modules``); ``r=0`` or ``None``: none.
        lr: Learning rate.
        weight_decay: AdamW's (or SGD's) weight decay.
        optimizer: ``"adamw"`` or ``"sgd"``.
        **model_kwargs: Passed to ``from_pretrained`` (or set on the config).

    Example:
        >>> # lowvram fit model=hf_causal_lm model.name=./my-model model.lora.r=16 data=text_file data.path=my.txt

    """

    kind = "causal_lm"


class HFSequenceClassifier(_HFModule):
    """A Hugging Face sequence classifier (``num_labels`` classes) fine-tuned on labelled token batches.

    Args:
        name: A local directory or a Hub id.
        config: Random init instead (see :class:`HFCausalLM`).
        lora: peft LoRA settings; the classifier head stays trainable (peft's ``SEQ_CLS`` task).
        lr: Learning rate.
        weight_decay: Weight decay.
        optimizer: ``"adamw"`` or ``"sgd"``.
        num_labels: Classes.

    """

    kind = "sequence_classification"
    task_type = "SEQ_CLS"

    def __init__(
        self,
        name: str | None = None,
        config: Any = None,
        lora: Mapping[str, Any] | None = None,
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        optimizer: Literal["adamw", "sgd"] = "adamw",
        num_labels: int = 2,
    ) -> None:
        if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 2:
            raise ValueError(f"num_labels must be an integer >= 2, got {num_labels!r}")
        super().__init__(name, config, lora, lr, weight_decay, optimizer, num_labels=num_labels)

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return super().predict_step(batch, batch_idx).argmax(-1)
