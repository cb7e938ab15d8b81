"""Bad configuration as one line naming the key and the value: the errors and how a node's fault is blamed."""

from __future__ import annotations

import re
from typing import Any

from omegaconf import DictConfig

from lightning_lowvram.hydra_setup import NodeError


class NothingFits(RuntimeError):
    """Even the smallest setting exceeds the budget: printed as one paragraph of advice, exit status 1."""


class ConfigError(NodeError):
    """Bad configuration, reported as ``lowvram: error: <key>=<value>: <reason>`` before any training starts.

    Args:
        key: The config key at fault (dotted, as on the command line).
        value: Its value.
        reason: Why it was rejected.

    """


def _user_overrides() -> list[str]:
    """The command line's overrides (``key=value``), when running as the Hydra app."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def _blame(node: Any, prefix: str, reason: str) -> ConfigError:
    """The error for a rejected node: the argument its reason names (the user's override first), else its target."""
    pick = _blamed_key(node, prefix, reason)
    if pick is not None:
        return ConfigError(f"{prefix}.{pick}", node.get(pick), _drop_key(reason, f"{prefix}.{pick}"))
    group = prefix.split(".")[0]
    choice = next((o.split("=", 1)[1] for o in _user_overrides() if o.lstrip("+").startswith(f"{group}=")), None)
    if choice is not None and prefix == group:
        return ConfigError(group, choice, reason)
    return ConfigError(f"{prefix}._target_", node.get("_target_") if isinstance(node, DictConfig) else None, reason)


def _blamed_key(node: Any, prefix: str, reason: str) -> str | None:
    """The node's key a reason names (one the user overrode first), else the only one the user overrode."""
    keys = [k for k in (node.keys() if isinstance(node, DictConfig) else []) if not str(k).startswith("_")]
    named = [k for k in keys if re.search(rf"(?<!\w){re.escape(str(k))}(?!\w)", reason, re.IGNORECASE)]
    overridden = {o.lstrip("+~").split("=", 1)[0] for o in _user_overrides()}
    given = [k for k in keys if f"{prefix}.{k}" in overridden]
    pick = next((k for k in named if k in given), None) or (named[0] if named else None)
    return given[0] if pick is None and len(given) == 1 and not named else pick


def _drop_key(reason: str, key: str) -> str:
    """The reason without the key the line already names: ``"gpu.memory_gib must be > 0"`` -> ``"must be > 0"``.

    Also ``"path=x.txt: no such file"`` -> ``"no such file"``.
    """
    for prefix in (key, key.rsplit(".", 1)[-1]):
        if reason.startswith(prefix + " "):
            return reason[len(prefix) + 1 :]
        if reason.startswith(prefix + "=") and ": " in reason:
            return reason.split(": ", 1)[1]
    return reason


def _reason(err: BaseException) -> str:
    """The first line of what went wrong, without Hydra's "Error in call to target" wrapper."""
    cause = err.__cause__ if err.__cause__ is not None and str(err.__cause__) else err
    lines = [line.strip() for line in str(cause).strip().splitlines() if line.strip()] or [type(cause).__name__]
    text = " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]
    text = re.sub(r"^Error in call to target '[^']*':\s*", "", text)
    if type(cause).__name__ not in ("ValueError", "TypeError", "MisconfigurationException", "InstantiationException"):
        text = f"{type(cause).__name__}: {text}"
    return text


def _check_gpu_choice(overrides: list[str]) -> str | None:
    """One line for an unknown `gpu=<name>` (Hydra's own message spans many), unless a search path adds configs."""
    from lightning_lowvram.memory.profiles import known_gpus

    if any(o.lstrip("+~").startswith("hydra.searchpath") for o in overrides):
        return None
    for override in overrides:
        if override.startswith("gpu="):
            name = override.split("=", 1)[1]
            if name not in known_gpus():
                return f"gpu={name}: not a known GPU profile; known: {', '.join(known_gpus())}"
    return None


def _composition_error(overrides: list[str]) -> str | None:
    """Compose once before Hydra's app does, so an override Hydra rejects is one line naming it (Hydra exits 1)."""
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException

    if any(o.startswith("-") for o in overrides) or any(o.lstrip("+~").startswith("hydra") for o in overrides):
        return None  # Hydra's own flags and settings: let Hydra handle them
    try:
        with initialize_config_module("lightning_lowvram.conf", version_base="1.3"):
            compose("lowvram", overrides=overrides)
    except HydraException as err:
        return _override_error(overrides, err)
    return None


def _override_error(overrides: list[str], err: Exception) -> str:
    """Hydra's composition error as one line naming the override at fault."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = "; ".join(line for line in lines if not line.startswith("See https://")) or type(err).__name__
    unparsable = []
    for override in overrides:
        try:
            OverridesParser.create().parse_overrides([override])
        except HydraException:
            unparsable.append(override)
    if unparsable:
        return f"{unparsable[0]}: not a valid override ({text}); quote a value with '=' or spaces: key='value'"
    keys = [(o, o.lstrip("+~").split("=", 1)[0]) for o in overrides]
    quoted = next((o for o, k in keys if k and f"'{k}'" in text), None)
    culprit = quoted or next((o for o, k in keys if k in text), None)
    return f"{culprit}: {text}" if culprit else text
