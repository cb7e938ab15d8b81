import pytest
import torch
from hydra import compose, initialize_config_module

from lightning_lowvram.hydra_setup import lowvram_setup
from lightning_lowvram.memory.budget import active_budget


def _cfg(*overrides):
    with initialize_config_module("lightning_lowvram.conf", version_base="1.3"):
        return compose("lowvram", overrides=["example=none", *overrides])


def test_a_foreign_app_gets_the_strategy_callbacks_and_the_cards_budget():
    setup = lowvram_setup(_cfg("gpu=rtx3060_12gb", "strategy=prune", "strategy.pruning.amount=0.3"))
    (pruning,) = [c for c in setup.callbacks if type(c).__name__ == "PruningCallback"]
    assert pruning.amount == 0.3 and setup.trainer_kwargs == {}
    with setup.budget(device="cpu"):
        assert active_budget() == setup.profile.usable_bytes


def test_strategy_auto_plans_with_the_model_and_a_batch():
    from lightning_lowvram.demo import DigitsMLP

    cfg = _cfg("gpu=rtx3060_12gb", "strategy=auto")
    with pytest.raises(ValueError, match=r"needs the model and a training batch"):
        lowvram_setup(cfg)
    setup = lowvram_setup(cfg, model=DigitsMLP(), batch=(torch.zeros(64, 64), torch.zeros(64, dtype=torch.long)))
    assert setup.plan is not None and setup.plan.chosen is not None
    assert setup.trainer_kwargs == setup.plan.trainer_kwargs()


def test_the_fsdp2_node_is_the_trainers_strategy_and_plans_count_the_cards():
    from lightning_lowvram import FSDP2Strategy
    from lightning_lowvram.demo import DigitsMLP

    setup = lowvram_setup(_cfg("gpu=rtx3090_24gb", "strategy=[fsdp2,micro_batch]"))
    assert isinstance(setup.trainer_kwargs["strategy"], FSDP2Strategy)
    assert [type(c).__name__ for c in setup.callbacks] == ["MemoryReportCallback", "AutoMicroBatchCallback"]
    batch = (torch.zeros(64, 64), torch.zeros(64, dtype=torch.long))
    cfg = _cfg("gpu=rtx3090_24gb", "strategy=auto", "trainer.devices=2")
    setup = lowvram_setup(cfg, model=DigitsMLP(), batch=batch)
    assert setup.plan.devices == 2 and setup.trainer_kwargs["devices"] == 2  # DDP: the MLP fits one card


def _described(callbacks):
    """Each callback's class and public state (the CLI's summary prints the tables the callbacks would)."""
    hidden = ("_", "print_table")
    return sorted((type(c).__name__, sorted((k, repr(v)) for k, v in vars(c).items() if not k.startswith(hidden)))
                  for c in callbacks)  # fmt: skip


@pytest.mark.parametrize("strategy", ["[lora_4bit,micro_batch,checkpointing]", "auto"])
def test_the_cli_a_foreign_app_and_python_compose_the_same_callbacks_and_trainer_arguments(strategy, tmp_path):
    from lightning_lowvram import plan, plan_callbacks
    from lightning_lowvram.cli import build

    overrides = ["gpu=rtx3060_12gb", "gpu.memory_gib=0.03", "gpu.context_mib=0", f"strategy={strategy}",
                 "model=tiny_gpt", "data=tiny_text", "+model.n_layer=2", "+model.lora_rank=4",
                 f"trainer.default_root_dir={tmp_path}"]  # fmt: skip
    cfg = _cfg(*overrides)
    parts = build(cfg)
    model, data = parts["model"], parts["data"]
    batch = next(iter(data.train_dataloader()))
    setup = lowvram_setup(cfg, model=model, batch=batch)
    cli = [c for c in parts["trainer"].callbacks if type(c).__module__.startswith("lightning_lowvram")]
    assert _described(cli) == _described(setup.callbacks)
    assert parts["trainer"].precision == setup.trainer_kwargs.get("precision", "32-true")
    if strategy == "auto":  # and Python: plan, plan_callbacks, trainer_kwargs
        chosen = plan(model, batch, setup.profile)
        assert chosen.chosen is not None and not chosen.candidates[0].fits and plan_callbacks(chosen), chosen.table()
        ours = [c for c in setup.callbacks if type(c).__name__ != "MemoryReportCallback"]
        assert _described(plan_callbacks(chosen)) == _described(ours)
        assert chosen.trainer_kwargs() == setup.trainer_kwargs
