"""`tandem bench` / `python -m services.bench`: benchmark a running OpenAI-compatible server.

    tandem bench --base-url http://127.0.0.1:8000 --num-prompts 200 --random-input-len 512 \\
        --random-output-len 128 --request-rate 8 --slo-ttft-ms 500 --slo-itl-ms 50 \\
        --output-json results.json

Exit status: 0 when every request succeeded, 1 when any failed (or the server could not be
asked for its model, or warmup failed), 2 for bad flags or a bad dataset file (one line).
"""

from __future__ import annotations

import asyncio
import sys
from collections import Counter
from dataclasses import asdict

from services.bench.client import ModelLookupError, StreamSettings, first_model
from services.bench.config import BACKENDS, BenchConfig, parse_args
from services.bench.report import format_table, summarize, write_json
from services.bench.runner import RunResult, make_client, run_benchmark
from services.bench.workload import BenchRequest, random_requests, sharegpt_requests
from services.common.process import freeze_gc

PROG = "tandem bench"


def load_workload(config: BenchConfig) -> list[BenchRequest]:
    if config.dataset_name == "sharegpt":
        assert config.dataset_path is not None  # parse_args checked
        requests = sharegpt_requests(config.dataset_path, config.num_prompts,
                                     config.sharegpt_output_len, config.seed)
        if len(requests) < config.num_prompts:
            print(f"{PROG}: note: {config.dataset_path} has {len(requests)} usable "
                  f"conversations; sending {len(requests)}, not {config.num_prompts}",
                  file=sys.stderr)
        return requests
    return random_requests(config.num_prompts, config.random_input_len,
                           config.random_output_len, config.random_range_ratio, config.seed)


async def _run(config: BenchConfig, requests: list[BenchRequest]) -> tuple[str, RunResult]:
    async with make_client(config.timeout_s) as client:
        model = config.model or await first_model(client, config.base_url, config.api_key,
                                                  min(config.timeout_s, 30.0))
        settings = StreamSettings(url=config.base_url + BACKENDS[config.backend],
                                  is_chat=config.backend == "openai-chat", model=model,
                                  temperature=config.temperature, ignore_eos=config.ignore_eos,
                                  api_key=config.api_key, timeout_s=config.timeout_s)
        freeze_gc()  # the client's own GC pauses would count as server latency
        result = await run_benchmark(
            client, settings, requests, request_rate=config.request_rate,
            max_concurrency=config.max_concurrency, seed=config.seed,
            warmup_requests=config.warmup_requests, show_progress=not config.disable_tqdm)
        return model, result


def _report(config: BenchConfig, model: str, result: RunResult) -> int:
    summary = summarize(result.records, result.duration_s, result.peak_concurrency,
                        config.slo_ttft_ms, config.slo_itl_ms)
    rate = "inf" if config.request_rate == float("inf") else f"{config.request_rate:g}"
    header = [("Backend:", config.backend), ("Model:", model), ("Dataset:", config.dataset_name),
              ("Request rate (req/s):", rate),
              ("Max concurrency:", str(config.max_concurrency or "none"))]
    print(format_table(summary, header))
    if summary.num_usage_missing:
        print(f"{PROG}: note: {summary.num_usage_missing} responses had no usage; their token "
              "counts are estimates (chunks, prompt words)", file=sys.stderr)
    if config.output_json:
        config_fields = {k: v for k, v in asdict(config).items() if k != "api_key"}
        try:
            write_json(config.output_json, config_fields, model, summary, result.records)
        except OSError as e:
            print(f"{PROG}: error: --output-json {config.output_json}: {e.strerror or e}",
                  file=sys.stderr)
            return 1
    if summary.failed:
        errors = Counter(r.error for r in result.records if r.error is not None)
        common = "; ".join(f"{n}x {e}" for e, n in errors.most_common(3))
        print(f"{PROG}: {summary.failed} of {summary.num_requests} requests failed: {common}",
              file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        config = parse_args(sys.argv[1:] if argv is None else argv)
        requests = load_workload(config)
    except ValueError as e:  # WorkloadError included
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    try:
        model, result = asyncio.run(_run(config, requests))
    except ModelLookupError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    if result.warmup_errors:
        print(f"{PROG}: error: {len(result.warmup_errors)} of {config.warmup_requests} warmup "
              f"requests failed: {result.warmup_errors[0]}", file=sys.stderr)
        return 1
    return _report(config, model, result)


if __name__ == "__main__":
    raise SystemExit(main())
