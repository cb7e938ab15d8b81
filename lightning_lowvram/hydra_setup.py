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
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import lightning as L
from omegaconf import DictConfig, ListConfig, OmegaConf

from lightning_lowvram.memory.budget import memory_budget
from lightning_lowvram.memory.profiles import GPUProfile, gpu_profile
from lightning_lowvram.registry import Strategy, as_override, by_target, on_register


def auto_options() -> dict[str, Any]:
    """``strategy=auto``'s own keys and their defaults: the margin, and every registered strategy's plan switches."""
    from lightning_lowvram.planner.search import plan_options

    return {"margin": 0.1, **plan_options()}


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


class NodeError(ValueError):
    """A node a strategy's declaration refuses: ``key=value: reason``, the value as written on the command line.

    The CLI's ``ConfigError`` is one (it prints as one line).

    Args:
        key: The dotted config key at fault.
        value: Its value.
        reason: Why it was refused.

    """

    def __init__(self, key: str, value: Any, reason: str) -> None:
        self.key, self.value, self.reason = key, value, reason
        super().__init__(f"{key}={show(value)}: {reason}")


def show(value: Any) -> str:
    """A config value as it is written on the command line (``null``, ``true``, ``[a,b]``)."""
    if isinstance(value, DictConfig | ListConfig):
        value = OmegaConf.to_container(value, resolve=False)
    return as_override(value)


def check_nodes(cfg: DictConfig) -> None:
    """Check every callback and Trainer-strategy node against its strategy's declared config, before building any.

    Raises:
        NodeError: The first key a declaration refuses (unknown, or a value of the wrong type or not among its
            Literal's members), naming the key and the value.

    """
    from hydra.utils import get_class

    declared = by_target()
    nodes = list(callback_nodes(cfg))
    node = trainer_strategy_node(cfg)
    nodes += [(f"strategy.{TRAINER_STRATEGY}", node)] if node is not None else []
    for key, node in nodes:
        try:
            strategy = declared.get(get_class(node._target_))
        except Exception:  # an unresolvable target: instantiating it says so  # noqa: BLE001
            continue
        if strategy is None:
            continue  # a callback of the user's own
        refused = strategy.check(OmegaConf.to_container(node, resolve=True))  # type: ignore[arg-type]
        if refused is not None:
            name, value, reason = refused
            raise NodeError(f"{key}.{name}", value, reason)


def compose_strategies(
    cfg: DictConfig,
    profile: GPUProfile,
    model: Any = None,
    batch: Any = None,
    *,
    instantiate: Callable[..., Any] | None = None,
    plan_only: bool = False,
    stage: str = "fit",
) -> tuple[dict[str, Any], dict[str, Any], Any]:
    """The one composition of a config's strategies: the CLI, :func:`lowvram_setup` and Python all come here.

    Checks the nodes against their declarations, builds the ``callbacks`` and ``strategy`` nodes and the Trainer's
    strategy, and for ``strategy=auto`` on a card plans with ``model`` and ``batch`` and adds the plan's callbacks and
    Trainer arguments. CPU offload is offered where it can run (CUDA here) or when only planning.

    Args:
        cfg: The composed config.
        profile: The card.
        model: The model, for ``strategy=auto``.
        batch: An example training batch, for ``strategy=auto``.
        instantiate: Builds a node: ``instantiate(node, key)`` (the CLI's names the key of a failing node); default
            Hydra's.
        plan_only: Plan without applying (``lowvram plan``): the plan is returned, not added.
        stage: ``"fit"`` plans the training step; ``"validate"``, ``"test"``, ``"predict"`` the evaluation step
            (:func:`~lightning_lowvram.plan_eval`: eval micro-batch, streaming, low-bit weights where allowed), and
            ``batch`` is that stage's.

    Returns:
        ``(callbacks by key, Trainer kwargs, plan or None)``.

    Raises:
        NodeError: A node its declaration refuses.
        ValueError: ``strategy=auto`` without a model and a batch, bad plan options or ``trainer.devices``, or
            (unless ``plan_only``) nothing fits.

    """
    from hydra.utils import instantiate as hydra_instantiate

    from lightning_lowvram.compose import plan_callbacks

    build = instantiate or (lambda node, key: hydra_instantiate(node))
    check_nodes(cfg)
    callbacks = {key: build(node, key) for key, node in callback_nodes(cfg)}
    node = trainer_strategy_node(cfg)
    trainer_kwargs = {"strategy": build(node, f"strategy.{TRAINER_STRATEGY}")} if node is not None else {}
    strategy = cfg.get("strategy") or {}
    if not (plan_only or strategy.get("name") == "auto") or profile.usable_bytes is None:
        return callbacks, trainer_kwargs, None  # no card, no limit: plain
    if model is None or batch is None:
        raise ValueError("strategy=auto: lowvram_setup(cfg, model=..., batch=...) needs the model and a training batch")
    import torch

    from lightning_lowvram.planner import plan

    options = {k: strategy.get(k, d) for k, d in auto_options().items()}
    if stage != "fit":
        return _compose_eval(cfg, profile, model, batch, stage, options, plan_only, callbacks, trainer_kwargs)
    offload = plan_only or torch.cuda.is_available()  # CPU offload runs on CUDA devices only
    chosen = plan(model, batch, profile, devices=planned_devices(cfg), allow_offload=offload, **options)
    if plan_only:
        return callbacks, trainer_kwargs, chosen
    if chosen.chosen is None:
        raise NothingFitsError(f"strategy=auto on {profile.name}: {chosen.nothing_fits()}")
    callbacks |= {f"strategy.{type(c).__name__}": c for c in plan_callbacks(chosen)}
    return callbacks, trainer_kwargs | chosen.trainer_kwargs(), chosen


class NothingFitsError(ValueError):
    """``strategy=auto``: even the smallest setting exceeds the card (the message says what to try)."""


def _compose_eval(
    cfg: DictConfig, profile: GPUProfile, model: Any, batch: Any, stage: str, options: dict[str, Any],
    plan_only: bool, callbacks: dict[str, Any], trainer_kwargs: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, Any], Any]:  # fmt: skip
    from lightning_lowvram.compose import eval_plan_callbacks
    from lightning_lowvram.planner import plan_eval

    precision = str(cfg.get("trainer", {}).get("precision", "32-true"))
    allow = bool(options.get("allow_low_bit_base") or options.get("allow_int8_base"))
    chosen = plan_eval(model, batch, profile, stage, precision=precision, margin=options["margin"],
                       allow_low_bit_base=allow)  # type: ignore[arg-type]  # fmt: skip
    if plan_only:
        return callbacks, trainer_kwargs, chosen
    if chosen.chosen is None:
        raise NothingFitsError(f"strategy=auto on {profile.name}: no {stage} setting fits\n{chosen.table()}")
    callbacks |= {f"strategy.{type(c).__name__}": c for c in eval_plan_callbacks(chosen)}
    return callbacks, trainer_kwargs, chosen


def lowvram_setup(cfg: DictConfig, model: L.LightningModule | None = None, batch: Any = None) -> LowVRAMSetup:
    """Turn a composed config's ``gpu``, ``strategy`` and ``callbacks`` into callbacks, Trainer kwargs and a budget.

    Args:
        cfg: The composed config (``gpu`` and ``strategy`` optional: the local device, no strategy).
        model: Needed for ``strategy=auto`` on a card (the planner traces its step).
        batch: An example training batch, for ``strategy=auto``.

    Raises:
        ValueError: A bad ``gpu`` node, a node its strategy's declaration refuses, or ``strategy=auto`` on a card
            without ``model`` and ``batch`` (or where nothing fits).

    Example:
        >>> from hydra import compose, initialize_config_module
        >>> with initialize_config_module("lightning_lowvram.conf", version_base="1.3"):
        ...     cfg = compose("lowvram", overrides=["gpu=t4_16gb", "strategy=micro_batch"])
        >>> setup = lowvram_setup(cfg)
        >>> setup.profile.name, sorted(type(c).__name__ for c in setup.callbacks)
        ('t4_16gb', ['AutoMicroBatchCallback', 'MemoryReportCallback'])

    """
    profile = (
        GPUProfile.from_config(OmegaConf.to_container(cfg.gpu, resolve=True)) if "gpu" in cfg else gpu_profile("auto")
    )
    callbacks, trainer_kwargs, chosen = compose_strategies(cfg, profile, model, batch)
    return LowVRAMSetup(profile, list(callbacks.values()), trainer_kwargs, chosen)


def _store_node(strategy: Strategy) -> None:
    """Put a registered strategy's node in Hydra's ConfigStore (``callbacks=[...,lowvram_<name>]``), unless shipped.

    The shipped nodes are files under ``conf/callbacks`` (tested against their declarations); one registered from
    outside the package gets its node generated from its config dataclass.
    """
    from hydra.core.config_store import ConfigStore

    if strategy.kind != "callback" or strategy.target.startswith("lightning_lowvram."):
        return  # the package's own: a file under conf/callbacks (tests/test_conf.py holds it to its declaration)
    node = {"_target_": strategy.target, "_convert_": "all", **strategy.defaults()}
    ConfigStore.instance().store(group="callbacks", name=strategy.node, node=node, package=f"callbacks.{strategy.node}")


on_register(_store_node)
