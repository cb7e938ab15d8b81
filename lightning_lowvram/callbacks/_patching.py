"""Replace a module's method for the length of a run, as an instance attribute, and put back what was there."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from torch import nn

_MISSING = object()


def patch_method(module: nn.Module, name: str, replacement: Callable[..., Any]) -> Callable[[], None]:
    """Make ``module.<name>(*args)`` call ``replacement(original, *args)``; return the function that undoes it.

    The class and other instances are untouched; ``functools.wraps`` keeps the original reachable as ``__wrapped__``.
    """
    previous = module.__dict__.get(name, _MISSING)
    original = getattr(module, name)

    @functools.wraps(original)
    def patched(*args: Any, **kwargs: Any) -> Any:
        return replacement(original, *args, **kwargs)

    module.__dict__[name] = patched

    def undo() -> None:
        if previous is _MISSING:
            module.__dict__.pop(name, None)
        else:
            module.__dict__[name] = previous

    return undo
