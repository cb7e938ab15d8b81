"""Reading saved artifacts the safe way, with one clear error for what is not one."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch


def load_weights_only(path: str | Path, what: str) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; a ``ValueError`` naming ``what`` was expected otherwise."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # missing, truncated, not a torch file, pickled code
        raise ValueError(f"{path}: not a readable {what} ({type(exc).__name__}: {exc})") from exc


def check_writable(path: str | Path, key: str) -> None:
    """Fail before any work when a file cannot be written at ``path`` (named ``key`` in the error).

    The nearest existing ancestor must be a writable directory; nothing is created.

    Example:
        >>> check_writable("/dev/null/x.pt", "save_path")
        Traceback (most recent call last):
        ...
        ValueError: save_path cannot be written at '/dev/null/x.pt': /dev/null is not a directory

    """
    target = Path(path).expanduser().absolute()
    if target.is_dir():
        raise ValueError(f"{key} cannot be written at {str(path)!r}: it is a directory")
    parent = target.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{key} cannot be written at {str(path)!r}: {parent} is not a directory")
    if not os.access(parent, os.W_OK):
        raise ValueError(f"{key} cannot be written at {str(path)!r}: {parent} is not writable")
