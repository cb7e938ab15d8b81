import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def no_cublas_workspace(monkeypatch):
    """CUDA estimates without cuBLAS's fixed workspaces (2 x 8 MiB), which would dwarf the tiny test models' steps."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":0:0")


@pytest.fixture
def one_process_group():
    """For a test that starts a distributed strategy in this process: its environment variables (MASTER_PORT,
    LOCAL_RANK...) and process group do not outlive the test (later runs would log as a rank)."""
    import os

    import torch.distributed as dist

    saved = dict(os.environ)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved)
