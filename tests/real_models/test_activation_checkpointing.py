"""ActivationCheckpointingCallback on the architectures users bring: exact, and BatchNorm statistics updated once."""

import copy

import pytest
import torch

from lightning_lowvram import ActivationCheckpointingCallback
from lightning_lowvram.checkpointing import repeated_blocks
from tests.helpers import quiet_trainer
from tests.real_models.models import NAMES, build


@pytest.mark.parametrize("name", NAMES)
def test_checkpointed_fit_equals_the_plain_fit_buffers_included(name):
    module, loader = build(name)
    assert len(repeated_blocks(module)) >= 2  # what the callback wraps
    reference = copy.deepcopy(module)
    quiet_trainer(max_steps=3).fit(reference, loader)
    callback = ActivationCheckpointingCallback()
    quiet_trainer(max_steps=3, callbacks=[callback]).fit(module, loader)
    expected = reference.state_dict()
    for key, value in module.state_dict().items():  # running_mean/var and num_batches_tracked included
        torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-6, msg=key)
    if name == "resnet":
        bn = module.net.layer1[0].bn1
        assert int(bn.num_batches_tracked) == 3  # once per step, not twice
    else:
        assert module.model.config.use_cache  # turned off while checkpointed only
