"""Turn a plan into the callbacks that run it (the planner itself never imports the callbacks)."""

from __future__ import annotations

from typing import Any

from lightning_lowvram.planner.eval_search import EvalPlan
from lightning_lowvram.planner.search import Plan


def plan_callbacks(plan: Plan) -> list[Any]:
    """Callbacks of the plan's chosen setting (micro-batching keeps the effective batch); none if nothing fits.

    Each strategy of the setting builds its own callback (:meth:`lightning_lowvram.registry.Strategy.build`), in
    registry order; a strategy that is the Trainer's own (FSDP2) is in ``plan.trainer_kwargs()`` instead.

    Example:
        >>> import torch
        >>> from lightning_lowvram.demo import DigitsMLP
        >>> from lightning_lowvram.planner import plan
        >>> p = plan(DigitsMLP(), (torch.zeros(64, 64), torch.zeros(64, dtype=torch.long)), "rtx3060_12gb")
        >>> plan_callbacks(p)
        []

    """
    return [strategy.build(value) for strategy, value in plan.settings() if strategy.kind == "callback"]


def eval_plan_callbacks(plan: EvalPlan) -> list[Any]:
    """Callbacks of an evaluation plan's chosen setting (:func:`~lightning_lowvram.plan_eval`), in registry order.

    Example:
        >>> import torch
        >>> from lightning_lowvram.demo import DigitsMLP
        >>> from lightning_lowvram.planner import plan_eval
        >>> eval_plan_callbacks(plan_eval(DigitsMLP(), (torch.zeros(8, 64), torch.zeros(8).long()), "rtx3060_12gb"))
        []

    """
    from lightning_lowvram.registry import get

    chosen = plan.chosen
    return [get(name).load()(**args) for name, args in chosen.callbacks().items()] if chosen is not None else []
