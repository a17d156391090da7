"""The GPU attention backend: Triton kernels over the paged KV pool.

Implements the `AttentionBackend` contract of `attention.py` (the torch backend there is the
reference these kernels are tested against). A forward pass of one layer launches: the store of
the new K/V, decode attention (one new token per sequence; flash-decoding splits then their
merge), extend attention (prefill chunks after cached tokens, and short prompts), and for each
whole prompt of at least `WHOLE_PROMPT_MIN_TOKENS` tokens, torch's `scaled_dot_product_attention`
over the prompt's own K/V (no pages to read: nothing is cached before it). On an H100 with the 8B
shape that ran at 458-512 TFLOPS against the extend kernel's 245-302
(bench/results/prefill-h100.json); below the threshold one launch per prompt costs more than it
saves, so short prompts stay in the one extend launch. Sliding-window models, and on CUDA pools
that flash attention cannot serve (float32, odd head sizes), keep the extend kernel throughout.

Metadata is built on the host with numpy and copied once per forward pass. `DecodeBuffers`
holds the same metadata in fixed tensors, filled in place, for CUDA-graph replay
(`cuda_graphs.py`): a padded row has slot -1 (nothing stored) and KV length 0 (zero output).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from services.engine.attention import SequenceChunk
from services.engine.kv_pool import KVPool
from services.engine.triton_kernels import (
    LOG2E,
    decode_partial_kernel,
    decode_reduce_kernel,
    extend_kernel,
    next_power_of_2,
    store_kv_kernel,
)

MAX_SPLITS = 32
DECODE_BLOCK_N = 64
EXTEND_BLOCK_N = 64
WHOLE_PROMPT_MIN_TOKENS = 256


@dataclass(slots=True)
class DecodeMeta:
    q_rows: torch.Tensor  # [B] int64: flat token row of each decode sequence
    page_table: torch.Tensor  # [B, max_pages] int32
    kv_lens: torch.Tensor  # [B] int32: tokens to attend to, the new one included (0: padding)
    num_splits: int
    partial_out: torch.Tensor  # [B, heads, num_splits, head_dim] float32
    partial_lse: torch.Tensor  # [B, heads, num_splits] float32


@dataclass(slots=True)
class ExtendMeta:
    page_table: torch.Tensor  # [N, max_pages] int32
    q_start: torch.Tensor  # [N] int32: first flat row of each chunk
    num_new: torch.Tensor  # [N] int32
    num_cached: torch.Tensor  # [N] int32
    max_new: int


@dataclass(slots=True)
class TritonAttentionMetadata:
    slot_rows: torch.Tensor  # [num_tokens] int64: layer-0 K row of each new token; -1: none
    decode: DecodeMeta | None
    extend: ExtendMeta | None
    whole_prompts: tuple[tuple[int, int], ...] = ()  # (first flat row, tokens), torch's SDPA


class TritonPagedAttention:
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int,
                 sliding_window: int | None, device: torch.device) -> None:
        if num_heads % num_kv_heads:
            raise ValueError(f"{num_heads} query heads do not group over {num_kv_heads} KV heads")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.group = num_heads // num_kv_heads
        self.qk_scale = head_dim**-0.5 * LOG2E
        self.window = sliding_window or 0
        self.device = torch.device(device)
        self.dim_pad = max(16, next_power_of_2(head_dim))
        self.group_pad = max(16, next_power_of_2(self.group))
        self.row_pad = next_power_of_2(num_kv_heads * head_dim)
        if self.device.type == "cuda":
            props = torch.cuda.get_device_properties(self.device)
            self.num_sms = props.multi_processor_count
        else:  # the Triton interpreter (tests on CPU)
            self.num_sms = 4

    def _sdpa_takes(self, chunk: SequenceChunk, dtype: torch.dtype) -> bool:
        """Whether `chunk` is a whole prompt for torch's SDPA: nothing cached before it, no
        window, long enough, and on CUDA a dtype and head size flash attention serves (other
        cases fall back to SDPA's math path, which holds a [heads, n, n] score matrix)."""
        if chunk.num_cached or self.window or chunk.num_new < WHOLE_PROMPT_MIN_TOKENS:
            return False
        return self.device.type != "cuda" or (
            dtype in (torch.float16, torch.bfloat16)
            and self.head_dim % 8 == 0 and self.head_dim <= 256)

    # --- metadata -------------------------------------------------------------------------

    def num_splits(self, batch: int) -> int:
        """Flash-decoding splits: enough programs to cover the SMs twice at small batches."""
        return max(1, min(MAX_SPLITS, (2 * self.num_sms) // (batch * self.num_kv_heads)))

    def prepare(self, chunks: list[SequenceChunk], pool: KVPool) -> TritonAttentionMetadata:
        page_size = pool.layout.page_size
        rows_per_page = pool.layout.rows_per_page
        slot_parts: list[np.ndarray] = []
        decode_rows: list[int] = []
        decode_chunks: list[SequenceChunk] = []
        extend_rows: list[int] = []
        extend_chunks: list[SequenceChunk] = []
        whole_prompts: list[tuple[int, int]] = []
        start = 0
        for chunk in chunks:
            pos = np.arange(chunk.num_cached, chunk.num_cached + chunk.num_new)
            pages = np.asarray(chunk.page_ids, dtype=np.int64)
            slot_parts.append(pages[pos // page_size] * rows_per_page + pos % page_size)
            if chunk.num_new == 1:
                decode_rows.append(start)
                decode_chunks.append(chunk)
            elif self._sdpa_takes(chunk, pool.layout.dtype):
                whole_prompts.append((start, chunk.num_new))
            else:
                extend_rows.append(start)
                extend_chunks.append(chunk)
            start += chunk.num_new
        slot_rows = torch.from_numpy(np.concatenate(slot_parts)).to(self.device)
        decode = extend = None
        if decode_chunks:
            b = len(decode_chunks)
            table, kv_lens = _page_table(decode_chunks, page_size)
            splits = min(self.num_splits(b), max(1, -(-int(kv_lens.max()) // 256)))
            decode = DecodeMeta(
                q_rows=torch.tensor(decode_rows, dtype=torch.int64).to(self.device),
                page_table=torch.from_numpy(table).to(self.device),
                kv_lens=torch.from_numpy(kv_lens).to(self.device),
                num_splits=splits, **self._partials(b, splits))
        if extend_chunks:
            table, _ = _page_table(extend_chunks, page_size)
            ints = np.array([[r, c.num_new, c.num_cached] for r, c in
                             zip(extend_rows, extend_chunks, strict=True)], dtype=np.int32)
            dev = torch.from_numpy(ints.T.copy()).to(self.device)  # [3, N]
            extend = ExtendMeta(torch.from_numpy(table).to(self.device), dev[0], dev[1], dev[2],
                                max(c.num_new for c in extend_chunks))
        return TritonAttentionMetadata(slot_rows, decode, extend, tuple(whole_prompts))

    def _partials(self, batch: int, splits: int) -> dict[str, torch.Tensor]:
        return {
            "partial_out": torch.empty((batch, self.num_heads, splits, self.head_dim),
                                       dtype=torch.float32, device=self.device),
            "partial_lse": torch.empty((batch, self.num_heads, splits), dtype=torch.float32,
                                       device=self.device),
        }

    def decode_buffers(self, max_batch: int, max_pages: int) -> DecodeBuffers:
        return DecodeBuffers(self, max_batch, max_pages)

    # --- forward --------------------------------------------------------------------------

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                pool: KVPool, meta: TritonAttentionMetadata) -> torch.Tensor:
        """q: [T, heads, dim]; k, v: [T, kv_heads, dim] -> [T, heads * dim]. Rows may be
        strided (views into the fused QKV output); heads and dims must be dense."""
        num_tokens = q.shape[0]
        for t in (q, k, v):
            assert t.stride(2) == 1 and t.stride(1) == self.head_dim
        flat = pool.flat
        k_off = pool.layer_offset(layer, is_value=False)
        v_off = pool.layer_offset(layer, is_value=True)
        rows_per_page = pool.layout.rows_per_page
        page_size = pool.layout.page_size
        precision = "ieee" if flat.dtype == torch.float32 else "tf32"
        store_kv_kernel[(num_tokens,)](
            k, v, flat, meta.slot_rows, k.stride(0), v.stride(0), k_off, v_off,
            ROW=self.num_kv_heads * self.head_dim, ROW_PAD=self.row_pad)
        out = torch.empty((num_tokens, self.num_heads * self.head_dim), dtype=q.dtype,
                          device=q.device)
        d = meta.decode
        if d is not None:
            batch = d.q_rows.shape[0]
            decode_partial_kernel[(batch, self.num_kv_heads, d.num_splits)](
                q, d.q_rows, flat, d.page_table, d.kv_lens, d.partial_out, d.partial_lse,
                q.stride(0), d.page_table.stride(0), k_off, v_off, rows_per_page,
                self.qk_scale, self.window, d.num_splits,
                KV_HEADS=self.num_kv_heads, GROUP=self.group, GROUP_PAD=self.group_pad,
                HEAD_DIM=self.head_dim, DIM_PAD=self.dim_pad, PAGE_SIZE=page_size,
                BLOCK_N=DECODE_BLOCK_N, PRECISION=precision, num_warps=4)
            decode_reduce_kernel[(batch, self.num_heads)](
                d.partial_out, d.partial_lse, out, d.q_rows, out.stride(0), d.num_splits,
                NUM_HEADS=self.num_heads, HEAD_DIM=self.head_dim, DIM_PAD=self.dim_pad,
                SPLITS_PAD=next_power_of_2(d.num_splits), num_warps=1)
        e = meta.extend
        if e is not None:
            block_m = 128 if self.dim_pad <= 128 else 64
            # 4 warps, 3 stages: the fastest of the bf16 configurations tried on an H100 with
            # the 8B shape (commit 6fb7aad); float32 tiles need fewer stages
            warps, stages = (4, 3) if q.element_size() == 2 else (8, 2)
            grid = (-(-e.max_new // block_m), e.q_start.shape[0], self.num_heads)
            extend_kernel[grid](
                q, flat, out, e.page_table, e.q_start, e.num_new, e.num_cached,
                q.stride(0), out.stride(0), e.page_table.stride(0), k_off, v_off,
                rows_per_page, self.qk_scale, self.window,
                KV_HEADS=self.num_kv_heads, GROUP=self.group, HEAD_DIM=self.head_dim,
                DIM_PAD=self.dim_pad, PAGE_SIZE=page_size, BLOCK_M=block_m,
                BLOCK_N=EXTEND_BLOCK_N, PRECISION=precision, num_warps=warps, num_stages=stages)
        for first, n in meta.whole_prompts:
            rows = slice(first, first + n)
            self._whole_prompt(q[rows], k[rows], v[rows], out[rows])
        return out

    def _whole_prompt(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      out: torch.Tensor) -> None:
        """Causal attention of one prompt over its own tokens (none cached before it) into
        `out` [n, heads * dim]; q [n, heads, dim] and k, v [n, kv_heads, dim] as `forward`'s."""
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0),
            v.transpose(0, 1).unsqueeze(0), is_causal=True, scale=self.head_dim**-0.5,
            enable_gqa=self.group > 1)  # [1, heads, n, dim]
        out.view(q.shape[0], self.num_heads, self.head_dim).copy_(o[0].transpose(0, 1))


class DecodeBuffers:
    """Fixed metadata tensors for decode batches of up to `max_batch` sequences, filled in place
    before each CUDA-graph replay. `metadata(batch)` views the first `batch` rows; rows past
    the real batch are padding (no store, zero output).

    `fill` never makes the host wait for the GPU: on CUDA it stages the metadata in pinned
    memory and copies it asynchronously (two staging sets, alternating, so a set is rewritten
    only after the copy from it two fills ago, which the caller has waited for by then: every
    step waits for the tokens of the step before)."""

    # rows of `header`: the graph inputs, then the device-side token feed (`fill`'s
    # `token_rows` take the previous step's tokens at `token_sources`)
    INPUT_IDS, POSITIONS, SLOT_ROWS, KV_LENS, TOKEN_ROWS, TOKEN_SOURCES = range(6)

    def __init__(self, backend: TritonPagedAttention, max_batch: int, max_pages: int) -> None:
        device = backend.device
        self.backend = backend
        self.header = torch.zeros((6, max_batch), dtype=torch.int64, device=device)
        self.input_ids = self.header[self.INPUT_IDS]
        self.positions = self.header[self.POSITIONS]
        self.slot_rows = self.header[self.SLOT_ROWS]
        self.kv_lens = self.header[self.KV_LENS]
        self.slot_rows.fill_(-1)
        self.q_rows = torch.arange(max_batch, dtype=torch.int64, device=device)
        self.page_table = torch.zeros((max_batch, max_pages), dtype=torch.int32, device=device)
        pin = device.type == "cuda"
        self._staging = [(torch.zeros((6, max_batch), dtype=torch.int64, pin_memory=pin),
                          torch.zeros((max_batch, max_pages), dtype=torch.int32, pin_memory=pin))
                         for _ in range(2)]
        self._turn = 0
        self._partials: dict[int, dict[str, torch.Tensor]] = {}

    def metadata(self, batch: int) -> TritonAttentionMetadata:
        splits = self.backend.num_splits(batch)
        if batch not in self._partials:
            self._partials[batch] = self.backend._partials(batch, splits)
        decode = DecodeMeta(self.q_rows[:batch], self.page_table[:batch], self.kv_lens[:batch],
                            splits, **self._partials[batch])
        return TritonAttentionMetadata(self.slot_rows[:batch], decode, None)

    def fill(self, padded_batch: int, input_ids: list[int], chunks: list[SequenceChunk],
             page_size: int, rows_per_page: int,
             token_feed: tuple[list[int], list[int]] | None = None) -> None:
        """Write one decode batch (every chunk one new token) into the first rows; rows up to
        `padded_batch` become padding. `token_feed` = (rows, sources): rows whose input token is
        a placeholder (-1) the caller copies on the device (`token_feed_rows`)."""
        b = len(chunks)
        header, table = self._staging[self._turn]
        self._turn ^= 1
        h, t = header.numpy(), table.numpy()
        kv_lens = _kv_lens(chunks, np.int64)
        _write_page_rows(t, chunks, kv_lens, page_size)
        positions = kv_lens - 1
        pages = t[np.arange(b), positions // page_size].astype(np.int64)
        h[:4, b:padded_batch] = 0
        h[self.SLOT_ROWS, b:padded_batch] = -1
        h[self.INPUT_IDS, :b] = input_ids
        np.maximum(h[self.INPUT_IDS, :b], 0, out=h[self.INPUT_IDS, :b])
        h[self.POSITIONS, :b] = positions
        h[self.SLOT_ROWS, :b] = pages * rows_per_page + positions % page_size
        h[self.KV_LENS, :b] = kv_lens
        if token_feed is not None:
            rows, sources = token_feed
            h[self.TOKEN_ROWS, : len(rows)] = rows
            h[self.TOKEN_SOURCES, : len(rows)] = sources
        self.header.copy_(header, non_blocking=True)
        self.page_table[:b].copy_(table[:b], non_blocking=True)

    def token_feed_rows(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, sources) of the last `fill`'s token feed, on the device."""
        return self.header[self.TOKEN_ROWS, :n], self.header[self.TOKEN_SOURCES, :n]


def _page_table(chunks: list[SequenceChunk], page_size: int) -> tuple[np.ndarray, np.ndarray]:
    """[N, max_pages] int32 page ids (0-padded) covering each chunk's KV, [N] int32 KV lengths."""
    kv_lens = _kv_lens(chunks, np.int32)
    table = np.zeros((len(chunks), -(-int(kv_lens.max()) // page_size)), dtype=np.int32)
    _write_page_rows(table, chunks, kv_lens, page_size)
    return table, kv_lens


def _kv_lens(chunks: list[SequenceChunk], dtype: type) -> np.ndarray:
    """[N] tokens each chunk attends to: its cached ones and its new ones."""
    return np.fromiter((c.num_cached + c.num_new for c in chunks), dtype, len(chunks))


def _write_page_rows(table: np.ndarray, chunks: list[SequenceChunk], kv_lens: np.ndarray,
                     page_size: int) -> None:
    """Row i of `table` starts with the pages holding chunk i's first kv_lens[i] tokens (the
    rest of the row is left as it is: nothing reads past a sequence's length)."""
    for i, chunk in enumerate(chunks):
        n = -(-int(kv_lens[i]) // page_size)
        table[i, :n] = chunk.page_ids[:n]
