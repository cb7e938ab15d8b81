"""The docs a newcomer navigates: a short README, a page per strategy in one shape, a CLI reference that is the tree.

The reference tables of ``docs/cli.md`` are generated from ``conf/`` by this file and compared with it: after a
change to the tree, ``PYTHONPATH=. python -m tests.test_docs --write`` rewrites them. The commands in the README and
in ``docs/`` run in ``tests/test_readme.py``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lightning_lowvram import registry
from lightning_lowvram.registry import as_override

ROOT = Path(__file__).resolve().parents[1]
DOCS, CONF = ROOT / "docs", ROOT / "conf"
CLI = DOCS / "cli.md"
SHAPE = ("## When to use it", "## How to use it", "## What it saves and costs", "## The trap")
# each strategy of the registry -> its page (the memory report is the meter, on the Python API page)
PAGES = {
    "micro_batch": "strategies/micro-batching.md",
    "optimizer_8bit": "strategies/8bit-optimizer.md",
    "low_bit_base": "strategies/low-bit-base.md",
    "activation_checkpointing": "strategies/activation-checkpointing.md",
    "chunked_cross_entropy": "strategies/long-context.md",
    "fsdp2": "strategies/multi-gpu.md",
    "pruning": "strategies/pruning.md",
    "dynamic_quant": "strategies/int8-evaluation.md",
    "memory_report": "python-api.md",
    "weight_streaming": "strategies/weight-streaming.md",
}
TOP_KEYS = {
    "command": "the first word on the command line: `fit`, `plan`, `validate`, `test` or `predict`",
    "stage": "what `lowvram plan` plans: `fit`, or an evaluation stage (`lowvram plan stage=predict gpu=...`)",
    "seed": "`L.seed_everything(seed)` before the model is built",
    "test_after_fit": "run `trainer.test` after `fit` when the model has a `test_step` and the data a test loader",
    "summary_json": "also write the summary as `summary.json` in the run directory (for scripts)",
    "emulate_gpu": "emulate the chosen card's memory on the local device (a CPU budget that raises the real "
    "`torch.OutOfMemoryError`, or a capped CUDA allocator); `false` ignores its size",
    "ckpt_path": "resume: a checkpoint file, or `last` (Lightning's `ckpt_path`); for validate/test/predict, the "
    "weights to run (pruned and low-bit checkpoints of `lowvram fit` included)",
    "max_context": "`lowvram plan max_context=true`: also the longest sequence and the largest batch that fit the card",
}


def tables() -> dict[str, str]:
    """The reference tables of docs/cli.md, generated from conf/: heading -> table."""
    groups = ["| group | options |", "|---|---|"]
    for group in sorted(p.name for p in CONF.iterdir() if p.is_dir() and not p.name.startswith("_")):
        options = sorted(f.stem for f in (CONF / group).glob("*.yaml"))
        groups.append(f"| `{group}` | {', '.join(f'`{o}`' for o in options)} |")
    top = OmegaConf.to_container(OmegaConf.load(CONF / "lowvram.yaml"))
    keys = ["| key | default | what it does |", "|---|---|---|"]
    for key, value in top.items():
        if key != "defaults":
            keys.append(f"| `{key}` | `{as_override(value)}` | {TOP_KEYS.get(key, '(undocumented)')} |")
    nodes = ["| node | callback | keys (defaults) |", "|---|---|---|"]
    for path in sorted((CONF / "callbacks").glob("*.yaml")):
        node = OmegaConf.to_container(OmegaConf.load(path))
        args = ", ".join(f"`{k}={as_override(v)}`" for k, v in node.items() if not k.startswith("_")) or "-"
        nodes.append(f"| `{path.stem}` | `{node['_target_']}` | {args} |")
    return {"## Groups": "\n".join(groups), "## Top-level keys": "\n".join(keys), "## Callback nodes": "\n".join(nodes)}


def _table_under(text: str, heading: str) -> str:
    section = text.split(heading + "\n", 1)[1].split("\n## ", 1)[0]
    return "\n".join(line for line in section.splitlines() if line.startswith("|"))


def _write() -> None:
    """Replace each reference section's table (from its first table line to the section's end) by the generated one."""
    text = CLI.read_text()
    for heading, table in tables().items():
        head, rest = text.split(heading + "\n", 1)
        section, sep, tail = rest.partition("\n## ")
        intro = section[: section.index("\n|") + 1] if "\n|" in section else section.rstrip() + "\n\n"
        text = f"{head}{heading}\n{intro}{table}\n{sep}{tail}" if sep else f"{head}{heading}\n{intro}{table}\n"
    CLI.write_text(text)


def _markdown() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


def test_the_readme_is_short_and_links_to_the_docs():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 150, len(lines)
    text = "\n".join(lines)
    for page in ("docs/README.md", "docs/cli.md", "docs/planner.md", "docs/hydra-template.md"):
        assert f"]({page})" in text, page


@pytest.mark.parametrize("path", _markdown(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_at_a_file_that_exists(path):
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()):
        if not target.startswith(("http://", "https://")):
            assert (path.parent / target).exists(), f"{path.name}: {target}"


def test_every_strategy_has_a_page_in_composers_shape_with_measured_numbers():
    assert set(PAGES) == {s.name for s in registry.strategies()}
    results = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    for name, page in PAGES.items():
        text = (DOCS / page).read_text()
        if page.startswith("strategies/"):
            positions = [text.find(heading) for heading in SHAPE]
            assert -1 not in positions and positions == sorted(positions), (page, positions)
            saves = text.split("## What it saves and costs", 1)[1].split("\n## ", 1)[0]
            assert "benchmarks/RESULTS.md" in saves, page
            # every number in the page's tables comes from benchmarks/RESULTS.md
            cells = [c.strip(" *") for line in saves.splitlines() if line.startswith("|") for c in line.split("|")]
            numbers = {n for cell in cells for n in re.findall(r"\d[\d,]*\.\d+|\d{1,3}(?:,\d{3})+", cell)}
            missing = sorted(n for n in numbers if n not in results)
            assert not missing, (page, missing)
        assert name in (DOCS / "README.md").read_text() or page in (DOCS / "README.md").read_text(), page


def test_the_cli_reference_is_the_config_tree():
    text = CLI.read_text()
    for heading, table in tables().items():
        assert _table_under(text, heading) == table, f"{heading}: run PYTHONPATH=. python -m tests.test_docs --write"
    assert "(undocumented)" not in text


def test_every_group_option_the_docs_name_exists():
    named = set()
    for path in _markdown():
        text = re.sub(r"```python\n.*?```", "", path.read_text(), flags=re.S)  # keyword arguments are not options
        named |= set(re.findall(r"\b(gpu|strategy|model|data|example|trainer)=([a-z][a-z0-9_]*)\b", text))
    for group, option in named:
        assert (CONF / group / f"{option}.yaml").exists(), f"{group}={option}"


if __name__ == "__main__" and "--write" in sys.argv:
    _write()
