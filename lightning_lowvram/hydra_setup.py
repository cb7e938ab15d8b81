"""Honour lowvram's ``gpu=`` and ``strategy=`` groups in another Hydra app with one call.

For an app in the lightning-hydra-template style that composes the shipped tree (``hydra.searchpath:
[pkg://lightning_lowvram.conf]``) and has ``gpu``, ``strategy`` and ``callbacks`` in its defaults list::

    setup = lowvram_setup(cfg, model=model, batch=next(iter(datamodule.train_dataloader())))
    trainer = L.Trainer(callbacks=[*your_callbacks, *setup.callbacks], **setup.trainer_kwargs)
    with setup.budget():
        trainer.fit(model, datamodule)

This module imports Hydra and OmegaConf; the callbacks do not.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf

from lightning_lowvram.memory.budget import memory_budget
from lightning_lowvram.memory.profiles import GPUProfile, gpu_profile

# strategy=auto's own keys (the planner's arguments, conf/strategy/auto.yaml) and their defaults: the CLI and
# lowvram_setup read this one table
AUTO_OPTIONS: dict[str, Any] = {
    "margin": 0.1,
    "allow_int8_base": False,
    "allow_low_bit_base": False,
    "allow_bf16_base": True,
}

#: the key of a ``strategy`` node holding the Trainer's own strategy (``strategy=fsdp2``), not a callback
TRAINER_STRATEGY = "trainer_strategy"


def callback_nodes(cfg: DictConfig) -> Iterator[tuple[str, DictConfig]]:
    """``(key, node)`` of every callback node under ``callbacks`` and ``strategy`` (nodes with a ``_target_``)."""
    for group in ("callbacks", "strategy"):
        for name, node in (cfg.get(group) or {}).items():
            if isinstance(node, DictConfig) and "_target_" in node and (group, name) != ("strategy", TRAINER_STRATEGY):
                yield f"{group}.{name}", node


def trainer_strategy_node(cfg: DictConfig) -> DictConfig | None:
    """The Trainer's strategy a ``strategy`` node sets (``strategy=fsdp2``: ``FSDP2Strategy``), else ``None``."""
    node = (cfg.get("strategy") or {}).get(TRAINER_STRATEGY)
    return node if isinstance(node, DictConfig) and "_target_" in node else None


def planned_devices(cfg: DictConfig) -> int:
    """How many cards a plan is for: ``trainer.devices`` as a count (a list of indices counts its entries).

    Raises:
        ValueError: A value that names no count (``auto``, ``-1``): the plan needs to know how many cards.

    """
    devices = (cfg.get("trainer") or {}).get("devices", 1)
    if isinstance(devices, int) and not isinstance(devices, bool) and devices >= 1:
        return devices
    if isinstance(devices, Sequence) and not isinstance(devices, str) and len(devices) >= 1:
        return len(devices)
    raise ValueError(f"trainer.devices={devices}: a plan needs the number of cards, e.g. trainer.devices=4")


@dataclasses.dataclass
class LowVRAMSetup:
    """What a composed config asks for.

    Attributes:
        profile: The card (``gpu=``).
        callbacks: The ``callbacks`` and ``strategy`` nodes, instantiated (for ``strategy=auto``: the plan's).
        trainer_kwargs: Trainer arguments the strategy sets (``strategy=auto``'s precision, and the strategy object
            and devices of a plan across cards; ``strategy=fsdp2``'s ``FSDP2Strategy``).
        plan: The plan, for ``strategy=auto`` on a card.

    """

    profile: GPUProfile
    callbacks: list[L.Callback]
    trainer_kwargs: dict[str, Any]
    plan: Any = None

    def budget(self, device: str = "auto") -> contextlib.AbstractContextManager[Any]:
        """The card's memory on this machine: a CPU budget or a capped CUDA allocator; none for a detected card."""
        if self.profile.usable_bytes is None or self.profile.name.startswith("cuda:"):
            return contextlib.nullcontext()
        return memory_budget(self.profile, device=device)


def lowvram_setup(cfg: DictConfig, model: L.LightningModule | None = None, batch: Any = None) -> LowVRAMSetup:
    """Turn a composed config's ``gpu``, ``strategy`` and ``callbacks`` into callbacks, Trainer kwargs and a budget.

    Args:
        cfg: The composed config (``gpu`` and ``strategy`` optional: the local device, no strategy).
        model: Needed for ``strategy=auto`` on a card (the planner traces its step).
        batch: An example training batch, for ``strategy=auto``.

    Raises:
        ValueError: A bad ``gpu`` node, or ``strategy=auto`` on a card without ``model`` and ``batch``.

    Example:
        >>> from hydra import compose, initialize_config_module
        >>> with initialize_config_module("lightning_lowvram.conf", version_base="1.3"):
        ...     cfg = compose("lowvram", overrides=["gpu=t4_16gb", "strategy=micro_batch"])
        >>> setup = lowvram_setup(cfg)
        >>> setup.profile.name, sorted(type(c).__name__ for c in setup.callbacks)
        ('t4_16gb', ['AutoMicroBatchCallback', 'MemoryReportCallback'])

    """
    from hydra.utils import instantiate

    from lightning_lowvram.callbacks.from_plan import plan_callbacks

    profile = (
        GPUProfile.from_config(OmegaConf.to_container(cfg.gpu, resolve=True)) if "gpu" in cfg else gpu_profile("auto")
    )
    callbacks = [instantiate(node) for _, node in callback_nodes(cfg)]
    node = trainer_strategy_node(cfg)
    own = {"strategy": instantiate(node)} if node is not None else {}
    strategy = cfg.get("strategy") or {}
    if strategy.get("name") != "auto" or profile.usable_bytes is None:
        return LowVRAMSetup(profile, callbacks, own)
    if model is None or batch is None:
        raise ValueError("strategy=auto: lowvram_setup(cfg, model=..., batch=...) needs the model and a training batch")
    from lightning_lowvram.planner import plan

    options = {k: strategy.get(k, d) for k, d in AUTO_OPTIONS.items()}
    chosen = plan(model, batch, profile, devices=planned_devices(cfg), **options)
    if chosen.chosen is None:
        raise ValueError(f"strategy=auto on {profile.name}: {chosen.nothing_fits()}")
    return LowVRAMSetup(profile, [*callbacks, *plan_callbacks(chosen)], chosen.trainer_kwargs(), chosen)
