"""The fused element-wise kernels (`triton_ops.py`) against the torch reference: each op alone,
and whole forward passes of every model family with `fused=True` against `fused=False`.
Interpreted on the CPU where CUDA is missing (float32, tests/conftest.py); compiled on the GPU
machine."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from services.engine import triton_ops
from services.engine.attention import SequenceChunk, TorchPagedAttention
from services.engine.config import ModelConfig, RopeScaling
from services.engine.kv_pool import KVLayout, KVPool
from services.engine.model import LlamaModel
from services.engine.rope import RotaryEmbedding
from services.engine.weights import load_hf_weights
from tests.tiny_models import FAMILIES, make_tiny_model

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
GEN = torch.Generator().manual_seed(11)


def _rand(*shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=GEN).to(DEVICE)


def test_add_rms_norm_updates_the_residual_and_returns_the_norm():
    x, residual, weight = _rand(7, 96), _rand(7, 96), _rand(96)
    expected_sum = residual + x
    out = triton_ops.add_rms_norm(x, residual, weight, 1e-5)
    torch.testing.assert_close(residual, expected_sum)
    torch.testing.assert_close(out, F.rms_norm(expected_sum, (96,), weight, 1e-5))


def test_rope_in_place_on_a_strided_view_equals_the_reference():
    rotary = RotaryEmbedding(24, 64, 10000.0, RopeScaling(), DEVICE, torch.float32)
    qkv = _rand(9, 5 * 24)
    positions = torch.tensor([0, 3, 7, 8, 20, 33, 40, 62, 63], device=DEVICE)
    view = qkv[:, : 4 * 24].view(9, 4, 24)  # rows strided by 5 heads
    cos, sin = rotary.cos_sin(positions)
    expected = rotary.apply(view.clone(), cos, sin)
    untouched = qkv[:, 4 * 24 :].clone()
    triton_ops.rope_(view, positions, rotary.cos, rotary.sin)
    torch.testing.assert_close(view, expected)
    assert torch.equal(qkv[:, 4 * 24 :], untouched)


def test_silu_mul():
    gate_up = _rand(6, 2 * 1500)  # more than one block per row
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(triton_ops.silu_mul(gate_up), F.silu(gate) * up)


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_forward_equals_the_reference_forward(tmp_path, family):
    make_tiny_model(family, tmp_path)
    cfg = ModelConfig.from_hf_folder(tmp_path)
    layout = KVLayout(32, cfg.num_layers, 4, cfg.num_kv_heads, cfg.head_dim)
    chunks = [SequenceChunk(list(range(8)), 0, 19), SequenceChunk(list(range(10, 20)), 0, 5)]
    ids = torch.randint(0, 100, (24,), generator=GEN).to(DEVICE)
    positions = torch.tensor(list(range(19)) + list(range(5)), device=DEVICE)
    outputs = []
    for fused in (False, True):
        model = LlamaModel(cfg, load_hf_weights(tmp_path), device=DEVICE, fused=fused)
        pool = KVPool.allocate(layout, DEVICE)
        attention = TorchPagedAttention(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                                        cfg.sliding_window)
        outputs.append(model.forward(ids, positions, attention, pool,
                                     attention.prepare(chunks, pool)))
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=1e-5)
