"""`tandem bench` flags: SGLang `bench_serving` names where they exist.

Contract: `parse_args(argv)` returns a validated `BenchConfig` or raises ValueError with one line
naming the flag. Defaults come from the dataclass fields. `base_url` is the server's root without
`/v1` (a trailing `/v1` is dropped, so the OpenAI SDK's base URL also works). `ignore_eos` left
unset means on for the random dataset (output lengths as asked) and off for ShareGPT.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass, fields

BACKENDS = {"openai": "/v1/completions", "openai-chat": "/v1/chat/completions"}
DATASETS = ("random", "sharegpt")
API_KEY_ENVS = ("OPENAI_API_KEY", "TANDEM_API_KEY")  # the second is the gateway's


@dataclass(frozen=True, slots=True)
class BenchConfig:
    base_url: str = "http://127.0.0.1:8000"
    backend: str = "openai-chat"
    model: str | None = None              # None: the first of GET /v1/models
    dataset_name: str = "random"
    dataset_path: str | None = None
    num_prompts: int = 1000
    random_input_len: int = 1024
    random_output_len: int = 1024
    random_range_ratio: float = 0.0
    sharegpt_output_len: int | None = None
    seed: int = 1
    request_rate: float = math.inf        # requests/s, Poisson arrivals; inf: all at once
    max_concurrency: int | None = None
    temperature: float = 0.0
    ignore_eos: bool = True
    warmup_requests: int = 1
    timeout_s: float = 1800.0             # per request, from send to the end of its stream
    slo_ttft_ms: float | None = None
    slo_itl_ms: float | None = None       # compared with each request's TPOT (see report.py)
    disable_tqdm: bool = False
    output_json: str | None = None
    api_key: str | None = None

    @property
    def endpoint(self) -> str:
        return self.base_url + BACKENDS[self.backend]


class _ArgumentError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump; the caller decides the exit
        raise _ArgumentError(message)


def build_parser() -> argparse.ArgumentParser:
    d = BenchConfig()
    p = _Parser(
        prog="tandem bench",
        description="benchmark a running OpenAI-compatible server: latency percentiles, "
                    "throughput, goodput")
    p.add_argument("--base-url", default=None, help=f"server root (default {d.base_url})")
    p.add_argument("--host", default=None, help="with --port, instead of --base-url")
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--backend", choices=tuple(BACKENDS), default=d.backend,
                   help="openai: /v1/completions; openai-chat: /v1/chat/completions")
    p.add_argument("--model", default=d.model, help="default: the first of GET /v1/models")
    p.add_argument("--dataset-name", choices=DATASETS, default=d.dataset_name)
    p.add_argument("--dataset-path", default=d.dataset_path,
                   help="ShareGPT JSON: a list of {\"conversations\": [{\"from\", \"value\"}]}")
    p.add_argument("--num-prompts", type=int, default=d.num_prompts)
    p.add_argument("--random-input-len", type=int, default=d.random_input_len,
                   help="prompt tokens, approximately (words; see workload.py)")
    p.add_argument("--random-output-len", type=int, default=d.random_output_len)
    p.add_argument("--random-range-ratio", type=float, default=d.random_range_ratio,
                   help="lengths are uniform in [len * ratio, len]")
    p.add_argument("--sharegpt-output-len", type=int, default=d.sharegpt_output_len,
                   help="output tokens of every ShareGPT request (default: its reply's length)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--request-rate", type=float, default=d.request_rate,
                   help="requests/s with Poisson arrivals (default inf: all at once)")
    p.add_argument("--max-concurrency", type=int, default=d.max_concurrency)
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=None,
                   help="send ignore_eos (default: on for random, off for sharegpt)")
    p.add_argument("--warmup-requests", type=int, default=d.warmup_requests,
                   help="requests sent (and not measured) before the benchmark")
    p.add_argument("--timeout-s", type=float, default=d.timeout_s, help="per request")
    p.add_argument("--slo-ttft-ms", type=float, default=d.slo_ttft_ms,
                   help="goodput: a good request's TTFT is at most this")
    p.add_argument("--slo-itl-ms", type=float, default=d.slo_itl_ms,
                   help="goodput: a good request's TPOT (mean inter-token latency) is at most "
                        "this")
    p.add_argument("--disable-tqdm", action="store_true")
    p.add_argument("--output-json", default=d.output_json, metavar="PATH",
                   help="write the config, machine, summary and per-request records here")
    p.add_argument("--api-key", default=None,
                   help=f"Bearer token (default: ${' or $'.join(API_KEY_ENVS)})")
    return p


def _base_url(a: argparse.Namespace) -> str:
    if a.base_url is not None and (a.host is not None or a.port is not None):
        raise ValueError("give --base-url or --host/--port, not both")
    if a.base_url is None:
        host = a.host or "127.0.0.1"
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{a.port or 8000}"
    url = a.base_url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"--base-url {a.base_url!r} must start with http:// or https://")
    return url.removesuffix("/v1")


def _check(a: argparse.Namespace) -> None:
    for flag, value in (("--num-prompts", a.num_prompts), ("--random-input-len",
                        a.random_input_len), ("--random-output-len", a.random_output_len)):
        if value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    if not 0.0 <= a.random_range_ratio <= 1.0:
        raise ValueError(f"--random-range-ratio must be in [0, 1], got {a.random_range_ratio}")
    if a.sharegpt_output_len is not None and a.sharegpt_output_len < 1:
        raise ValueError(f"--sharegpt-output-len must be at least 1, got {a.sharegpt_output_len}")
    if a.dataset_name == "sharegpt" and not a.dataset_path:
        raise ValueError("--dataset-name sharegpt needs --dataset-path")
    if not a.request_rate > 0:
        raise ValueError(f"--request-rate must be positive (or inf), got {a.request_rate}")
    if a.max_concurrency is not None and a.max_concurrency < 1:
        raise ValueError(f"--max-concurrency must be at least 1, got {a.max_concurrency}")
    if not a.temperature >= 0:
        raise ValueError(f"--temperature must be at least 0, got {a.temperature}")
    if a.warmup_requests < 0:
        raise ValueError(f"--warmup-requests must be at least 0, got {a.warmup_requests}")
    if not 0 < a.timeout_s < math.inf:
        raise ValueError(f"--timeout-s must be positive and finite, got {a.timeout_s}")
    for flag, value in (("--slo-ttft-ms", a.slo_ttft_ms), ("--slo-itl-ms", a.slo_itl_ms)):
        if value is not None and not value > 0:
            raise ValueError(f"{flag} must be positive, got {value}")


def parse_args(argv: list[str]) -> BenchConfig:
    try:
        a = build_parser().parse_args(argv)
    except _ArgumentError as e:
        raise ValueError(str(e)) from None
    _check(a)
    values = {f.name: getattr(a, f.name) for f in fields(BenchConfig) if hasattr(a, f.name)}
    values["base_url"] = _base_url(a)
    if a.ignore_eos is None:
        values["ignore_eos"] = a.dataset_name == "random"
    if a.api_key is None:
        values["api_key"] = next((os.environ[k] for k in API_KEY_ENVS if os.environ.get(k)), None)
    return BenchConfig(**values)
