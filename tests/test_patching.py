"""The one patching helper: what it replaces is back as it was after undo, whatever the owner."""

import types

import pytest
import torch
from torch import nn

from lightning_lowvram._patching import patch, patched


def test_an_instance_hook_is_shadowed_and_the_class_and_other_instances_are_untouched():
    one, other = nn.Linear(2, 2), nn.Linear(2, 2)
    undo = patch(one, "forward", lambda original, x: original(x) * 0, wrap=True)
    assert one(torch.ones(1, 2)).abs().sum() == 0 and other(torch.ones(1, 2)).abs().sum() > 0
    assert "forward" not in vars(one)["_modules"] and "forward" in vars(one)
    undo()
    assert "forward" not in vars(one) and one(torch.ones(1, 2)).abs().sum() > 0
    undo()  # a second undo does nothing
    assert "forward" not in vars(one)


def test_a_module_global_and_a_class_attribute_come_back_even_after_an_error():
    module = types.ModuleType("foreign")
    module.answer = lambda: 1

    class Foreign:
        def size(self):
            return 1

    with pytest.raises(RuntimeError), patched(module, "answer", lambda: 2), patched(Foreign, "size", lambda s: 2):
        assert module.answer() == 2 and Foreign().size() == 2
        raise RuntimeError
    assert module.answer() == 1 and Foreign().size() == 1


def test_stacked_patches_undo_in_reverse_and_an_attribute_that_was_not_there_is_removed():
    box = types.SimpleNamespace()
    first = patch(box, "value", 1)
    second = patch(box, "value", 2)
    second()
    assert box.value == 1
    first()
    assert not hasattr(box, "value")


def test_nothing_in_the_package_patches_through_unittest_mock():
    from pathlib import Path

    import lightning_lowvram

    sources = Path(lightning_lowvram.__file__).parent.rglob("*.py")
    assert not [p.name for p in sources if "unittest" in p.read_text() and "mock" in p.read_text()]
