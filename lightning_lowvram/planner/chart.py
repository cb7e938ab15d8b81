"""Drawing a plan: each candidate's predicted peak by category against the card's budget, and its step time."""

from __future__ import annotations

from lightning_lowvram.planner.search import Plan, tensor_peak

CATEGORIES = ("parameters", "gradients", "optimizer", "activations", "temporaries", "buffers", "other")


def unit_for(largest: float) -> tuple[str, int]:
    """The binary unit that shows ``largest`` bytes as a number between 1 and 1024.

    Example:
        >>> unit_for(376 * 1024), unit_for(40 * 2**30)
        (('KiB', 1024), ('GiB', 1073741824))

    """
    for name, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if largest >= size:
            return name, size
    return "B", 1


def chart(result: Plan, path: str) -> str:
    """Write a PNG of the plan to ``path``; return ``path``.

    Left: each candidate's predicted tensor peak by category, in a unit that suits the sizes (bytes to GiB), against
    the budget line. Right: its predicted seconds per optimizer step; the chosen candidate marked.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    candidates = result.candidates
    labels = [("-> " if c is result.chosen else "") + c.label + ("" if c.traced else " ~") for c in candidates]
    unit, size = unit_for(max([result.budget, *(tensor_peak(c) for c in candidates)]))
    fig, (memory, time) = plt.subplots(
        1, 2, figsize=(13, 0.45 * len(labels) + 1.8), sharey=True, gridspec_kw={"width_ratios": [3, 1]}
    )
    left = [0.0] * len(labels)
    for category in CATEGORIES:
        values = [c.estimate.by_category.get(category, 0) / size for c in candidates]
        if any(values):
            memory.barh(labels, values, left=left, label=category)
            left = [a + b for a, b in zip(left, values, strict=True)]
    memory.axvline(result.budget / size, color="black", linestyle="--", label=f"budget ({result.gpu.name})")
    memory.invert_yaxis()
    memory.set_xlabel(f"predicted tensor peak ({unit})")
    memory.legend(loc="lower right", fontsize="small")
    colors = ["tab:green" if c is result.chosen else ("tab:blue" if c.fits else "tab:gray") for c in candidates]
    time.barh(labels, [c.step_time for c in candidates], color=colors)
    time.set_xlabel("predicted s / optimizer step")
    fig.suptitle(f"plan for {result.gpu.name}, batch {result.batch_size} (~: extrapolated; gray: does not fit)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
