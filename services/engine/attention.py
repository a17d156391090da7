"""Paged attention: the pluggable interface and the torch reference backend.

Contract of an `AttentionBackend`:
- `prepare(chunks, pool)` is called once per forward pass with, for every sequence of the
  batch in order, its page table, how many tokens already have KV (`num_cached`) and how many
  new tokens this pass computes (`num_new`). The new tokens of all sequences are concatenated
  in that order ("flat tokens"). It returns backend-specific metadata.
- `forward(layer, q, k, v, pool, meta)` writes the new tokens' K and V into their pool slots of
  `layer`, then returns each new token's attention output over its own sequence's tokens
  `[0, num_cached + i]` (causal; Mistral's sliding window applied when configured).

The torch backend is the reference: it runs on CPU and GPU and later kernels are tested
against it. Decode-like chunks (one new token) of all sequences share one batched SDPA over a
padded gather of their KV; each longer chunk gets its own SDPA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from services.engine.kv_pool import KVPool


@dataclass(frozen=True, slots=True)
class SequenceChunk:
    page_ids: list[int]
    num_cached: int  # tokens of this sequence whose KV is already in the pool
    num_new: int  # tokens computed in this pass, at positions [num_cached, num_cached+num_new)


class AttentionBackend(Protocol):
    def prepare(self, chunks: list[SequenceChunk], pool: KVPool) -> Any: ...

    def forward(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pool: KVPool, meta: Any
    ) -> torch.Tensor: ...


@dataclass(slots=True)
class _PrefillSlice:
    start: int  # first row of this chunk in the flat tokens
    num_new: int
    kv_rows: torch.Tensor | None  # [kv_len] layer-0 K rows; None: chunk is the whole context
    mask: torch.Tensor | None  # [num_new, kv_len] bool, True = may attend; None: plain causal


@dataclass(slots=True)
class TorchAttentionMetadata:
    slot_rows: torch.Tensor  # [num_tokens] layer-0 K row of each new token
    decode_token_idx: torch.Tensor | None  # [num_decode] flat rows of one-token chunks
    decode_kv_rows: torch.Tensor | None  # [num_decode, max_kv] layer-0 K rows, padded with 0
    decode_mask: torch.Tensor | None  # [num_decode, 1, 1, max_kv] bool, None if no padding
    prefills: list[_PrefillSlice]


class TorchPagedAttention:
    """Reference backend: index_copy into the pool, gather, `scaled_dot_product_attention`."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int,
                 sliding_window: int | None = None) -> None:
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        self.sliding_window = sliding_window

    def prepare(self, chunks: list[SequenceChunk], pool: KVPool) -> TorchAttentionMetadata:
        page_size = pool.layout.page_size
        rows_per_page = pool.layout.rows_per_page
        device = pool.device
        slot_rows: list[int] = []
        decode_idx: list[int] = []
        decode_chunks: list[SequenceChunk] = []
        prefills: list[_PrefillSlice] = []
        start = 0
        for chunk in chunks:
            if chunk.num_new == 1:
                pos = chunk.num_cached
                slot_rows.append(chunk.page_ids[pos // page_size] * rows_per_page + pos % page_size)
                decode_idx.append(start)
                decode_chunks.append(chunk)
            else:
                rows = _rows(chunk.page_ids, chunk.num_cached + chunk.num_new, page_size,
                             rows_per_page)  # [kv_len]
                slot_rows.extend(rows[chunk.num_cached :].tolist())
                prefills.append(self._prefill_slice(start, chunk, rows, device))
            start += chunk.num_new
        meta = TorchAttentionMetadata(
            slot_rows=torch.tensor(slot_rows, dtype=torch.long).to(device),
            decode_token_idx=None, decode_kv_rows=None, decode_mask=None, prefills=prefills,
        )
        if decode_chunks:
            self._prepare_decode(meta, decode_idx, decode_chunks, page_size, rows_per_page, device)
        return meta

    def _prepare_decode(
        self, meta: TorchAttentionMetadata, decode_idx: list[int], chunks: list[SequenceChunk],
        page_size: int, rows_per_page: int, device: torch.device,
    ) -> None:
        kv_lens = [c.num_cached + 1 for c in chunks]
        max_kv = max(kv_lens)
        max_pages = -(-max_kv // page_size)
        page_table = torch.tensor(
            [c.page_ids[:max_pages] + [0] * (max_pages - len(c.page_ids[:max_pages]))
             for c in chunks], dtype=torch.long,
        )  # [num_decode, max_pages]
        pos = torch.arange(max_kv)
        rows = page_table[:, pos // page_size] * rows_per_page + pos % page_size  # [B, max_kv]
        lengths = torch.tensor(kv_lens)[:, None]
        allowed = pos[None, :] < lengths  # [B, max_kv]
        if self.sliding_window is not None and max_kv > self.sliding_window:
            allowed &= pos[None, :] >= lengths - self.sliding_window
        meta.decode_token_idx = torch.tensor(decode_idx, dtype=torch.long).to(device)
        meta.decode_kv_rows = rows.to(device)
        if not bool(allowed.all()):
            meta.decode_mask = allowed[:, None, None, :].to(device)

    def forward(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        pool: KVPool, meta: TorchAttentionMetadata,
    ) -> torch.Tensor:
        # q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim]
        k_off = pool.layer_offset(layer, is_value=False)
        v_off = pool.layer_offset(layer, is_value=True)
        pool.flat.index_copy_(0, meta.slot_rows + k_off, k)
        pool.flat.index_copy_(0, meta.slot_rows + v_off, v)
        out = torch.empty_like(q)
        if meta.decode_token_idx is not None:
            assert meta.decode_kv_rows is not None
            qd = q.index_select(0, meta.decode_token_idx).unsqueeze(2)  # [B, H, 1, D]
            kd = pool.flat[meta.decode_kv_rows + k_off].transpose(1, 2)  # [B, KVH, max_kv, D]
            vd = pool.flat[meta.decode_kv_rows + v_off].transpose(1, 2)
            od = F.scaled_dot_product_attention(
                qd, kd, vd, attn_mask=meta.decode_mask, scale=self.scale, enable_gqa=True
            )  # [B, H, 1, D]
            out.index_copy_(0, meta.decode_token_idx, od.squeeze(2))
        for p in meta.prefills:
            end = p.start + p.num_new
            qp = q[p.start : end].transpose(0, 1).unsqueeze(0)  # [1, H, num_new, D]
            if p.kv_rows is None:
                kp, vp = k[p.start : end], v[p.start : end]  # [kv_len, KVH, D]
            else:
                kp, vp = pool.flat[p.kv_rows + k_off], pool.flat[p.kv_rows + v_off]
            op = F.scaled_dot_product_attention(
                qp, kp.transpose(0, 1).unsqueeze(0), vp.transpose(0, 1).unsqueeze(0),
                attn_mask=p.mask, is_causal=p.mask is None, scale=self.scale, enable_gqa=True,
            )  # [1, H, num_new, D]
            out[p.start : end] = op[0].transpose(0, 1)
        return out.view(q.shape[0], self.num_heads * self.head_dim)

    def _prefill_slice(
        self, start: int, chunk: SequenceChunk, rows: torch.Tensor, device: torch.device
    ) -> _PrefillSlice:
        kv_len = chunk.num_cached + chunk.num_new
        window = self.sliding_window
        needs_window = window is not None and kv_len > window
        mask = None
        if chunk.num_cached > 0 or needs_window:
            q_pos = torch.arange(chunk.num_cached, kv_len)[:, None]
            kv_pos = torch.arange(kv_len)[None, :]
            allowed = kv_pos <= q_pos
            if needs_window:
                assert window is not None  # needs_window says so
                allowed &= q_pos - kv_pos < window
            mask = allowed.to(device)
        kv_rows = rows.to(device) if chunk.num_cached > 0 else None
        return _PrefillSlice(start, chunk.num_new, kv_rows, mask)


def _rows(page_ids: list[int], num_tokens: int, page_size: int, rows_per_page: int) -> torch.Tensor:
    """[num_tokens] layer-0 K row in `KVPool.flat` of positions [0, num_tokens)."""
    pos = torch.arange(num_tokens)
    pages = torch.tensor(page_ids, dtype=torch.long)
    return pages[pos // page_size] * rows_per_page + pos % page_size
