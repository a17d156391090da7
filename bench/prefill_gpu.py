"""Where a prefill step's time goes, on one GPU with a Llama-3.1-8B-shaped model (random bf16
weights), against what the card and torch can do, all measured in this one process.

    python -m bench.prefill_gpu [--out bench/results/prefill-h100.json]

Why: a PD prefill worker is compute-bound (its engine runs ~90% of the time at 18 req/s of
2,000-token prompts on an H100), so its capacity is its step time. This says which kernels
that time is spent in, and how the attention kernels compare with torch's own.

Baselines measured here first: the bf16 matmul rate (`bench/gpu_baselines.py`) and, for each
shape, torch's `scaled_dot_product_attention` (causal, GQA, contiguous Q/K/V: flash attention)
on the same tokens. Then, for each batch shape (the serving mix's two 2,000-token prompts per
4,096-token step, and one 4,096-token prompt):
- the engine step time (`LLMEngine.step()`, one token sampled per prompt), and the model flops
  per second as a share of the matmul rate; the step time again with every prompt through the
  extend kernel (the backend before whole prompts went to SDPA);
- GPU kernel time by kind over the profiled steps (torch.profiler): weight matmuls, attention
  (the extend kernel and SDPA's), KV store, the fused element-wise kernels, other; and the
  step's idle GPU time;
- one step's attention alone over every layer: the backend as the engine runs it (whole prompts
  through torch's SDPA), the extend kernel alone on the same chunks, and torch's SDPA.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.autograd import DeviceType

from bench.engine_gpu import (
    LLAMA_31_8B,
    _hf_model,
    _matmul_params,
    bench_engine,
    timed_prefill_step,
)
from bench.gpu_baselines import cuda_time_ms, gpu_machine, matmul_tflops
from services.engine import triton_attention
from services.engine.attention import SequenceChunk
from services.engine.config import ModelConfig
from services.engine.engine import LLMEngine
from services.engine.model import LlamaModel

SHAPES = {"2x2000": (2, 2000), "1x4096": (1, 4096)}  # (prompts per step, tokens per prompt)
KINDS = (  # (kind, substrings of a kernel's name), first match wins
    ("attention", ("extend_kernel", "flash", "fmha", "sdpa", "attention")),
    ("kv_store", ("store_kv",)),
    ("fused_elementwise", ("add_rms_norm", "rope", "silu_mul")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "sm90", "cublas")),
)


def _kind(name: str) -> str:
    lowered = name.lower()
    for kind, needles in KINDS:
        if any(n in lowered for n in needles):
            return kind
    return "other"


def _causal_attention_flops(config: ModelConfig, batch: int, tokens: int) -> float:
    """QK^T and PV over the causal half, every layer."""
    return 2.0 * batch * tokens * tokens * config.head_dim * config.num_heads * config.num_layers


def _model_flops(config: ModelConfig, batch: int, tokens: int) -> float:
    return 2.0 * _matmul_params(config) * batch * tokens + _causal_attention_flops(
        config, batch, tokens)


@contextlib.contextmanager
def extend_kernel_only() -> Iterator[None]:
    """The baseline: every prefill chunk prepared for the extend kernel, none for SDPA."""
    threshold = triton_attention.WHOLE_PROMPT_MIN_TOKENS
    triton_attention.WHOLE_PROMPT_MIN_TOKENS = 1 << 62
    try:
        yield
    finally:
        triton_attention.WHOLE_PROMPT_MIN_TOKENS = threshold


def step_breakdown(engine: LLMEngine, batch: int, tokens: int, steps: int = 4) -> dict:
    from torch.profiler import ProfilerActivity, profile

    for i in range(3):  # compile and warm every kernel of this shape
        timed_prefill_step(engine, batch, tokens, seed=1000 + i)
    times = [timed_prefill_step(engine, batch, tokens, seed=2000 + i) for i in range(6)]
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        wall = sum(timed_prefill_step(engine, batch, tokens, seed=3000 + i) for i in range(steps))
    by_kind: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        if getattr(event, "device_type", DeviceType.CUDA) != DeviceType.CUDA:
            continue  # host-side events (launch calls) have no kernel time of their own
        device_us = getattr(event, "self_device_time_total", None)
        if device_us is None:
            device_us = event.self_cuda_time_total
        if device_us > 0:
            by_kind[_kind(event.key)] += device_us / 1e3 / steps
    with extend_kernel_only():
        timed_prefill_step(engine, batch, tokens, seed=3999)  # its kernel compiled for this shape
        baseline = [timed_prefill_step(engine, batch, tokens, seed=4000 + i) for i in range(6)]
    step_ms = statistics.median(times) * 1e3
    busy = sum(by_kind.values())
    return {"step_ms": round(step_ms, 2),
            "step_ms_extend_kernel_only": round(statistics.median(baseline) * 1e3, 2),
            "profiled_step_ms": round(wall * 1e3 / steps, 2),
            "kernel_ms_per_step": {k: round(v, 2) for k, v in
                                   sorted(by_kind.items(), key=lambda kv: -kv[1])},
            "gpu_idle_ms_per_step": round(wall * 1e3 / steps - busy, 2)}


def attention_alone(engine: LLMEngine, batch: int, tokens: int) -> dict:
    """One step's attention over every layer (pages as the engine allocates them): the engine's
    backend as it runs (whole prompts through torch's SDPA, `triton_attention.py`), the extend
    kernel alone on the same chunks, and torch's SDPA on contiguous tensors of the same shapes."""
    c = engine.model.config
    dev, dtype = engine.model.device, engine.model.dtype
    pages_per_seq = -(-tokens // engine.pool.layout.page_size)
    chunks = [SequenceChunk(list(range(1 + i * pages_per_seq, 1 + (i + 1) * pages_per_seq)),
                            0, tokens) for i in range(batch)]
    attention = engine.runner.attention
    backend_meta = attention.prepare(chunks, engine.pool)
    with extend_kernel_only():
        kernel_meta = attention.prepare(chunks, engine.pool)
    n = batch * tokens
    q = torch.randn(n, c.num_heads, c.head_dim, dtype=dtype, device=dev)
    k = torch.randn(n, c.num_kv_heads, c.head_dim, dtype=dtype, device=dev)
    v = torch.randn_like(k)

    def layers(meta) -> Callable[[], None]:
        def run() -> None:
            for layer in range(c.num_layers):
                attention.forward(layer, q, k, v, engine.pool, meta)
        return run

    qs = q.view(batch, tokens, c.num_heads, c.head_dim).transpose(1, 2)
    ks = k.view(batch, tokens, c.num_kv_heads, c.head_dim).transpose(1, 2)
    vs = v.view(batch, tokens, c.num_kv_heads, c.head_dim).transpose(1, 2)

    def sdpa() -> None:
        for _ in range(c.num_layers):
            F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)

    flops = _causal_attention_flops(c, batch, tokens)
    row = {}
    for name, run in (("backend", layers(backend_meta)), ("extend_kernel", layers(kernel_meta)),
                      ("torch_sdpa", sdpa)):
        ms = cuda_time_ms(run, repeats=10)
        row[f"{name}_ms"] = round(ms, 2)
        row[f"{name}_tflops"] = round(flops / ms / 1e9, 1)
    row["extend_kernel_over_sdpa"] = round(row["extend_kernel_ms"] / row["torch_sdpa_ms"], 3)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench/results/prefill-h100.json")
    args = p.parse_args()
    device = torch.device("cuda:0")
    result: dict[str, object] = {"written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                 "machine": gpu_machine(device)}
    tflops = matmul_tflops(device)
    result["baselines"] = {"matmul_bf16_tflops": round(tflops, 1)}
    print("baselines", result["baselines"], flush=True)
    hf = _hf_model(LLAMA_31_8B, device)
    config = ModelConfig.from_hf_dict(LLAMA_31_8B)
    model = LlamaModel(config, dict(hf.state_dict()), device=device, dtype=torch.bfloat16)
    del hf
    engine = bench_engine(model, chunked_prefill_size=4096)
    shapes = {}
    for name, (batch, tokens) in SHAPES.items():
        row = step_breakdown(engine, batch, tokens)
        flops = _model_flops(config, batch, tokens)
        row["model_tflop"] = round(flops / 1e12, 2)
        row["share_of_matmul_rate"] = round(flops / (row["step_ms"] / 1e3) / 1e12 / tflops, 3)
        row["prompt_tokens_per_s"] = round(batch * tokens / row["step_ms"] * 1e3)
        row["attention_alone"] = attention_alone(engine, batch, tokens)
        shapes[name] = row
        print(name, row, flush=True)
    result["shapes"] = shapes
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
