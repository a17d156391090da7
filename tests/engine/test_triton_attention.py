"""The Triton attention backend against the torch reference backend, batch by batch.

Where CUDA is missing the kernels run in Triton's interpreter on the CPU (tests/conftest.py;
float32, tight tolerance), so CI checks their logic; on the GPU machine they run compiled, in
float32 and bfloat16. Every case checks both the attention outputs and the bytes written into
the pool.
"""

from __future__ import annotations

import pytest
import torch

from services.engine.attention import SequenceChunk, TorchPagedAttention
from services.engine.kv_pool import KVLayout, KVPool
from services.engine.triton_attention import WHOLE_PROMPT_MIN_TOKENS, TritonPagedAttention

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.bfloat16] if DEVICE.type == "cuda" else [torch.float32]
TOLERANCE = {torch.float32: 2e-5 if DEVICE.type == "cpu" else 1e-4, torch.bfloat16: 2e-2}


class Pair:
    """The same pool layout under both backends, fed the same tokens."""

    def __init__(self, heads: int, kv_heads: int, head_dim: int, page_size: int,
                 window: int | None = None, dtype: torch.dtype = torch.float32,
                 num_pages: int = 96, layers: int = 2) -> None:
        layout = KVLayout(num_pages, layers, page_size, kv_heads, head_dim, dtype)
        self.ref_pool = KVPool.allocate(layout, DEVICE)
        self.tri_pool = KVPool.allocate(layout, DEVICE)
        self.ref = TorchPagedAttention(heads, kv_heads, head_dim, window)
        self.tri = TritonPagedAttention(heads, kv_heads, head_dim, window, DEVICE)
        self.shape = (heads, kv_heads, head_dim)
        self.layers = layers
        self.dtype = dtype
        self.gen = torch.Generator(device="cpu").manual_seed(7)

    def step(self, chunks: list[SequenceChunk]) -> None:
        heads, kv_heads, dim = self.shape
        tokens = sum(c.num_new for c in chunks)

        def rand(*shape: int) -> torch.Tensor:
            return torch.randn(shape, generator=self.gen).to(DEVICE, self.dtype)

        # k and v as the model hands them over: views into one fused qkv row
        qkv = rand(tokens, (heads + 2 * kv_heads) * dim)
        q = qkv[:, : heads * dim].reshape(tokens, heads, dim).contiguous()
        k = qkv[:, heads * dim : (heads + kv_heads) * dim].view(tokens, kv_heads, dim)
        v = qkv[:, (heads + kv_heads) * dim :].view(tokens, kv_heads, dim)
        ref_meta = self.ref.prepare(chunks, self.ref_pool)
        tri_meta = self.tri.prepare(chunks, self.tri_pool)
        for layer in range(self.layers):
            expected = self.ref.forward(layer, q, k, v, self.ref_pool, ref_meta)
            got = self.tri.forward(layer, q, k, v, self.tri_pool, tri_meta)
            torch.testing.assert_close(got.float(), expected.float(), rtol=0,
                                       atol=TOLERANCE[self.dtype] * max(1.0, expected.abs().max()))
        assert torch.equal(self.tri_pool.data, self.ref_pool.data)


def _pages(first: int, n: int, stride: int = 1) -> list[int]:
    return list(range(first, first + n * stride, stride))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim", "page_size"),
                         [(4, 2, 16, 4), (8, 8, 24, 16), (12, 3, 64, 16), (32, 8, 128, 16)])
def test_prefill_then_decode_then_mixed(heads, kv_heads, head_dim, page_size, dtype):
    pair = Pair(heads, kv_heads, head_dim, page_size, dtype=dtype,
                num_pages=160 if page_size == 16 else 96)
    a = _pages(0, 12 if page_size == 4 else 4)  # contiguous run
    b = _pages(40, 10 if page_size == 4 else 3, stride=3)  # scattered pages
    pair.step([SequenceChunk(a, 0, 37), SequenceChunk(b, 0, 29)])  # two prefills
    pair.step([SequenceChunk(a, 37, 1), SequenceChunk(b, 29, 1)])  # decode
    # a decode, a chunk after cached tokens, a one-token prompt
    pair.step([SequenceChunk(a, 38, 1), SequenceChunk(b, 30, 9), SequenceChunk([90], 0, 1)])


@pytest.mark.parametrize("dtype", DTYPES)
def test_sliding_window(dtype):
    pair = Pair(4, 2, 16, 4, window=7, dtype=dtype)
    pages = _pages(3, 12)
    pair.step([SequenceChunk(pages, 0, 20)])
    pair.step([SequenceChunk(pages, 20, 5)])
    pair.step([SequenceChunk(pages, 25, 1)])


@pytest.mark.parametrize("dtype", DTYPES)
def test_long_decode_is_split_and_merged(dtype):
    pair = Pair(4, 1, 32, 16, dtype=dtype, num_pages=64)
    pages = _pages(1, 50)
    assert pair.tri.num_splits(1) > 1
    pair.step([SequenceChunk(pages, 0, 700)])
    pair.step([SequenceChunk(pages, 700, 1)])
    meta = pair.tri.prepare([SequenceChunk(pages, 701, 1)], pair.tri_pool)
    assert meta.decode is not None and meta.decode.num_splits > 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_whole_long_prompts_take_sdpa_beside_the_extend_kernel(dtype):
    """Prompts computed whole from their first token, at least WHOLE_PROMPT_MIN_TOKENS long, go
    to torch's SDPA; chunks after cached tokens, short prompts and decodes to the kernels; one
    pass may hold all of them. A float32 pool on CUDA (no flash attention) keeps the kernels."""
    sdpa = DEVICE.type == "cpu" or dtype != torch.float32
    pair = Pair(8, 2, 32, 16, dtype=dtype)
    a, b, c, d = _pages(1, 19), _pages(20, 20), _pages(40, 3), _pages(43, 16)
    first = [SequenceChunk(a, 0, 300), SequenceChunk(b, 0, 280)]
    meta = pair.tri.prepare(first, pair.tri_pool)
    assert meta.whole_prompts == (((0, 300), (300, 280)) if sdpa else ())
    pair.step(first)
    mixed = [SequenceChunk(b, 280, 30), SequenceChunk(c, 0, 40),
             SequenceChunk(d, 0, WHOLE_PROMPT_MIN_TOKENS), SequenceChunk(a, 300, 1)]
    meta = pair.tri.prepare(mixed, pair.tri_pool)
    assert meta.whole_prompts == (((70, WHOLE_PROMPT_MIN_TOKENS),) if sdpa else ())
    assert meta.extend is not None
    assert meta.extend.num_new.tolist() == [30, 40] + ([] if sdpa else [WHOLE_PROMPT_MIN_TOKENS])
    assert meta.decode is not None and meta.decode.q_rows.tolist() == [70 + WHOLE_PROMPT_MIN_TOKENS]
    pair.step(mixed)


def test_decode_buffers_pad_with_no_store_and_zero_output():
    """The CUDA-graph buffers: the first rows give what `prepare` gives; padding rows write
    nothing into the pool and attend to nothing."""
    pair = Pair(4, 2, 16, 4)
    pages_a, pages_b = _pages(0, 6), _pages(10, 6)
    pair.step([SequenceChunk(pages_a, 0, 13), SequenceChunk(pages_b, 0, 21)])
    buffers = pair.tri.decode_buffers(max_batch=4, max_pages=8)
    chunks = [SequenceChunk(pages_a, 13, 1), SequenceChunk(pages_b, 21, 1)]
    before = pair.tri_pool.data.clone()
    buffers.fill(4, [5, 6], chunks, 4, pair.tri_pool.layout.rows_per_page)
    assert buffers.input_ids[:4].tolist() == [5, 6, 0, 0]
    assert buffers.positions[:2].tolist() == [13, 21]
    assert buffers.slot_rows[2:4].tolist() == [-1, -1]
    assert buffers.kv_lens[:4].tolist() == [14, 22, 0, 0]

    q = torch.randn(4, 4, 16, device=DEVICE)
    kv = torch.randn(4, 2, 16, device=DEVICE)
    out = pair.tri.forward(0, q, kv, kv, pair.tri_pool, buffers.metadata(4))
    assert torch.equal(out[2:], torch.zeros_like(out[2:]))
    expected = pair.tri.forward(0, q[:2], kv[:2], kv[:2], pair.ref_pool,
                                pair.tri.prepare(chunks, pair.ref_pool))
    torch.testing.assert_close(out[:2], expected, rtol=0, atol=1e-5)
    changed = (pair.tri_pool.data != before).nonzero()[:, 0].unique().tolist()
    assert set(changed) <= {pages_a[13 // 4], pages_b[21 // 4]}
