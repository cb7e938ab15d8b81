"""The one way this package replaces an attribute of an object it does not own, and puts back what was there.

:func:`patch` sets the replacement in the owner's own namespace (an instance attribute that shadows its class's
method, a module's global, a class attribute) and returns the function that undoes it; :func:`patched` is the same
as a context manager. Undoing restores exactly what that namespace held before, or removes the entry if it held
nothing, so the class and other instances are untouched and a second undo does nothing. Stacked patches of one
attribute are undone in reverse order, as context managers nest. ``wrap=True`` makes the replacement a wrapper:
it is called as ``replacement(original, *args, **kwargs)``.

Used for a LightningModule's hooks while a callback runs (``log``, ``configure_optimizers``, ``on_load_checkpoint``),
``torch.distributed``'s collectives under the OOM guard, the tracker's byte count under the CUDA rules and
transformers' mask checks during a trace. The strategies that transform a model's own modules (checkpointed blocks,
tiled MLPs, the chunked head) keep their marker in the module instead, so a deep copy carries them.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

_MISSING = object()


def patch(owner: Any, name: str, replacement: Any, *, wrap: bool = False) -> Callable[[], None]:
    """Set ``owner.<name>`` to ``replacement`` (``wrap``: a wrapper calling it with the original first); return undo.

    Example:
        >>> import types
        >>> box = types.SimpleNamespace(greet=lambda who: f"hello {who}")
        >>> undo = patch(box, "greet", lambda original, who: original(who).upper(), wrap=True)
        >>> box.greet("you")
        'HELLO YOU'
        >>> undo(); undo(); box.greet("you")
        'hello you'

    """
    namespace = vars(owner)
    previous = namespace.get(name, _MISSING)
    value = replacement
    if wrap:
        original = getattr(owner, name)

        @functools.wraps(original)
        def value(*args: Any, **kwargs: Any) -> Any:
            return replacement(original, *args, **kwargs)

    _set(owner, name, value)
    undone = False

    def undo() -> None:
        nonlocal undone
        if undone:
            return
        undone = True
        if previous is _MISSING:
            _delete(owner, name)
        else:
            _set(owner, name, previous)

    return undo


@contextlib.contextmanager
def patched(owner: Any, name: str, replacement: Any, *, wrap: bool = False) -> Iterator[None]:
    """:func:`patch` for the length of a ``with`` block.

    Example:
        >>> import math
        >>> with patched(math, "pi", 3):
        ...     math.pi
        3
        >>> round(math.pi, 2)
        3.14

    """
    undo = patch(owner, name, replacement, wrap=wrap)
    try:
        yield
    finally:
        undo()


def _set(owner: Any, name: str, value: Any) -> None:
    if isinstance(owner, type):
        setattr(owner, name, value)
    else:  # the instance's own namespace: past ``nn.Module.__setattr__``'s bookkeeping, as a plain attribute
        vars(owner)[name] = value


def _delete(owner: Any, name: str) -> None:
    if isinstance(owner, type):
        delattr(owner, name)
    else:
        vars(owner).pop(name, None)
