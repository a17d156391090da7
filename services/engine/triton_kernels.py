"""Triton kernels of the paged attention backend (`triton_attention.py` launches them).

All kernels address the KV pool through its flat row view (`KVPool.flat`, one row = one token's
K or V of one layer, `[rows, kv_heads, head_dim]`, contiguous): the row of position `pos` of a
sequence in layer `l` is

    page_table[pos // PAGE_SIZE] * rows_per_page + (2 * l + is_value) * PAGE_SIZE + pos % PAGE_SIZE

so each kernel takes the layer's K and V row offsets (`k_off`, `v_off`) as plain integers.

- `store_kv_kernel`: writes the new tokens' K and V into their slots; a slot of -1 (padding of
  a CUDA-graph batch) is skipped.
- `decode_partial_kernel` + `decode_reduce_kernel`: one query token per sequence (decode),
  flash-decoding: the KV of each sequence is split into `num_splits` parts read in parallel,
  each program serving every query head of one KV head (GQA), then the parts are merged by
  their log-sum-exp. A sequence of KV length 0 (padding) gets a zero output.
- `extend_kernel`: several query tokens per sequence (prefill chunks, possibly after cached
  tokens): causal flash attention over the sequence's pages, optional sliding window.

Head dims need not be powers of two (padded with masks). Float32 pools use IEEE dot products,
so the kernels can be checked tightly against the torch reference; bfloat16/float16 pools use
the tensor cores with float32 accumulation.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def store_kv_kernel(K, V, Pool, SlotRows, stride_k, stride_v, k_off, v_off,
                    ROW: tl.constexpr, ROW_PAD: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(SlotRows + t)
    if slot >= 0:
        cols = tl.arange(0, ROW_PAD)
        mask = cols < ROW
        k = tl.load(K + t * stride_k + cols, mask=mask)
        v = tl.load(V + t * stride_v + cols, mask=mask)
        tl.store(Pool + (slot + k_off) * ROW + cols, k, mask=mask)
        tl.store(Pool + (slot + v_off) * ROW + cols, v, mask=mask)


@triton.jit
def _load_kv(Pool, Table, pos, valid, kvh, k_off, v_off, rows_per_page, d, d_mask,
             KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr):
    """K and V [len(pos), DIM_PAD] of one KV head at positions `pos` of the sequence whose page
    table row starts at `Table` (zeros where not `valid`)."""
    page = tl.load(Table + pos // PAGE_SIZE, mask=valid, other=0)
    row = page.to(tl.int64) * rows_per_page + pos % PAGE_SIZE
    row_elems = KV_HEADS * HEAD_DIM
    offs = row[:, None] * row_elems + kvh * HEAD_DIM + d[None, :]
    mask = valid[:, None] & d_mask[None, :]
    k = tl.load(Pool + k_off * row_elems + offs, mask=mask, other=0.0)
    v = tl.load(Pool + v_off * row_elems + offs, mask=mask, other=0.0)
    return k, v


@triton.jit
def _online_softmax_step(qk, v, m_i, l_i, acc, PRECISION: tl.constexpr):
    """One block of flash attention's online softmax: fold scores `qk` [rows, BLOCK_N] (log2
    units, -inf where masked) and values `v` [BLOCK_N, DIM_PAD] into the running max `m_i`,
    sum `l_i` and output `acc`. A row with nothing unmasked yet keeps m_i = -inf, l_i = 0."""
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(qk - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def decode_partial_kernel(
    Q, QRows, Pool, PageTable, KvLens, PartialOut, PartialLse,
    stride_q, stride_pt, k_off, v_off, rows_per_page, qk_scale, window, num_splits,
    KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr, PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    """Program (b, kv_head, split): the query heads kv_head * GROUP + g (g < GROUP) of flat
    row QRows[b] against the split's part of decode sequence b's KV. Writes its normalized
    output and log2-sum-exp per head."""
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    s = tl.program_id(2)
    num_heads = KV_HEADS * GROUP
    kv_len = tl.load(KvLens + b)
    lo = kv_len * 0
    if window > 0:
        lo = tl.maximum(kv_len - window, 0)
    span = kv_len - lo
    per_split = tl.cdiv(tl.cdiv(span, num_splits), BLOCK_N) * BLOCK_N
    start = lo + s * per_split
    end = tl.minimum(start + per_split, kv_len)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, DIM_PAD)
    d_mask = d < HEAD_DIM
    heads = kvh * GROUP + g
    q_row = tl.load(QRows + b)
    q = tl.load(Q + q_row * stride_q + heads[:, None] * HEAD_DIM + d[None, :],
                mask=(g[:, None] < GROUP) & d_mask[None, :], other=0.0)  # [GROUP_PAD, DIM_PAD]

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, DIM_PAD], tl.float32)
    for n in range(start, end, BLOCK_N):
        pos = n + tl.arange(0, BLOCK_N)
        valid = pos < end
        k, v = _load_kv(Pool, PageTable + b * stride_pt, pos, valid, kvh, k_off, v_off,
                        rows_per_page, d, d_mask, KV_HEADS, HEAD_DIM, PAGE_SIZE)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # log2 units
        qk = tl.where(valid[None, :], qk, float("-inf"))
        m_i, l_i, acc = _online_softmax_step(qk, v, m_i, l_i, acc, PRECISION)

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    head_mask = g < GROUP
    base = (b * num_heads + heads) * num_splits + s  # [GROUP_PAD]
    tl.store(PartialOut + base[:, None] * HEAD_DIM + d[None, :], out,
             mask=head_mask[:, None] & d_mask[None, :])
    tl.store(PartialLse + base, lse, mask=head_mask)


@triton.jit
def decode_reduce_kernel(
    PartialOut, PartialLse, Out, OutRows, stride_out, num_splits,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
):
    """Program (b, head): merges the splits of one query head into Out[OutRows[b], head]."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    sp = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, DIM_PAD)
    base = (b * NUM_HEADS + h) * num_splits
    lse = tl.load(PartialLse + base + sp, mask=sp < num_splits, other=float("-inf"))
    m = tl.max(lse, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m_safe)  # 0 for empty splits
    total = tl.sum(w, 0)
    parts = tl.load(PartialOut + (base + sp)[:, None] * HEAD_DIM + d[None, :],
                    mask=(sp[:, None] < num_splits) & (d[None, :] < HEAD_DIM), other=0.0)
    out = tl.sum(parts * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    row = tl.load(OutRows + b)
    tl.store(Out + row * stride_out + h * HEAD_DIM + d, out.to(Out.dtype.element_ty),
             mask=d < HEAD_DIM)


@triton.jit
def extend_kernel(
    Q, Pool, Out, PageTable, QStart, NumNew, NumCached,
    stride_q, stride_out, stride_pt, k_off, v_off, rows_per_page, qk_scale, window,
    KV_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    """Program (m_block, seq, head): BLOCK_M new tokens of one sequence, one query head,
    causal over the sequence's cached and new tokens (and the sliding window if > 0).

    The last query blocks (the longest rows) are launched first, so the short ones fill the
    tail. Without a window, the KV blocks wholly before the block's first query need no mask
    and take the unmasked loop; only the blocks at the diagonal are masked."""
    mb = tl.num_programs(0) - 1 - tl.program_id(0)
    i = tl.program_id(1)
    h = tl.program_id(2)
    num_new = tl.load(NumNew + i)
    if mb * BLOCK_M < num_new:
        q_start = tl.load(QStart + i)
        num_cached = tl.load(NumCached + i)
        kvh = h // GROUP
        m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        m_valid = m < num_new
        q_pos = num_cached + m
        d = tl.arange(0, DIM_PAD)
        d_mask = d < HEAD_DIM
        q = tl.load(Q + (q_start + m)[:, None] * stride_q + h * HEAD_DIM + d[None, :],
                    mask=m_valid[:, None] & d_mask[None, :], other=0.0)
        table = PageTable + i * stride_pt

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, DIM_PAD], tl.float32)
        first_q = num_cached + mb * BLOCK_M
        hi = tl.minimum(first_q + BLOCK_M, num_cached + num_new)
        lo = first_q * 0
        unmasked_end = first_q // BLOCK_N * BLOCK_N  # every query of the block sees these
        if window > 0:
            lo = tl.maximum(first_q - window + 1, 0) // BLOCK_N * BLOCK_N
            unmasked_end = lo
        for n in range(lo, unmasked_end, BLOCK_N):
            pos = n + tl.arange(0, BLOCK_N)
            k, v = _load_kv(Pool, table, pos, pos >= 0, kvh, k_off, v_off, rows_per_page, d,
                            d_mask, KV_HEADS, HEAD_DIM, PAGE_SIZE)
            qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # log2 units
            m_i, l_i, acc = _online_softmax_step(qk, v, m_i, l_i, acc, PRECISION)
        for n in range(unmasked_end, hi, BLOCK_N):
            pos = n + tl.arange(0, BLOCK_N)
            in_seq = pos < hi
            k, v = _load_kv(Pool, table, pos, in_seq, kvh, k_off, v_off, rows_per_page, d,
                            d_mask, KV_HEADS, HEAD_DIM, PAGE_SIZE)
            qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            allowed = (pos[None, :] <= q_pos[:, None]) & in_seq[None, :]
            allowed = allowed & ((window <= 0) | (q_pos[:, None] - pos[None, :] < window))
            qk = tl.where(allowed, qk, float("-inf"))
            m_i, l_i, acc = _online_softmax_step(qk, v, m_i, l_i, acc, PRECISION)

        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(Out + (q_start + m)[:, None] * stride_out + h * HEAD_DIM + d[None, :],
                 out.to(Out.dtype.element_ty), mask=m_valid[:, None] & d_mask[None, :])


def next_power_of_2(n: int) -> int:
    return triton.next_power_of_2(n)
