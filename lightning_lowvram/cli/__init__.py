"""The ``lowvram`` command: a Hydra app over the shipped ``conf/`` tree.

``lowvram fit [overrides...]`` composes ``conf/lowvram.yaml``, instantiates the model, data, callbacks and Trainer,
runs the fit (under the chosen GPU's memory, emulated when that GPU is not here) and prints a summary;
``strategy=auto`` lets the planner choose the strategies first. ``lowvram plan gpu=<card>`` prints the plan for the
model and data and writes a PNG chart, without training.
"""

from __future__ import annotations

import sys

from lightning_lowvram.cli.build import build
from lightning_lowvram.cli.checks import COMMANDS
from lightning_lowvram.cli.errors import ConfigError, NothingFits, _check_gpu_choice, _composition_error
from lightning_lowvram.cli.run import _hydra_main, format_summary, run

__all__ = ["COMMANDS", "ConfigError", "NothingFits", "build", "format_summary", "main", "run"]


def main(argv: list[str] | None = None) -> None:
    """Console entry point: ``lowvram <command> [hydra overrides...]``."""
    import hydra

    args = list(sys.argv[1:] if argv is None else argv)
    overrides = args
    if args and not args[0].startswith("-") and "=" not in args[0]:
        if args[0] not in COMMANDS:
            print(f"lowvram: error: unknown command {args[0]!r}; allowed: {', '.join(COMMANDS)}", file=sys.stderr)
            sys.exit(2)
        overrides = [*args[1:], f"command={args[0]}"]  # last, so Hydra flags (`--cfg job`) may come first
    error = _check_gpu_choice(overrides)
    if error:
        print(f"lowvram: error: {error}", file=sys.stderr)
        sys.exit(2)
    error = _composition_error(overrides)
    if error:
        print(f"lowvram: error: {error}", file=sys.stderr)
        sys.exit(2)
    sys.argv = [sys.argv[0], *overrides]
    app = hydra.main(config_path="pkg://lightning_lowvram.conf", config_name="lowvram", version_base="1.3")
    app(_hydra_main)()
