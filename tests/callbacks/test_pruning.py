import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader

from lightning_lowvram import AutoMicroBatchCallback, MemoryReportCallback, PruningCallback, load_pruned
from lightning_lowvram.cores.pruning import state_bytes
from lightning_lowvram.demo import DigitsDataModule, DigitsMLP, TinyGPT, TinyTextDataModule
from tests.ddp import run_ddp
from tests.helpers import RecordingLogger, quiet_trainer, seeded_fit


class OrderedDigits(DigitsDataModule):
    """No shuffling: a resumed run sees the batches an uninterrupted one does."""

    def train_dataloader(self):
        return DataLoader(self.splits["train"], batch_size=self.batch_size, shuffle=False)


def _total(model, trainer):
    return sum(state_bytes(model, trainer.optimizers).values())


@pytest.mark.parametrize(
    ("make_model", "make_data"),
    [
        (lambda: DigitsMLP(), lambda: DigitsDataModule(batch_size=64)),
        (lambda: TinyGPT(seq_len=64, d_model=128, n_head=4, n_layer=2), lambda: TinyTextDataModule(batch_size=8)),
    ],
    ids=["digits_mlp", "tiny_gpt"],
)
def test_structured_half_cuts_state_bytes_and_the_step_peak(make_model, make_data):
    L.seed_everything(0)
    plain_model, plain_report = make_model(), MemoryReportCallback(stages=["fit"], print_table=False)
    plain = seeded_fit(plain_model, make_data(), [plain_report])
    L.seed_everything(0)
    model, report = make_model(), MemoryReportCallback(stages=["fit"], print_table=False)
    pruned = seeded_fit(model, make_data(), [PruningCallback(0.5, schedule="once"), report])
    ratio = _total(model, pruned) / _total(plain_model, plain)  # params + grads + AdamW state, from the tensors
    assert ratio <= 0.55
    assert report.reports["fit"].total < plain_report.reports["fit"].total


def test_once_prunes_before_the_optimizer_exists():
    seen = []

    class Spy(Callback):
        def on_fit_start(self, trainer, pl_module):
            seen.append([tuple(p.shape) for g in trainer.optimizers[0].param_groups for p in g["params"]])

    model = DigitsMLP(hidden=64)
    pruning = PruningCallback(0.5, schedule="once")
    seeded_fit(model, DigitsDataModule(), [pruning, Spy()])
    assert seen[0] == [tuple(p.shape) for p in model.parameters()] and seen[0][0] == (32, 64)
    assert pruning.events == [-1]


def test_gradual_structured_rebuilds_the_optimizer_and_keeps_training_the_model():
    class Watch(Callback):
        def __init__(self):
            self.rows = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            opt = trainer.optimizers[0]
            params = [p for g in opt.param_groups for p in g["params"]]
            self.rows.append(
                {
                    "same": [id(p) for p in params] == [id(p) for p in pl_module.parameters()],
                    "state": all(s["exp_avg"].shape == p.shape for p, s in opt.state.items()),
                    "lr": opt.param_groups[0]["lr"],
                    "weight": pl_module.net[0].weight.detach().clone(),
                }
            )

    class WithScheduler(DigitsMLP):
        def configure_optimizers(self):
            opt = torch.optim.AdamW(self.parameters(), lr=0.01)
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)}

    model, watch = WithScheduler(hidden=64), Watch()
    pruning = PruningCallback(0.5, start_step=2, end_step=8, frequency=2)
    seeded_fit(model, DigitsDataModule(batch_size=64), [pruning, watch], max_steps=40, max_epochs=3)
    assert pruning.events == [4, 6, 8] and pruning.fraction == 0.5  # cubic: 0 at start_step itself
    assert model.net[0].out_features == 32
    assert all(row["same"] and row["state"] for row in watch.rows)  # no stale full-size parameters or state
    assert watch.rows[-1]["lr"] == pytest.approx(0.01 * 0.5**2)  # the scheduler's position survived the rebuilds
    last = watch.rows[8:]  # after the last pruning step the weights keep changing: the new optimizer updates them
    assert all(not torch.equal(a["weight"], b["weight"]) for a, b in zip(last, last[1:], strict=False))


def test_unstructured_masks_are_bool_applied_after_every_step_and_made_permanent():
    class Check(Callback):
        def __init__(self, pruning):
            self.pruning, self.extra, self.ok = pruning, [], []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            masks = self.pruning.masks
            layers = dict(pl_module.named_modules())
            self.ok.append(all(bool((layers[n].weight[~m] == 0).all()) for n, m in masks.items()))
            pruned_bytes = sum(layers[n].weight.nbytes for n in masks)
            self.extra.append(sum(m.nbytes for m in masks.values()) / pruned_bytes)
            assert not any(name.endswith("_orig") or name.endswith("_mask") for name, _ in pl_module.named_buffers())

    model = DigitsMLP(hidden=64)
    pruning = PruningCallback(0.6, method="unstructured", schedule="once", scope="global")
    check = Check(pruning)
    seeded_fit(model, DigitsDataModule(), [pruning, check], max_steps=5)
    assert all(check.ok) and max(check.extra) <= 0.25  # bool: 1 byte per 4-byte weight, nothing else
    weights = [model.net[0].weight, model.net[2].weight]  # the output layer net[4] is never pruned
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros == pytest.approx(0.6, abs=0.01)
    assert pruning._hooks == [] and all(m.device.type == "cpu" for m in pruning.masks.values())  # permanent
    assert (model.net[0].bias != 0).all()  # biases are never masked
    assert (model.net[4].weight != 0).all()


def test_callable_schedule_and_random_criterion():
    pruning = PruningCallback(method="unstructured", criterion="random", schedule=lambda step: min(step, 4) / 10)
    seeded_fit(DigitsMLP(hidden=32), DigitsDataModule(), [pruning], max_steps=6)
    assert pruning.events == [1, 2, 3, 4] and pruning.fraction == 0.4


@pytest.mark.parametrize("method", ["structured", "unstructured"])
def test_resuming_mid_schedule_ends_like_an_uninterrupted_run(method, tmp_path):
    def run(epochs):
        L.seed_everything(0)
        model = DigitsMLP(hidden=64)
        pruning = PruningCallback(0.5, method=method, start_step=0, end_step=30, frequency=5)
        trainer = seeded_fit(model, OrderedDigits(batch_size=64), [pruning], max_steps=-1, max_epochs=epochs)
        return model, pruning, trainer

    full, full_pruning, _ = run(3)
    first, _, trainer = run(1)  # 20 steps: the schedule is half done
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    L.seed_everything(0)
    resumed, pruning = DigitsMLP(hidden=64), PruningCallback(0.5, method=method, start_step=0, end_step=30, frequency=5)
    trainer = quiet_trainer(max_epochs=3, limit_val_batches=0, callbacks=[pruning])
    trainer.fit(resumed, datamodule=OrderedDigits(batch_size=64), ckpt_path=tmp_path / "mid.ckpt")
    assert pruning.events == full_pruning.events and pruning.fraction == 0.5
    for (name, a), b in zip(resumed.state_dict().items(), full.state_dict().values(), strict=True):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-6), name


def test_load_pruned_rebuilds_shapes_from_a_weights_only_checkpoint(tmp_path):
    model = TinyGPT(seq_len=32, d_model=64, n_head=4, n_layer=1)
    trainer = seeded_fit(
        model,
        TinyTextDataModule(seq_len=32, batch_size=4),
        [PruningCallback(0.5, start_step=0, end_step=2, frequency=1)],
    )
    trainer.save_checkpoint(tmp_path / "pruned.ckpt")
    torch.load(tmp_path / "pruned.ckpt", weights_only=True)  # tensors and plain data only
    fresh = load_pruned(TinyGPT(seq_len=32, d_model=64, n_head=4, n_layer=1), tmp_path / "pruned.ckpt")
    idx = torch.randint(0, 256, (2, 32))
    model.eval(), fresh.eval()
    assert torch.equal(fresh(idx), model(idx))
    assert sum(p.numel() for p in fresh.parameters()) < sum(p.numel() for p in TinyGPT(32, 64, 4, 1).parameters())


def test_structured_gradual_keeps_digits_accuracy_within_one_and_a_half_points():
    def accuracy(callbacks):
        L.seed_everything(0)
        model, data = DigitsMLP(hidden=128), DigitsDataModule(batch_size=64)
        trainer = quiet_trainer(max_epochs=12, limit_val_batches=0, callbacks=callbacks)
        trainer.fit(model, datamodule=data)
        return trainer.test(model, datamodule=data, verbose=False)[0]["test/acc"]

    plain = accuracy([])
    pruned = accuracy([PruningCallback(0.5, schedule="gradual", start_step=20, end_step=120, frequency=20)])
    assert pruned >= plain - 0.015, (pruned, plain)


def test_sparsity_parameters_and_bytes_reach_the_loggers():
    logger = RecordingLogger()
    model = DigitsMLP(hidden=64)
    seeded_fit(
        model, DigitsDataModule(), [PruningCallback(0.5, schedule="once")], max_steps=-1, max_epochs=1, logger=logger
    )
    params = sum(p.numel() for p in model.parameters())
    assert logger.metrics["lowvram/pruning/parameters"] == params
    assert logger.metrics["lowvram/pruning/parameter_bytes"] == params * 4
    assert 0.5 < logger.metrics["lowvram/pruning/sparsity"] < 0.75


def test_with_auto_micro_batching():
    model = DigitsMLP(hidden=64)
    micro = AutoMicroBatchCallback(micro_batch_size=16)
    pruning = PruningCallback(0.5, start_step=0, end_step=4, frequency=2)
    seeded_fit(model, DigitsDataModule(batch_size=64), [micro, pruning], max_steps=6)
    assert model.net[0].out_features == 32 and micro.micro_batches == 4 and pruning.events == [2, 4]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"amount": 1.0}, r"amount must be a number in \[0, 1\), got 1.0"),
        ({"amount": -0.1}, r"amount must be a number in \[0, 1\)"),
        ({"criterion": "taylor"}, "criterion must be one of 'magnitude', 'random', got 'taylor'"),
        ({"method": "sparse"}, "method must be one of 'structured', 'unstructured'"),
        ({"schedule": "linear"}, "schedule must be one of 'once', 'gradual' or a callable"),
        ({"start_step": 5, "end_step": 5}, "need 0 <= start_step < end_step"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PruningCallback(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ignore": ["encoder.*"]}, "ignore pattern 'encoder.\\*' matches no prunable layer"),
        ({"ignore": ["net.*"]}, "nothing to prune"),
    ],
)
def test_bad_model_arguments_fail_at_setup_before_any_step(kwargs, match):
    model = DigitsMLP(hidden=32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        seeded_fit(model, DigitsDataModule(), [PruningCallback(**kwargs)])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_dict_batches_are_traced_through_the_modules_own_training_step():
    class DictMLP(DigitsMLP):
        def training_step(self, batch, batch_idx):
            return super().training_step((batch["x"], batch["y"]), batch_idx)

    class DictData(DigitsDataModule):
        def train_dataloader(self):
            return DataLoader([{"x": torch.zeros(64), "y": torch.tensor(1)}] * 8, batch_size=4)

    model = DictMLP(hidden=32)
    seeded_fit(model, DictData(), [PruningCallback(schedule="once")])
    assert model.net[0].out_features == 16


def test_a_step_that_returns_no_loss_asks_for_example_input_array():
    class Manual(DigitsMLP):
        def __init__(self):
            super().__init__(hidden=32)
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            self.manual_backward(super().training_step(batch, batch_idx))

    with pytest.raises(MisconfigurationException, match="example_input_array"):
        seeded_fit(Manual(), DigitsDataModule(), [PruningCallback()])


@pytest.mark.slow  # DDP: two subprocesses
@pytest.mark.parametrize("method", ["structured", "unstructured"])
def test_ddp_ranks_end_with_identical_shapes_masks_and_weights(method, tmp_path):
    from tests.callbacks import ddp_pruning

    ranks = run_ddp(ddp_pruning.__file__, tmp_path / "out", method)
    assert ranks[0]["events"] == ranks[1]["events"] == [2, 4, 6]
    for name, value in ranks[0]["weights"].items():
        assert torch.equal(value, ranks[1]["weights"][name]), name
    assert ranks[0]["masks"].keys() == ranks[1]["masks"].keys()
    assert all(torch.equal(m, ranks[1]["masks"][n]) for n, m in ranks[0]["masks"].items())
    if method == "structured":
        assert ranks[0]["weights"]["net.0.weight"].shape == (32, 64)
    else:
        assert len(ranks[0]["masks"]) == 2


def test_a_pruning_step_that_removes_nothing_says_so_with_the_numbers():
    pruning = PruningCallback(0.99, schedule="once")  # 16 channels: 0.99 would leave none, so each layer stays whole
    with pytest.warns(UserWarning, match=r"pruning to 0.990 at step 0 removed nothing: sparsity stays 0.000, 1,482"):
        seeded_fit(DigitsMLP(hidden=16), DigitsDataModule(), [pruning], max_steps=1)
    assert "sparsity 0.000 (1,482 parameters)" in pruning.summary()
