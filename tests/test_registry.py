"""A strategy registered from outside the package appears in the estimate, the plan, its callbacks and overrides,
the Hydra tree and the CLI's checks, with no edit to the package; the registry refuses what it cannot use."""

import dataclasses

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.config_store import ConfigStore

from lightning_lowvram import GPUProfile, estimate_step_memory, plan, plan_callbacks
from lightning_lowvram.cli import ConfigError, build, run
from lightning_lowvram.registry import Strategy, get, register, strategies, unregister
from tests.helpers import UserModule
from tests.test_cli import FAST
from tests.toy_strategy import TOY, ToyCallback

BATCH = (torch.zeros(8, 8), torch.zeros(8, 1))


@pytest.fixture
def toy():
    register(TOY)
    yield TOY
    unregister("toy")
    ConfigStore.instance().repo["callbacks"].pop("lowvram_toy.yaml", None)


def _card(tensor_bytes):
    return GPUProfile(
        name="toy_card", memory_gib=tensor_bytes / 0.9 / 2**30, bf16=True, context_mib=0, compute_capability=(8, 6),
        fp32_tflops=20.3, tensor_tflops=40.6, bandwidth_gbs=448,
    )  # fmt: skip


def _cfg(*overrides):
    with initialize_config_module("lightning_lowvram.conf", version_base="1.3"):
        return compose("lowvram", overrides=["example=none", *FAST, *overrides])


@pytest.mark.usefixtures("toy")
def test_a_toy_strategy_from_outside_is_estimated_planned_and_built():
    module = UserModule(width=4096)
    plain = estimate_step_memory(module, BATCH, device="cuda")
    toy = estimate_step_memory(module, BATCH, device="cuda", strategies={"toy": 50})
    half = plain.by_category["parameters"] // 2
    assert toy.peak == plain.peak - half and toy.by_category["parameters"] == plain.by_category["parameters"] - half
    card = _card(plain.peak - half / 2)  # the plain step does not fit, the toy's does
    result = plan(module, BATCH, card, precisions=("32-true",))
    assert result.chosen is not None and "toy 50%" in result.chosen.label, result.table()
    assert result.chosen.options == (("toy", 50),)
    (callback,) = plan_callbacks(result)
    assert isinstance(callback, ToyCallback) and callback.percent == 50
    assert result.overrides() == [
        "trainer.precision=32-true", "callbacks=[lowvram_memory_report,lowvram_toy]", "callbacks.lowvram_toy.percent=50"
    ]  # fmt: skip
    without = plan(module, BATCH, card, precisions=("32-true",), allow_toy=False)  # its own switch
    assert not any("toy" in c.label for c in without.candidates) and without.chosen.micro_batch_size < 8
    with pytest.raises(ValueError, match="unknown option 'allow_tooy'; the strategies take .*allow_toy"):
        plan(module, BATCH, card, allow_tooy=True)


@pytest.mark.usefixtures("toy")
def test_the_toy_is_in_the_hydra_tree_and_the_cli_checks_and_plans_it(tmp_path, capsys):
    cfg = _cfg("callbacks=[lowvram_memory_report,lowvram_toy]", f"trainer.default_root_dir={tmp_path}")
    assert cfg.callbacks.lowvram_toy == {
        "_target_": "tests.toy_strategy.ToyCallback",
        "_convert_": "all",
        "percent": 50,
    }
    parts = build(cfg)
    assert isinstance(parts["callbacks"]["callbacks.lowvram_toy"], ToyCallback)
    for value, reason in (("half", "must be an integer"), ("true", "must be an integer")):
        with pytest.raises(ConfigError, match=f"^callbacks.lowvram_toy.percent={value}: {reason}$"):
            build(_cfg("callbacks=[lowvram_toy]", f"callbacks.lowvram_toy.percent={value}"))
    with pytest.raises(
        ConfigError, match="callbacks.lowvram_toy.percen=1: unknown key for lowvram_toy; it takes percent"
    ):
        build(_cfg("callbacks=[lowvram_toy]", "+callbacks.lowvram_toy.percen=1"))
    with pytest.raises(ConfigError, match=r"callbacks.lowvram_toy.percent=0: must be in \(0, 100\], got 0"):
        build(_cfg("callbacks=[lowvram_toy]", "callbacks.lowvram_toy.percent=0"))  # the callback's own check
    auto = ["command=plan", "gpu=rtx3060_12gb", "strategy=auto", f"trainer.default_root_dir={tmp_path}"]
    # strategy=auto takes the toy's switch; a key the shipped auto node does not list is added with `+`, as in Hydra
    run(_cfg(*auto, "+strategy.allow_toy=true"))
    assert "toy 50%" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="strategy.allow_toy=1: must be true or false"):
        build(_cfg(*auto, "+strategy.allow_toy=1"))


def test_the_registry_refuses_what_it_cannot_use():
    @dataclasses.dataclass
    class Empty:
        pass

    with pytest.raises(ValueError, match="name must be an identifier, got 'two words'"):
        Strategy("two words", "x.Y", Empty, "")
    with pytest.raises(ValueError, match="config must be a dataclass"):
        Strategy("bad", "x.Y", dict, "")
    with pytest.raises(KeyError, match="no strategy 'nope'; registered: micro_batch"):
        get("nope")
    with pytest.raises(ValueError, match="strategies: no strategy 'nope'"):
        estimate_step_memory(UserModule(), BATCH, strategies={"nope": 1})
    assert [s.name for s in strategies()][:5] == [
        "micro_batch", "optimizer_8bit", "low_bit_base", "activation_checkpointing", "chunked_cross_entropy"
    ]  # fmt: skip
