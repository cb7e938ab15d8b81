import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(script: str, cwd) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script)], cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_own_module_example(tmp_path):
    proc = _run("own_module.py", tmp_path)
    assert "usable on rtx3060_12gb" in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    ("strategy", "callbacks"),
    [("none", "['MemoryReportCallback']"), ("micro_batch", "['AutoMicroBatchCallback', 'MemoryReportCallback']")],
)
def test_hydra_app_example(strategy, callbacks, tmp_path):
    proc = subprocess.run(
        [sys.executable, "app.py", "gpu=t4_16gb", f"strategy={strategy}", f"hydra.run.dir={tmp_path}"],
        cwd=EXAMPLES / "hydra_app",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == f"t4_16gb 14.75 {callbacks}"


@pytest.mark.slow
def test_hf_finetune_example(tmp_path):
    proc = _run("hf_finetune.py", tmp_path)
    assert "batch 16 ran as micro-batches of 4" in proc.stdout
    assert "int8/float" in proc.stdout + proc.stderr and "test loss: float" in proc.stdout
