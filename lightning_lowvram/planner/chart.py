"""Drawing a plan: one bar per candidate, its predicted peak by category against the card's budget."""

from __future__ import annotations

from lightning_lowvram.planner.search import Plan


def chart(result: Plan, path: str) -> str:
    """A PNG of each candidate's predicted tensor peak by category, against the card's budget line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    categories = ["parameters", "gradients", "optimizer", "activations", "temporaries", "buffers", "other"]
    labels = [("-> " if c is result.chosen else "") + c.label for c in result.candidates]
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(labels) + 1.5))
    left = [0.0] * len(labels)
    for category in categories:
        values = [c.estimate.by_category.get(category, 0) / 2**30 for c in result.candidates]
        if any(values):
            ax.barh(labels, values, left=left, label=category)
            left = [a + b for a, b in zip(left, values, strict=True)]
    ax.axvline(result.budget / 2**30, color="black", linestyle="--", label=f"budget ({result.gpu.name})")
    ax.invert_yaxis()
    ax.set_xlabel("predicted peak (GiB)")
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
