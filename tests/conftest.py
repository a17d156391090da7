"""Suite-wide rules: `@pytest.mark.gpu` tests run only where CUDA is available (the lent GPU
machine); elsewhere they are reported as skipped with the reason, never counted as passing."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the lent GPU machine)")
    for item in gpu_items:
        item.add_marker(skip)
