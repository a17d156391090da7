"""`tandem generate`: run one prompt, or a JSONL file of them, through the engine.

    tandem generate --prompt "What is the capital of France?" --chat --max-tokens 32
    tandem generate --prompts-file in.jsonl --output out.jsonl

A line of the prompts file is an object with "prompt" (text) or "messages" (a chat), an
optional "id", and optional sampling fields ("max_tokens", "temperature", "top_p", "top_k",
"min_p", "seed", "stop", ...) that override the command line's. All prompts run together through
continuous batching; one JSON object per prompt is written, in input order.
Bad input exits with status 2 and a one-line message, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from services.engine.engine import EngineConfig, LLMEngine
from services.engine.loader import DTYPES, load_model, resolve_dtype
from services.engine.output import Completion
from services.engine.sampling_params import SamplingParams
from services.engine.tokenizer import Tokenizer

SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed",
                   "presence_penalty", "frequency_penalty", "repetition_penalty", "stop",
                   "stop_token_ids", "ignore_eos", "logprobs")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tandem generate", description=__doc__.split("\n")[0])
    p.add_argument("--model-path", default=None,
                   help="Hugging Face folder or GGUF file (default: the embedded SmolLM2-135M)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the prompt text")
    src.add_argument("--prompts-file", help="JSONL file of prompts (see module help)")
    p.add_argument("--output", help="write JSONL here instead of standard output")
    p.add_argument("--chat", action="store_true", help="wrap --prompt as a user chat message")
    p.add_argument("--json", action="store_true", help="print one JSON object, not the text")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--logprobs", type=int, default=None, help="top-k logprobs per token")
    defaults = EngineConfig()
    p.add_argument("--device", default=defaults.device)
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--page-size", type=int, default=defaults.page_size)
    p.add_argument("--num-kv-pages", type=int, default=defaults.num_pages)
    p.add_argument("--max-running-requests", type=int, default=defaults.max_running_requests)
    p.add_argument("--chunked-prefill-size", type=int, default=defaults.chunked_prefill_size)
    p.add_argument("--max-model-len", type=int, default=defaults.max_model_len)
    p.add_argument("--disable-prefix-cache", action="store_true")
    return p


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except (ValueError, FileNotFoundError, json.JSONDecodeError) as e:
        print(f"tandem generate: error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    base = {
        "max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p,
        "top_k": args.top_k, "min_p": args.min_p, "seed": args.seed, "stop": args.stop,
        "ignore_eos": args.ignore_eos, "logprobs": args.logprobs,
    }
    if args.prompt is not None and not args.prompt.strip():
        raise ValueError("the prompt is empty")
    if args.prompt is not None:
        items = [{"messages": [{"role": "user", "content": args.prompt}]} if args.chat
                 else {"prompt": args.prompt}]
    else:
        items = _read_prompts(args.prompts_file)
    SamplingParams.create(**base)  # bad flags fail before the model loads
    config = EngineConfig(
        page_size=args.page_size, num_pages=args.num_kv_pages,
        max_running_requests=args.max_running_requests,
        chunked_prefill_size=args.chunked_prefill_size, max_model_len=args.max_model_len,
        enable_prefix_cache=not args.disable_prefix_cache, device=args.device,
    )
    loaded = load_model(args.model_path, device=args.device,
                        dtype=resolve_dtype(args.dtype, args.device))
    engine = LLMEngine(loaded.model, loaded.tokenizer, config)
    prompts = [_tokenize(loaded.tokenizer, item, i) for i, item in enumerate(items)]
    params = [SamplingParams.create(**{**base, **{k: v for k, v in item.items()
                                                  if k in SAMPLING_FIELDS}}) for item in items]
    results = engine.generate(prompts, params)
    records = [_record(item, i, r, args.logprobs is not None or "logprobs" in item)
               for i, (item, r) in enumerate(zip(items, results, strict=True))]
    if args.prompt is not None and not args.json and args.output is None:
        print(results[0].text)
        return 0
    out = open(args.output, "w") if args.output else sys.stdout
    try:
        for record in records:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    finally:
        if args.output:
            out.close()
    return 0


def _read_prompts(path: str) -> list[dict[str, Any]]:
    items = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(item, dict) or ("prompt" in item) == ("messages" in item):
                raise ValueError(f"{path}:{n}: each line needs exactly one of 'prompt', 'messages'")
            items.append(item)
    if not items:
        raise ValueError(f"{path}: no prompts in it")
    return items


def _tokenize(tokenizer: Tokenizer, item: dict[str, Any], index: int) -> list[int]:
    if "messages" in item:
        return tokenizer.encode_chat(item["messages"], add_generation_prompt=True)
    if not isinstance(item["prompt"], str):
        raise ValueError(f"prompt {index}: 'prompt' must be a string")
    ids = tokenizer.encode(item["prompt"])
    if not ids:
        raise ValueError(f"prompt {index}: the prompt is empty")
    return ids


def _record(item: dict[str, Any], index: int, result: Completion, with_logprobs: bool) -> dict:
    record: dict[str, Any] = {
        "id": item.get("id", index),
        "text": result.text,
        "token_ids": result.token_ids,
        "prompt_token_ids": result.prompt_token_ids,
        "finish_reason": result.finish_reason,
    }
    if with_logprobs:
        record["logprobs"] = [
            {"token_id": lp.token_id, "logprob": lp.logprob,
             "top": dict(zip(map(str, lp.top_token_ids), lp.top_logprobs, strict=True))}
            for lp in result.logprobs
        ]
    return record
