import dataclasses
from collections import namedtuple

import pytest
import torch

from lightning_lowvram.cores.batches import batch_size_of, merge_outputs, micro_batch_bounds, slice_batch, split_batch

Pair = namedtuple("Pair", ["x", "y"])


@dataclasses.dataclass
class Sample:
    x: torch.Tensor
    names: list
    scale: float = 1.0


def test_structures_are_split_and_rejoined_losslessly():
    batch = {
        "x": torch.arange(10).view(5, 2),
        "pair": Pair(torch.arange(5), torch.ones(5, 3)),
        "ids": ["a", "b", "c", "d", "e"],
        "cfg": "keep",
        "weights": torch.ones(7),  # another length: passed unchanged
    }
    parts = split_batch(batch, 2)
    assert [batch_size_of(p) for p in parts] == [2, 2, 1]
    assert parts[2]["ids"] == ["e"] and parts[1]["cfg"] == "keep" and parts[0]["weights"].shape == (7,)
    assert isinstance(parts[0]["pair"], Pair)
    merged = merge_outputs(parts)
    assert torch.equal(merged["x"], batch["x"]) and torch.equal(merged["pair"].y, batch["pair"].y)
    assert merged["ids"] == batch["ids"]


def test_dataclass_and_tuple_batches():
    sample = Sample(torch.arange(6), list("abcdef"), 2.0)
    first, second = split_batch(sample, 3)
    assert first.names == ["a", "b", "c"] and second.x.tolist() == [3, 4, 5] and second.scale == 2.0
    x, y = slice_batch((torch.arange(4), torch.arange(4) * 2), 1, 3)
    assert y.tolist() == [2, 4]


def test_bounds():
    assert micro_batch_bounds(7, 7) == [(0, 7)]
    assert micro_batch_bounds(7, 100) == [(0, 7)]
    with pytest.raises(ValueError, match="micro_batch_size must be >= 1"):
        micro_batch_bounds(7, 0)


def test_custom_slice_fn_for_unknown_types():
    class Tokens:
        def __init__(self, ids):
            self.ids = ids

    batch = {"tok": Tokens(torch.arange(5)), "label": torch.arange(5)}
    parts = split_batch(batch, 2, slice_fn=lambda b, s, e: {"tok": Tokens(b["tok"].ids[s:e]), "label": b["label"][s:e]})
    assert [p["tok"].ids.tolist() for p in parts] == [[0, 1], [2, 3], [4]]
