"""The memory strategies, each declared once: what the callbacks, the estimator, the planner, Hydra and the CLI read.

A :class:`Strategy` names its callback (or Lightning strategy), the dataclass of its arguments (primitive and Literal
fields: what Hydra, LightningCLI and Python all pass), its one-line summary, how it changes a step's estimate
(applied to the traced copy, or modelled on the traced bytes) and the values the planner may try. The built-in
strategies are declared in :mod:`lightning_lowvram.registry.builtin`; a package of yours adds one with
:func:`register` (or an entry point in the ``lightning_lowvram.strategies`` group naming a module that registers on
import), and it appears in ``estimate_step_memory(strategies=...)``, in the plan, in ``plan_callbacks``, in
``Plan.overrides``, in the Hydra tree (``callbacks=[...,lowvram_<name>]``) and in the CLI's checks, with no other
edit.

This package imports neither Lightning, the callbacks, the planner nor Hydra (the built-ins' hooks import the cores
when called): they all import it.

Example:
    >>> sorted(s.name for s in strategies())[:3]
    ['activation_checkpointing', 'chunked_cross_entropy', 'dynamic_quant']
    >>> get("low_bit_base").node
    'lowvram_low_bit_base'

"""

from __future__ import annotations

import dataclasses
import importlib
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

Value = Any  # a strategy's setting in a plan (its ``off`` value: not used)


@dataclasses.dataclass(frozen=True)
class StepContext:
    """The step a strategy's hooks look at: the model, its other settings and the user's switches.

    Attributes:
        module: The LightningModule planned for (do not modify it).
        precision: The step's precision (``"32-true"``, ``"bf16-mixed"``...).
        precisions: Every precision the plan considers (an estimate: its own).
        unsharded: The setting keeps the whole state on each card (one card, or DDP).
        chunked: The setting computes a causal LM's loss in chunks (``ChunkedCrossEntropyCallback``).
        options: The plan's switches (``plan(..., allow_low_bit_base=True)``, ``strategy.allow_...=`` on the command
            line): every strategy's :attr:`Strategy.plan_options`, as given or defaulted.
        cache: A dict shared by one plan's calls, for values worth computing once.

    """

    module: Any
    precision: str
    precisions: tuple[str, ...]
    unsharded: bool
    chunked: bool
    options: Mapping[str, Any]
    cache: dict[Any, Any]
    optimizer: Any = None  # ``estimate_step_memory(optimizer=...)``: the optimizer factory in place of the module's


def _no_label(value: Value) -> str:
    return ""


def _one(value: Value) -> int:
    return 1


def _none(value: Value) -> dict[str, Any]:
    return {}


@dataclasses.dataclass(frozen=True)
class Strategy:
    """One memory strategy, declared once.

    Attributes:
        name: Its key (``optimizer_8bit``): in ``estimate_step_memory(strategies={name: value})``, in a plan's
            settings and, as ``lowvram_<name>``, its Hydra node.
        target: The dotted path of its callback class (or, with ``kind="trainer_strategy"``, of its Lightning
            strategy), imported only when built.
        config: A dataclass of the target's arguments with their defaults: the Hydra node is checked against it, the
            CLI validates a node's keys and values with it.
        summary: One line: what it does (the node's comment, the docs' first line).
        node: The Hydra node under ``conf/callbacks`` (default ``lowvram_<name>``).
        kind: ``"callback"`` (a Lightning callback) or ``"trainer_strategy"`` (the Trainer's ``strategy``).
        off: The value that means "not used".
        axis: A setting the planner's search builds itself (micro-batch size, checkpointing, the chunked loss,
            sharding): its values come from the search, not from ``choices``.
        choices: The values besides ``off`` the planner may try in a setting (``StepContext`` -> values); ``None``:
            the planner never tries it.
        trace: ``estimate_step_memory`` arguments that trace a value (the built-ins' flags); ``None``: none.
        prepare: Apply a value to the traced copy of the module (a strategy that changes the model):
            ``prepare(copy, value)``; the copy is on fake tensors.
        model: Change a traced estimate for a value without tracing it: ``model(estimate, value, context)`` returns
            the new :class:`~lightning_lowvram.planner.MemoryEstimate` (``dataclasses.replace`` of it).
        label: The plan table's words for a value (``"8-bit optimizer"``).
        changes: How much a value changes the user's setup (the planner's tie-break among equal step times).
        arguments: The target's arguments for a planned value (defaults left out).
        overrides: The Hydra overrides for a planned value beyond ``callbacks=[...]`` (default: ``arguments`` as
            ``callbacks.<node>.<key>=<value>``).
        plan_options: The plan's switches for it and their defaults (``allow_low_bit_base: False``): arguments of
            ``plan`` and keys of ``strategy=auto``.
        requires: Refuse a model the built callback cannot apply to, before any step: ``requires(model, callback)``
            raises ``ValueError`` with the reason (a low-bit base needs frozen layers).

    """

    name: str
    target: str
    config: type
    summary: str
    node: str = ""
    kind: Literal["callback", "trainer_strategy"] = "callback"
    off: Value = False
    axis: bool = False
    choices: Callable[[StepContext], Sequence[Value]] | None = None
    trace: Callable[[Value], Mapping[str, Any]] | None = None
    prepare: Callable[[Any, Value], None] | None = None
    model: Callable[[Any, Value, StepContext], Any] | None = None
    label: Callable[[Value], str] = _no_label
    changes: Callable[[Value], int] = _one
    arguments: Callable[[Value], dict[str, Any]] = _none
    overrides: Callable[[Value], list[str]] | None = None
    plan_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    requires: Callable[[Any, Any], None] | None = None

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"a strategy's name must be an identifier, got {self.name!r}")
        if not dataclasses.is_dataclass(self.config):
            raise ValueError(f"strategy {self.name!r}: config must be a dataclass, got {self.config!r}")
        if not self.node:
            object.__setattr__(self, "node", f"lowvram_{self.name}")

    def load(self) -> type:
        """The target class."""
        module, _, name = self.target.rpartition(".")
        return getattr(importlib.import_module(module), name)

    def build(self, value: Value) -> Any:
        """The target for a planned value."""
        return self.load()(**self.arguments(value))

    def override_lines(self, value: Value) -> list[str]:
        """Hydra overrides of a planned value, beyond putting its node in ``callbacks``."""
        if self.overrides is not None:
            return self.overrides(value)
        return [f"callbacks.{self.node}.{k}={as_override(v)}" for k, v in self.arguments(value).items()]

    def defaults(self) -> dict[str, Any]:
        """The config's fields and defaults, in order."""
        return {f.name: _default(f) for f in dataclasses.fields(self.config)}

    def check(self, node: Mapping[str, Any]) -> tuple[str, Any, str] | None:
        """``(key, value, reason)`` for the first key of a Hydra node its config refuses, else ``None``.

        Keys starting with ``_`` (``_target_``) are Hydra's. A value must match its field's type (``Literal``
        members, ``bool``, ``int``, ``float``, ``str``, ``None``, lists of those); the target checks ranges itself.
        """
        fields = {f.name: f for f in dataclasses.fields(self.config)}
        hints = typing.get_type_hints(self.config)
        for key, value in node.items():
            if str(key).startswith("_"):
                continue
            if key not in fields:
                return key, value, f"unknown key for {self.node}; it takes {', '.join(fields)}"
            if not _matches(value, hints[key]):
                return key, value, f"must be {_describe(hints[key])}"
        return None


def _default(field: dataclasses.Field[Any]) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    raise ValueError(f"config field {field.name!r} needs a default")


def as_override(value: Any) -> str:
    """A value as a Hydra override writes it: ``null``, ``true``, ``[a,b]``.

    Example:
        >>> as_override([True, None, 4])
        '[true,null,4]'

    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple):
        return "[" + ",".join(as_override(v) for v in value) + "]"
    return str(value)


_SCALARS: dict[Any, Callable[[Any], bool]] = {
    bool: lambda v: isinstance(v, bool),
    int: lambda v: isinstance(v, int) and not isinstance(v, bool),
    float: lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    str: lambda v: isinstance(v, str),
    type(None): lambda v: v is None,
}


def _matches(value: Any, hint: Any) -> bool:
    """Whether a config value fits a field's type: Literal members, unions, lists of those, primitives."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin is Literal:
        return any(value == arg and type(value) is type(arg) for arg in args)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in args)
    if origin in (list, tuple, Sequence):
        listed = isinstance(value, Sequence) and not isinstance(value, str)
        return listed and all(_matches(v, args[0] if args else Any) for v in value)
    return _SCALARS.get(hint, lambda v: not isinstance(hint, type) or isinstance(v, hint))(value)


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if origin in (list, tuple, Sequence):
        return "a list"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


_REGISTRY: dict[str, Strategy] = {}
_LISTENERS: list[Callable[[Strategy], None]] = []
_loaded = False


def register(strategy: Strategy) -> Strategy:
    """Add a strategy, or replace one of the same name, and return it.

    Example:
        >>> import dataclasses
        >>> @dataclasses.dataclass(frozen=True)
        ... class NoArguments:
        ...     pass
        >>> s = register(Strategy("example", "lightning.pytorch.callbacks.Callback", NoArguments, "does nothing"))
        >>> get("example") is s
        True
        >>> unregister("example")

    """
    _load_builtins()
    _REGISTRY[strategy.name] = strategy
    for listener in _LISTENERS:
        listener(strategy)
    return strategy


def unregister(name: str) -> None:
    """Remove a strategy registered by name (a test's toy one)."""
    _REGISTRY.pop(name, None)


def strategies() -> list[Strategy]:
    """Every registered strategy, the built-ins first, in the order of a plan's label and callbacks."""
    _load_builtins()
    return list(_REGISTRY.values())


def get(name: str) -> Strategy:
    """The strategy called ``name``.

    Raises:
        KeyError: No strategy of that name, naming the registered ones.

    """
    _load_builtins()
    if name not in _REGISTRY:
        raise KeyError(f"no strategy {name!r}; registered: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def by_target() -> dict[type, Strategy]:
    """The strategies by the class they build (imports every target: for the Hydra and CLI layers)."""
    return {s.load(): s for s in strategies()}


def on_register(listener: Callable[[Strategy], None]) -> None:
    """Call ``listener`` for every strategy registered so far and later (the Hydra layer stores their nodes)."""
    _LISTENERS.append(listener)
    for strategy in strategies():
        listener(strategy)


def settings_of(values: Mapping[str, Value]) -> Iterator[tuple[Strategy, Value]]:
    """``(strategy, value)`` in registry order for the values that are not the strategy's ``off``.

    Raises:
        KeyError: A name no strategy has.

    """
    for name in values:
        get(name)
    for strategy in strategies():
        if strategy.name in values and values[strategy.name] != strategy.off:
            yield strategy, values[strategy.name]


def _load_builtins() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    importlib.import_module("lightning_lowvram.registry.builtin")
    from importlib.metadata import entry_points

    for entry in entry_points(group="lightning_lowvram.strategies"):
        entry.load()
