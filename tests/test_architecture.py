"""The layers of ARCHITECTURE.md, held: each module imports only its own layer and those below (lazy imports too).

Layers, bottom up: utilities, ``memory``, ``cores``, ``registry``, the shells (``callbacks``, ``strategies`` and
``planner``, which do not import each other, save the planner's use of nothing above it), the integration
(``compose``, ``hydra_setup``), the app (``cli``). ``demo`` models sit beside the cores. Hydra and OmegaConf are
imported by the integration and the app only; benchmarks import the package, never ``tests``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lightning_lowvram"

LAYERS = {  # module prefix -> layer
    "lightning_lowvram._patching": 0,
    "lightning_lowvram._files": 0,
    "lightning_lowvram._metrics": 0,
    "lightning_lowvram._progress": 0,
    "lightning_lowvram._values": 0,
    "lightning_lowvram.memory": 1,
    "lightning_lowvram.cores": 2,
    "lightning_lowvram.demo": 2,
    "lightning_lowvram.models": 2,
    "lightning_lowvram.data": 2,
    "lightning_lowvram.registry": 3,
    "lightning_lowvram.callbacks": 4,
    "lightning_lowvram.strategies": 4,
    "lightning_lowvram.planner": 4,
    "lightning_lowvram.compose": 5,
    "lightning_lowvram.hydra_setup": 5,
    "lightning_lowvram.cli": 6,
    "lightning_lowvram.__main__": 6,
    "lightning_lowvram.conf": 6,
}
# within the shells' layer, who may import whom (nothing else crosses)
SIBLINGS = {"lightning_lowvram.planner": {"lightning_lowvram.planner"}}
HYDRA = ("hydra", "omegaconf")


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def _layer(module: str) -> tuple[int, str] | None:
    if module == "lightning_lowvram":
        return 7, module  # the public API on top
    for prefix, layer in LAYERS.items():
        if module == prefix or module.startswith(prefix + "."):
            return layer, prefix
    return None


FILES = sorted(PACKAGE.rglob("*.py")) + sorted((ROOT / "conf").glob("*.py"))


def _name(path: Path) -> str:
    if path.is_relative_to(ROOT / "conf"):
        return "lightning_lowvram.conf"
    return _module(path)


@pytest.mark.parametrize("path", FILES, ids=[_name(p) for p in FILES])
def test_each_module_imports_only_its_layer_and_below(path):
    module = _name(path)
    own = _layer(module)
    assert own is not None, f"{module} is in no layer of ARCHITECTURE.md: add it to LAYERS"
    for imported in _imports(path):
        if imported.split(".")[0] in HYDRA:
            assert own[0] >= 5, f"{module} imports {imported}: Hydra belongs to the integration and the app"
        if not imported.startswith("lightning_lowvram"):
            continue
        theirs = _layer(imported)
        assert theirs is not None, f"{module} imports {imported}, which is in no layer"
        assert theirs[0] <= own[0], f"{module} (layer {own[0]}) imports {imported} (layer {theirs[0]}): upward"
        if theirs[0] == own[0] == 4 and theirs[1] != own[1]:
            allowed = SIBLINGS.get(own[1], set())
            assert theirs[1] in allowed, f"{module} imports {imported}: the shells do not import each other"


def test_the_registry_names_callbacks_by_path_and_the_planner_imports_none():
    """The planner builds nothing: strategies are named by dotted path, imported only by ``Strategy.load``."""
    for path in (PACKAGE / "planner").rglob("*.py"):
        assert not any(m.startswith("lightning_lowvram.callbacks") for m in _imports(path)), path


def test_benchmarks_import_the_package_not_the_tests():
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        assert not any(m == "tests" or m.startswith("tests.") for m in _imports(path)), path
