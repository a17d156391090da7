"""The engine on one GPU with a Llama-3.1-8B-shaped model (random bf16 weights), against what
the card can do and against Hugging Face transformers, all measured in this one process.

    python -m bench.engine_gpu [--out bench/results/engine-h100.json]

Baselines measured here first (`bench/gpu_baselines.py`): the device-to-device copy bandwidth
(bytes read + written per second) and the bf16 matmul rate. Then:
- decode step time at batch 1, 8, 32, 64 with ~1,000-token contexts: `LLMEngine.step()` of a
  batch that is all decoding (CUDA graphs, overlapped host work, Triton attention, greedy
  sampling, bookkeeping), the mean of 20 consecutive steps, against the memory roofline
  (weight bytes + KV bytes read) / copy bandwidth (goal <= 1.3x). The same steps without the
  overlap, and without graphs, are recorded too.
- prefill of a 4,096-token prompt in one step: model flops (2 x matmul parameters x tokens +
  causal attention) per second as a share of the matmul rate (goal >= 50%).
- decode throughput at batch 32 (1,000-token prompts): engine against transformers' `generate`
  on the same weights (the engine's model is built from the transformers model's tensors):
  (time for N new tokens - time for 1) per step, both sides (goal >= 5x), for the 8B shape and
  for a Llama-3.2-1B shape (where transformers' per-step overhead, not the weights, dominates).
- where a decode step's time goes, at batch 1 and 64: the captured graph's replay alone (GPU
  time), every weight matrix product of one step alone, and the attention kernels alone.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.gpu_baselines import copy_bandwidth, cuda_time_ms, gpu_machine, matmul_tflops
from services.engine.config import ModelConfig
from services.engine.engine import EngineConfig, LLMEngine
from services.engine.model import LlamaModel
from services.engine.sampling_params import SamplingParams

LLAMA_31_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": [128001, 128009],
    "attention_bias": False, "mlp_bias": False, "hidden_act": "silu",
}
LLAMA_32_1B = {
    **LLAMA_31_8B, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
    "head_dim": 64, "tie_word_embeddings": True,
    "rope_scaling": {**LLAMA_31_8B["rope_scaling"], "factor": 32.0},
}
CONTEXT = 1000
BATCHES = (1, 8, 32, 64)
PREFILL_TOKENS = 4096
HF_BATCH = 32
HF_NEW_TOKENS = 64


def _hf_model(shape: dict, device: torch.device):
    """transformers' Llama of `shape`, random weights (its own init), bf16, on `device`."""
    import transformers

    config = transformers.LlamaConfig(**{k: v for k, v in shape.items() if k != "architectures"})
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = transformers.LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def _prompts(n: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1000, 120000, (n, length), generator=g).tolist()


def _read_bytes(model: LlamaModel) -> int:
    """Weight bytes one decode step reads: every layer matrix and norm, the final norm and the
    LM head (the embedding table only gives the batch's rows)."""
    total = model.final_norm.nbytes + model.lm_head.nbytes
    for layer in model.layers:
        total += sum(t.nbytes for t in (layer.input_norm, layer.qkv, layer.o, layer.post_norm,
                                        layer.gate_up, layer.down))
    return total


def _matmul_params(config: ModelConfig) -> int:
    h, i, d = config.hidden_size, config.intermediate_size, config.head_dim
    per_layer = h * (config.num_heads + 2 * config.num_kv_heads) * d + config.num_heads * d * h
    per_layer += 3 * h * i
    return per_layer * config.num_layers


def decode_steps(engine: LLMEngine, batch: int, steps: int = 20) -> dict[str, float]:
    """Mean step time of `batch` sequences decoding after a CONTEXT-token prompt, `steps`
    consecutive steps timed together, with and without overlap and graphs."""
    params = SamplingParams(max_tokens=10_000, temperature=0.0, ignore_eos=True)
    ids = [f"d{batch}-{i}" for i in range(batch)]
    for rid, prompt in zip(ids, _prompts(batch, CONTEXT, seed=batch), strict=True):
        engine.add_request(rid, prompt, params)
    produced: set[str] = set()
    while len(produced) < batch:  # prefill until every sequence has its first token
        produced.update(o.request_id for o in engine.step())
    timings = {}
    graphs, overlap = engine.runner.graphs, engine._overlap
    modes = (("overlap", graphs, overlap), ("graphs", graphs, None), ("eager", None, None))
    for label, use_graphs, use_overlap in modes:
        engine._drain()  # the step in flight, if any, before switching (a benchmark-only knob)
        engine.runner.graphs, engine._overlap = use_graphs, use_overlap
        for _ in range(3):
            engine.step()
        # consecutive steps, timed together: an overlapped step returns before its GPU work
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            assert len(engine.step()) == batch
        torch.cuda.synchronize()
        timings[label] = (time.perf_counter() - start) / steps * 1e3
    engine._drain()
    engine._overlap = overlap
    engine.runner.graphs = graphs
    if graphs is not None:  # the last step's buffers are still filled in: replay it alone
        size = next(s for s in graphs.sizes if s >= batch)
        timings["replay"] = cuda_time_ms(graphs._graphs[size][0].replay, repeats=20)
        timings["matmuls"] = _matmul_ms(engine.model, batch)
        meta = graphs.buffers.metadata(size)
        timings["attention"] = _attention_ms(engine, meta, size)
    mean_context = statistics.mean(engine._requests[rid].seq.num_tokens for rid in ids)
    for rid in ids:
        engine.abort(rid)
    return {"step_ms": timings["overlap"], "serial_graph_step_ms": timings["graphs"],
            "eager_step_ms": timings["eager"],
            "graph_replay_ms": timings["replay"], "weight_matmuls_ms": timings["matmuls"],
            "attention_kernels_ms": timings["attention"], "mean_context_at_end": mean_context}


def _matmul_ms(model: LlamaModel, batch: int) -> float:
    """Every weight matrix product of one decode step of `batch` tokens, alone."""
    x = torch.randn(batch, model.config.hidden_size, dtype=model.dtype, device=model.device)
    qkv_in = torch.randn(batch, model.layers[0].o.shape[1], dtype=model.dtype,
                         device=model.device)
    mlp_in = torch.randn(batch, model.layers[0].down.shape[1], dtype=model.dtype,
                         device=model.device)

    def run() -> None:
        for layer in model.layers:
            F.linear(x, layer.qkv)
            F.linear(qkv_in, layer.o)
            F.linear(x, layer.gate_up)
            F.linear(mlp_in, layer.down)
        F.linear(x, model.lm_head)

    return cuda_time_ms(run, repeats=10)


def _attention_ms(engine: LLMEngine, meta, size: int) -> float:
    """The attention kernels (store + decode) of every layer for the last step's batch."""
    c = engine.model.config
    attention = engine.runner.attention
    q = torch.randn(size, c.num_heads, c.head_dim, dtype=engine.model.dtype,
                    device=engine.model.device)
    k = torch.randn(size, c.num_kv_heads, c.head_dim, dtype=engine.model.dtype,
                    device=engine.model.device)
    slots = meta.slot_rows.clone()
    meta.slot_rows.fill_(-1)  # time the reads without overwriting the sequences' last slot

    def run() -> None:
        for layer in range(c.num_layers):
            attention.forward(layer, q, k, k, engine.pool, meta)

    try:
        return cuda_time_ms(run, repeats=10)
    finally:
        meta.slot_rows.copy_(slots)


def bench_engine(model: LlamaModel, chunked_prefill_size: int = 8192) -> LLMEngine:
    """The engine the GPU benches measure: 4,600 pages of 16 tokens, no prefix cache, cuda:0."""
    return LLMEngine(model, None, EngineConfig(
        page_size=16, num_pages=4600, max_running_requests=64,
        chunked_prefill_size=chunked_prefill_size, enable_prefix_cache=False, device="cuda:0"))


def timed_prefill_step(engine: LLMEngine, batch: int, tokens: int, seed: int) -> float:
    """Seconds of one engine step that prefills `batch` random prompts of `tokens` tokens
    (first token sampled); AssertionError if they did not all finish in that step."""
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(_prompts(batch, tokens, seed)):
        engine.add_request(f"s{seed}-{i}", prompt, params)
    torch.cuda.synchronize()
    start = time.perf_counter()
    outputs = engine.step()
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    assert len(outputs) == batch and all(o.finished for o in outputs), "not one step"
    return elapsed


def prefill_step(engine: LLMEngine) -> float:
    """Median ms of one engine step that prefills a PREFILL_TOKENS prompt (the first of six
    left out)."""
    times = [timed_prefill_step(engine, 1, PREFILL_TOKENS, seed=100 + i) for i in range(6)]
    return statistics.median(times[1:]) * 1e3


def engine_generate_ms(engine: LLMEngine, prompts: list[list[int]], new_tokens: int) -> float:
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    torch.cuda.synchronize()
    start = time.perf_counter()
    results = engine.generate(prompts, params)
    torch.cuda.synchronize()
    assert all(len(r.token_ids) == new_tokens for r in results)
    return (time.perf_counter() - start) * 1e3


def hf_generate_ms(hf, prompts: list[list[int]], new_tokens: int) -> float:
    device = next(hf.parameters()).device
    input_ids = torch.tensor(prompts, device=device)
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                          max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          do_sample=False, pad_token_id=0)
    torch.cuda.synchronize()
    assert out.shape[1] == len(prompts[0]) + new_tokens
    return (time.perf_counter() - start) * 1e3


def compare_with_transformers(engine: LLMEngine, hf) -> dict[str, object]:
    prompts = _prompts(HF_BATCH, CONTEXT, seed=7)
    rows = {}
    for name, run in (("engine", lambda n: engine_generate_ms(engine, prompts, n)),
                      ("transformers", lambda n: hf_generate_ms(hf, prompts, n))):
        run(2)  # warm-up
        one = min(run(1) for _ in range(2))
        full = min(run(HF_NEW_TOKENS + 1) for _ in range(2))
        step_ms = (full - one) / HF_NEW_TOKENS
        rows[name] = {"generate_1_ms": round(one, 1),
                      f"generate_{HF_NEW_TOKENS + 1}_ms": round(full, 1),
                      "decode_step_ms": round(step_ms, 3),
                      "decode_tokens_per_s": round(HF_BATCH / step_ms * 1e3, 1)}
    import transformers

    out = {"goal": "speedup >= 5", "batch": HF_BATCH, "prompt_tokens": CONTEXT,
           "transformers_version": f"{transformers.__version__}, sdpa, dynamic cache", **rows,
           "speedup": round(rows["engine"]["decode_tokens_per_s"]
                            / rows["transformers"]["decode_tokens_per_s"], 2)}
    print("vs transformers", out, flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench/results/engine-h100.json")
    args = p.parse_args()
    device = torch.device("cuda:0")
    result: dict[str, object] = {"written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                 "machine": gpu_machine(device)}
    bandwidth = copy_bandwidth(device)
    tflops = matmul_tflops(device)
    result["baselines"] = {"copy_bandwidth_gb_s": round(bandwidth / 1e9, 1),
                           "matmul_bf16_tflops": round(tflops, 1)}
    print("baselines", result["baselines"], flush=True)

    hf = _hf_model(LLAMA_31_8B, device)
    config = ModelConfig.from_hf_dict(LLAMA_31_8B)
    weights = {k: v for k, v in hf.state_dict().items()}
    model = LlamaModel(config, weights, device=device, dtype=torch.bfloat16)
    engine = bench_engine(model)
    layout = engine.pool.layout
    kv_per_token = layout.page_bytes // layout.page_size
    weight_bytes = _read_bytes(model)
    result["model"] = {"shape": "Llama-3.1-8B (random bf16 weights)",
                       "weight_bytes_read_per_step": weight_bytes,
                       "kv_bytes_per_token": kv_per_token, "page_size": layout.page_size}

    decode = []
    for batch in BATCHES:
        d = decode_steps(engine, batch)
        kv_bytes = batch * d["mean_context_at_end"] * kv_per_token
        roofline_ms = (weight_bytes + kv_bytes) / bandwidth * 1e3
        row = {"batch": batch, **{k: round(v, 3) for k, v in d.items()},
               "kv_bytes_read": int(kv_bytes), "roofline_ms": round(roofline_ms, 3),
               "step_over_roofline": round(d["step_ms"] / roofline_ms, 3),
               "eager_over_roofline": round(d["eager_step_ms"] / roofline_ms, 3)}
        decode.append(row)
        print("decode", row, flush=True)
    result["decode"] = {"goal": "step_over_roofline <= 1.3", "rows": decode}

    prefill_ms = prefill_step(engine)
    c = config
    flops = (2 * _matmul_params(c) * PREFILL_TOKENS
             + 2 * PREFILL_TOKENS**2 * c.head_dim * c.num_heads * c.num_layers)
    achieved = flops / (prefill_ms / 1e3) / 1e12
    result["prefill"] = {"goal": "share_of_matmul_rate >= 0.5", "tokens": PREFILL_TOKENS,
                         "step_ms": round(prefill_ms, 2), "model_tflop": round(flops / 1e12, 2),
                         "achieved_tflops": round(achieved, 1),
                         "share_of_matmul_rate": round(achieved / tflops, 3)}
    print("prefill", result["prefill"], flush=True)

    result["vs_transformers_8b"] = compare_with_transformers(engine, hf)
    del engine, model, hf, weights
    gc.collect()
    torch.cuda.empty_cache()
    hf = _hf_model(LLAMA_32_1B, device)
    model = LlamaModel(ModelConfig.from_hf_dict(LLAMA_32_1B), dict(hf.state_dict()),
                       device=device, dtype=torch.bfloat16)
    engine = bench_engine(model)
    result["vs_transformers_1b"] = compare_with_transformers(engine, hf)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
