"""The engine against Hugging Face transformers `generate` on the embedded model, on this CPU.

    .venv/bin/python bench/engine_cpu.py [--decode-tokens 128] [--out bench/results/engine_cpu.json]

Both sides run the same dequantized weights (transformers loads the same GGUF) in fp32, with
the same torch thread count, in this one process, alternating, best of `--repeats`. Measured:
- single-stream decode tokens/s: (time to generate N tokens - time to generate 1) / (N - 1),
  so prefill is excluded on both sides (goal: engine >= 1.0x transformers);
- aggregate decode tokens/s with 16 concurrent requests through continuous batching, against
  transformers' single stream (goal >= 5x);
- prefill tokens/s for a 1,000-token prompt (goal >= 1.0x).
Results, with the machine named, go to `bench/results/engine_cpu.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

from services.engine.embedded import embedded_model_path
from services.engine.engine import EngineConfig, LLMEngine
from services.engine.loader import load_model
from services.engine.sampling_params import SamplingParams

CONCURRENCY = 16
PREFILL_TOKENS = 1000


def machine() -> dict[str, object]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__,
        "platform": platform.platform(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def best_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "engine_cpu.json"))
    args = ap.parse_args()
    n = args.decode_tokens

    from transformers import AutoModelForCausalLM

    loaded = load_model(None)
    engine = LLMEngine(loaded.model, loaded.tokenizer,
                       EngineConfig(max_running_requests=CONCURRENCY, enable_prefix_cache=False))
    path = embedded_model_path()
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                              dtype=torch.float32).eval()
    prompt = loaded.tokenizer.encode_chat(
        [{"role": "user", "content": "Write a long story about a lighthouse keeper."}])
    prompts16 = [prompt + [100 + i] for i in range(CONCURRENCY)]  # distinct, same length
    long_prompt = [(i * 7919) % 40000 + 100 for i in range(PREFILL_TOKENS)]

    def ours(prompts: list[list[int]], num: int) -> None:
        results = engine.generate(prompts, SamplingParams(max_tokens=num, temperature=0.0,
                                                          ignore_eos=True))
        assert all(len(r.token_ids) == num for r in results)

    @torch.inference_mode()
    def theirs(prompt_ids: list[int], num: int) -> None:
        out = hf.generate(torch.tensor([prompt_ids]), max_new_tokens=num, min_new_tokens=num,
                          do_sample=False, pad_token_id=0)
        assert out.shape[1] == len(prompt_ids) + num

    ours([prompt], 8)  # warm-up both
    theirs(prompt, 8)
    r = args.repeats
    t_ours_1 = best_time(lambda: ours([prompt], 1), r)
    t_ours_n = best_time(lambda: ours([prompt], n), r)
    t_hf_1 = best_time(lambda: theirs(prompt, 1), r)
    t_hf_n = best_time(lambda: theirs(prompt, n), r)
    ours_single = (n - 1) / (t_ours_n - t_ours_1)
    hf_single = (n - 1) / (t_hf_n - t_hf_1)
    t_ours_16 = best_time(lambda: ours(prompts16, n), r)
    ours_aggregate = CONCURRENCY * n / t_ours_16
    t_ours_prefill = best_time(lambda: ours([long_prompt], 1), r)
    t_hf_prefill = best_time(lambda: theirs(long_prompt, 1), r)

    results = {
        "benchmark": "engine_cpu",
        "machine": machine(),
        "model": "SmolLM2-135M-Instruct Q4_1 GGUF, dequantized to fp32",
        "baseline": f"transformers {__import__('transformers').__version__} generate, same weights",
        "prompt_tokens": len(prompt),
        "decode_tokens": n,
        "single_stream_decode_tok_s": {"engine": round(ours_single, 1),
                                       "transformers": round(hf_single, 1),
                                       "ratio": round(ours_single / hf_single, 2), "goal": 1.0},
        "aggregate_decode_tok_s_16": {"engine": round(ours_aggregate, 1),
                                      "transformers_single_stream": round(hf_single, 1),
                                      "ratio": round(ours_aggregate / hf_single, 2), "goal": 5.0},
        "prefill_tok_s_1000": {"engine": round(PREFILL_TOKENS / t_ours_prefill, 1),
                               "transformers": round(PREFILL_TOKENS / t_hf_prefill, 1),
                               "ratio": round(t_hf_prefill / t_ours_prefill, 2), "goal": 1.0},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    for key in ("single_stream_decode_tok_s", "aggregate_decode_tok_s_16", "prefill_tok_s_1000"):
        print(f"{key:30s} {results[key]}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
