"""The shipped Hydra tree: each callback's defaults are written once and match its signature."""

import inspect
import re
from pathlib import Path

import pytest
import yaml
from hydra.utils import get_class

CONF = Path(__file__).resolve().parents[1] / "conf"
NODES = sorted((CONF / "callbacks").glob("*.yaml"))


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


@pytest.mark.parametrize("path", NODES, ids=[p.stem for p in NODES])
def test_every_callback_node_lists_the_signature_with_its_defaults(path):
    node = yaml.safe_load(path.read_text())
    assert path.read_text().startswith(f"# @package callbacks.{path.stem}\n")
    cls = get_class(node.pop("_target_"))
    assert node.pop("_convert_") == "all"
    params = {
        name: p.default
        for name, p in inspect.signature(cls.__init__).parameters.items()
        if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }
    assert set(node) == set(params), f"{path.name}: keys {sorted(node)} vs {cls.__name__}({sorted(params)})"
    for name, default in params.items():
        assert node[name] == _plain(default), f"{path.name}: {name}={node[name]!r}, {cls.__name__} has {default!r}"


@pytest.mark.parametrize("path", sorted((CONF / "strategy").glob("*.yaml")), ids=lambda p: p.stem)
def test_strategies_reuse_the_callback_nodes_instead_of_copying_them(path):
    strategy = yaml.safe_load(path.read_text())
    assert not re.search(r"^\s*_target_:", path.read_text(), re.M)  # no node of its own
    for entry in strategy.get("defaults", []):
        if entry != "_self_":
            source, _, _ = entry.partition("@")
            assert (CONF / f"{source.lstrip('/')}.yaml").is_file()


def test_the_fsdp2_node_lists_the_strategy_signature_with_its_defaults():
    node = yaml.safe_load((CONF / "parallel" / "fsdp2.yaml").read_text())
    cls = get_class(node.pop("_target_"))
    params = {n: p.default for n, p in inspect.signature(cls.__init__).parameters.items() if n != "self"}
    assert node == params


def _declared():
    from lightning_lowvram.registry import strategies

    return {s.node: s for s in strategies() if s.target.startswith("lightning_lowvram.")}


@pytest.mark.parametrize("path", NODES, ids=[p.stem for p in NODES])
def test_every_callback_node_is_its_strategys_declaration(path):
    import dataclasses

    node = yaml.safe_load(path.read_text())
    strategy = _declared().get(path.stem)
    assert strategy is not None and strategy.kind == "callback", f"{path.name} is no registered strategy's node"
    assert get_class(node.pop("_target_")) is strategy.load()
    node.pop("_convert_")
    assert node == strategy.defaults()  # the same keys, in the same order, with the same defaults
    signature = inspect.signature(strategy.load().__init__).parameters
    assert [f.name for f in dataclasses.fields(strategy.config)] == [n for n in signature if n != "self"]
    assert strategy.summary and strategy.check(node) is None  # its own defaults pass its checks


def test_every_declared_strategy_has_its_node_and_the_auto_node_lists_the_planner_switches():
    from lightning_lowvram.hydra_setup import auto_options

    for name, strategy in _declared().items():
        folder = "callbacks" if strategy.kind == "callback" else "parallel"
        node = yaml.safe_load((CONF / folder / f"{name}.yaml").read_text())
        assert get_class(node.pop("_target_")) is strategy.load()
        node.pop("_convert_", None)
        assert node == strategy.defaults(), name
    auto = yaml.safe_load((CONF / "strategy" / "auto.yaml").read_text())
    assert auto.pop("name") == "auto" and auto == auto_options()
