"""Fused element-wise steps of the decoder layer as Triton kernels (the GPU path of `model.py`).

A decode step at small batch is bound by weight reads, and every extra kernel between two matrix
products costs a few microseconds even inside a CUDA graph: unfused, RMSNorm, residual adds,
rotary embeddings and SiLU-and-multiply are ~20 launches per layer. These fuse them to three:

- `add_rms_norm(x, residual, weight, eps)`: `residual += x` in place, returns
  `rms_norm(residual) * weight` (the sum is rounded to the residual's dtype before the norm, as
  the unfused torch path rounds it).
- `rope_(x, positions, cos, sin)`: rotates `x` [tokens, heads, head_dim] in place (Hugging
  Face's rotate-half convention, `cos`/`sin` the `RotaryEmbedding` tables); `x` may be a view
  into the fused QKV output (rows strided, heads and dims dense).
- `silu_mul(gate_up)`: [tokens, 2 * inter] -> silu(gate) * up, [tokens, inter].

Each computes in float32 and rounds once to the tensors' dtype. `model.py` keeps the torch
versions as the reference they are tested against.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rms_norm_kernel(X, Residual, Weight, Out, stride_x, stride_r, stride_o, eps,
                         N: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(X + t * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(Residual + t * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
    s = (x + r).to(Residual.dtype.element_ty)
    tl.store(Residual + t * stride_r + cols, s, mask=mask)
    s = s.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(s * s, 0) / N + eps)
    w = tl.load(Weight + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Out + t * stride_o + cols, (s * inv * w).to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(X, Positions, Cos, Sin, stride_t, stride_h, stride_table,
                 HALF: tl.constexpr, HALF_PAD: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1)
    d = tl.arange(0, HALF_PAD)
    mask = d < HALF
    pos = tl.load(Positions + t)
    c = tl.load(Cos + pos * stride_table + d, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(Sin + pos * stride_table + d, mask=mask, other=0.0).to(tl.float32)
    base = X + t * stride_t + h * stride_h
    x1 = tl.load(base + d, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF + d, mask=mask, other=0.0).to(tl.float32)
    tl.store(base + d, (x1 * c - x2 * s).to(X.dtype.element_ty), mask=mask)
    tl.store(base + HALF + d, (x2 * c + x1 * s).to(X.dtype.element_ty), mask=mask)


@triton.jit
def _silu_mul_kernel(GateUp, Out, stride_in, stride_out, N, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    g = tl.load(GateUp + t * stride_in + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(GateUp + t * stride_in + N + cols, mask=mask, other=0.0).to(tl.float32)
    y = g / (1.0 + tl.exp(-g)) * u
    tl.store(Out + t * stride_out + cols, y.to(Out.dtype.element_ty), mask=mask)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> torch.Tensor:
    """x, residual: [tokens, hidden] (inner dim dense). Updates `residual`; returns the norm."""
    tokens, n = residual.shape
    assert x.stride(1) == 1 and residual.stride(1) == 1
    out = torch.empty_like(residual)
    block = triton.next_power_of_2(n)
    _add_rms_norm_kernel[(tokens,)](x, residual, weight, out, x.stride(0), residual.stride(0),
                                    out.stride(0), eps, N=n, BLOCK=block,
                                    num_warps=min(16, max(1, block // 256)))
    return out


def rope_(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
          sin: torch.Tensor) -> torch.Tensor:
    """Rotates x [tokens, heads, head_dim] in place; cos/sin: [max_positions, head_dim]."""
    tokens, heads, dim = x.shape
    assert x.stride(2) == 1 and cos.stride(1) == 1 and cos.stride() == sin.stride()
    half = dim // 2
    _rope_kernel[(tokens, heads)](x, positions, cos, sin, x.stride(0), x.stride(1),
                                  cos.stride(0), HALF=half,
                                  HALF_PAD=triton.next_power_of_2(half), num_warps=1)
    return x


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    tokens, two_n = gate_up.shape
    n = two_n // 2
    assert gate_up.stride(1) == 1
    out = torch.empty((tokens, n), dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _silu_mul_kernel[(tokens, triton.cdiv(n, block))](gate_up, out, gate_up.stride(0),
                                                      out.stride(0), n, BLOCK=block,
                                                      num_warps=4)
    return out
