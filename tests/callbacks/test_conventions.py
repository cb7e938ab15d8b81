"""Lightning's conventions, checked over every callback file."""

import ast
from pathlib import Path

import pytest
from lightning.pytorch import Callback

FILES = sorted((Path(__file__).resolve().parents[2] / "lightning_lowvram" / "callbacks").glob("*.py"))
HOOKS = {name for name in dir(Callback) if not name.startswith("_")}


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_every_hook_is_marked_override_and_no_callback_imports_hydra(path):
    tree = ast.parse(path.read_text())
    missing = [
        f"{cls.name}.{fn.name}"
        for cls in ast.walk(tree)
        if isinstance(cls, ast.ClassDef)
        for fn in cls.body
        if isinstance(fn, ast.FunctionDef) and fn.name in HOOKS
        if "override" not in [ast.unparse(d) for d in fn.decorator_list]
    ]
    assert not missing, f"hooks without @override: {missing}"
    imports = [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)]
    names = [a.name for n in imports if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in imports if isinstance(n, ast.ImportFrom)]
    assert not [n for n in names if n.split(".")[0] in ("hydra", "omegaconf")]
