"""Will it fit, and how fast: estimates from a fake-tensor trace and the cheapest setting that fits a card.

``estimate`` traces one step (``cuda_rules`` emulate the card), ``search`` ranks the settings, ``chart`` draws them.
Nothing here imports the callbacks: ``plan_callbacks(plan)`` in :mod:`lightning_lowvram.callbacks` turns a plan into
them.
"""

from lightning_lowvram.planner.estimate import MemoryEstimate, estimate_step_memory
from lightning_lowvram.planner.eval_search import EvalCandidate, EvalPlan, plan_eval
from lightning_lowvram.planner.evaluation import estimate_eval_memory
from lightning_lowvram.planner.search import Candidate, Plan, plan

__all__ = [
    "Candidate", "EvalCandidate", "EvalPlan", "MemoryEstimate", "Plan", "estimate_eval_memory", "estimate_step_memory",
    "plan", "plan_eval",
]  # fmt: skip
