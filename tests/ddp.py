"""Run a script under DDP on two CPU processes (Lightning re-launches it per rank) with a hard timeout."""

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def run_ddp(script: str, out: Path, *args: object, timeout: int = 180) -> list[dict]:
    """Run ``script OUT ARGS...``; return what ranks 0 and 1 saved to ``OUT/rank<r>.pt`` (weights_only)."""
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    command = [sys.executable, script, str(out), *map(str, args)]
    done = subprocess.run(command, cwd=ROOT, env=env, timeout=timeout, capture_output=True, text=True)  # no hang
    assert done.returncode == 0, done.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
