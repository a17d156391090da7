"""Which decode batch sizes get a CUDA graph (pure logic; the graphs themselves are tested on
the GPU in test_gpu_engine.py)."""

from __future__ import annotations

import pytest

from services.engine.cuda_graphs import capture_sizes
from services.engine.loader import resolve_dtype


@pytest.mark.parametrize(("max_batch", "sizes"), [
    (1, [1]),
    (3, [1, 2, 3]),
    (8, [1, 2, 4, 8]),
    (20, [1, 2, 4, 8, 16, 20]),
    (64, [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]),
    (100, [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 100]),
])
def test_capture_sizes_cover_every_batch_up_to_the_largest(max_batch, sizes):
    assert capture_sizes(max_batch) == sizes
    # every batch size pads to the smallest captured size that holds it
    assert all(any(s >= b for s in sizes) for b in range(1, max_batch + 1))


def test_dtype_auto_is_bf16_on_cuda_and_fp32_on_cpu():
    import torch

    assert resolve_dtype("auto", "cuda:1") is torch.bfloat16
    assert resolve_dtype("auto", "cpu") is torch.float32
    assert resolve_dtype("half", "cpu") is torch.float16
    assert resolve_dtype("float", "cuda") is torch.float32
