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
