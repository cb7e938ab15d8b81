"""A memory strategy declared outside the package, as a user's package would: the registry's test (test_registry)."""

from __future__ import annotations

import dataclasses

import lightning as L

from lightning_lowvram.registry import StepContext, Strategy


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    """``ToyCallback``'s arguments."""

    percent: int = 50


class ToyCallback(L.Callback):
    """Pretends to keep ``percent`` % of the parameters' bytes elsewhere (it changes nothing; its estimate says so).

    Example:
        >>> ToyCallback(25).summary()
        'toy: 25 % of the parameters elsewhere'

    """

    def __init__(self, percent: int = 50) -> None:
        if not 0 < percent <= 100:
            raise ValueError(f"percent must be in (0, 100], got {percent}")
        self.percent = percent

    def summary(self) -> str:
        """One line for the `lowvram` summary."""
        return f"toy: {self.percent} % of the parameters elsewhere"


def _model(estimate, value: int, ctx: StepContext):
    off = estimate.by_category["parameters"] * value // 100
    by_category = {**estimate.by_category, "parameters": estimate.by_category["parameters"] - off}
    by_phase = {phase: bytes_ - off for phase, bytes_ in estimate.by_phase.items()}
    return dataclasses.replace(estimate, peak=estimate.peak - off, by_category=by_category, by_phase=by_phase)


TOY = Strategy(
    name="toy",
    target="tests.toy_strategy.ToyCallback",
    config=ToyConfig,
    summary="keeps part of the parameters elsewhere (a test's toy)",
    off=0,
    choices=lambda ctx: [50] if ctx.options.get("allow_toy") and ctx.unsharded else [],
    model=_model,
    label=lambda value: f"toy {value}%",
    arguments=lambda value: {"percent": value},
    plan_options={"allow_toy": True},
)
