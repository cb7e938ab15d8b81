"""AutoMicroBatchCallback on the architectures users bring: a split batch equals the whole batch, HF losses included."""

import copy
import warnings

import pytest
import torch
from torch.utils.data import DataLoader

from lightning_lowvram import AutoMicroBatchCallback
from tests.helpers import quiet_trainer
from tests.real_models.models import HFModule, build, hf_batches, hf_model

CASES = [  # model, the count that matches its HF loss (None: a mean over samples)
    ("gpt2", "causal_lm_tokens"),
    ("llama", "causal_lm_tokens"),
    ("bert", None),
    ("bert_mlm", "label_tokens"),
]


def _fit(name, callbacks, steps=2, encoding=False):
    module = HFModule(hf_model(name), lr=0.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(max_steps=steps, callbacks=callbacks).fit(module, hf_batches(name, encoding=encoding))
    return module, [str(w.message) for w in caught if "count_fn" in str(w.message)]


def _max_diff(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return max(float((sa[k] - sb[k]).abs().max()) for k in sa)


@pytest.mark.parametrize(("name", "count"), CASES)
def test_split_run_equals_the_unsplit_run(name, count):
    reference, _ = _fit(name, [])
    split, warned = _fit(name, [AutoMicroBatchCallback(micro_batch_size=2, count_fn=count)], encoding=True)
    assert _max_diff(split, reference) <= 1e-6
    assert not warned


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert_mlm"])
def test_ignored_labels_without_a_count_warn_once_and_are_not_exact(name):
    reference, _ = _fit(name, [])
    split, warned = _fit(name, [AutoMicroBatchCallback(micro_batch_size=2)])
    assert len(warned) == 1 and "causal_lm_tokens" in warned[0]
    assert _max_diff(split, reference) > 1e-5  # what the warning is about


def test_a_count_of_zero_or_not_a_number_is_one_clear_error():
    with pytest.raises(ValueError, match="count_fn must be a callable or one of 'causal_lm_tokens'"):
        AutoMicroBatchCallback(count_fn="tokens")
    for bad, match in ((lambda b: 0, "returned 0 for a whole batch"), (lambda b: "many", "got 'many'")):
        module, loader = build("gpt2")
        weights = copy.deepcopy(module.state_dict())
        with pytest.raises(ValueError, match=match):
            quiet_trainer(max_steps=1, callbacks=[AutoMicroBatchCallback(2, count_fn=bad)]).fit(module, loader)
        assert all(torch.equal(v, weights[k]) for k, v in module.state_dict().items())  # before any update


def test_micro_batches_with_no_label_tokens_are_skipped_not_nan():
    module, loader = build("gpt2")
    batch = next(iter(loader))
    batch["labels"][:2] = -100  # the first micro-batch has nothing to predict
    quiet_trainer(max_steps=1, callbacks=[AutoMicroBatchCallback(2, count_fn="causal_lm_tokens")]).fit(
        module, DataLoader([batch], batch_size=None)
    )
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_conv_batchnorm_net_splits_with_the_batchnorm_warning():
    module, loader = build("resnet")
    with pytest.warns(UserWarning, match="BatchNorm"):
        quiet_trainer(max_steps=2, callbacks=[AutoMicroBatchCallback(micro_batch_size=4)]).fit(module, loader)
    assert all(torch.isfinite(p).all() for p in module.parameters())
