"""Reading saved artifacts the safe way, with one clear error for what is not one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def load_weights_only(path: str | Path, what: str) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; a ``ValueError`` naming ``what`` was expected otherwise."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # missing, truncated, not a torch file, pickled code
        raise ValueError(f"{path}: not a readable {what} ({type(exc).__name__}: {exc})") from exc
