"""Metrics of a finished run, the printed table, and the JSON results file.

Contract: `summarize(records, duration_s, ...)` is pure arithmetic over `RequestRecord`s; latency
statistics cover successful requests only and are in milliseconds.
- Percentiles interpolate linearly between closest ranks (numpy's default).
- TTFT: one value per request. ITL: every inter-chunk gap of every request, pooled (per chunk,
  see client.py). TPOT: per request with more than one output token,
  (e2e - ttft) / (output_tokens - 1). E2E: send -> [DONE].
- Throughputs divide by the run's duration (first arrival -> last completion). Input tokens are
  the server's `usage.prompt_tokens`, falling back to the workload's estimate for requests without
  usage (counted in `num_usage_missing`).
- Concurrency: mean = sum of E2E / duration (time-averaged requests in flight); peak = the most
  in flight at once, from the runner.
- Goodput (vLLM / DistServe convention): successful requests per second that met every SLO given:
  TTFT <= --slo-ttft-ms, and TPOT <= --slo-itl-ms (the mean inter-token latency of the request,
  so one slow gap does not fail it; a request with one output token has no TPOT and meets it).
  None when no SLO is given.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from services.bench.client import RequestRecord


@dataclass(frozen=True, slots=True)
class LatencyStats:
    count: int
    mean: float | None
    p50: float | None
    p90: float | None
    p99: float | None


@dataclass(frozen=True, slots=True)
class Summary:
    num_requests: int
    completed: int
    failed: int
    duration_s: float
    request_throughput: float         # completed requests / s
    input_throughput: float           # tokens / s
    output_throughput: float
    total_token_throughput: float
    total_input_tokens: int
    total_output_tokens: int
    num_usage_missing: int
    mean_concurrency: float
    peak_concurrency: int
    ttft_ms: LatencyStats
    itl_ms: LatencyStats
    tpot_ms: LatencyStats
    e2e_ms: LatencyStats
    slo_ttft_ms: float | None
    slo_itl_ms: float | None
    num_good: int | None
    goodput: float | None             # good requests / s


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) of non-empty `values`, linear between closest ranks."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def latency_stats(values_s: list[float]) -> LatencyStats:
    """Seconds in, milliseconds out."""
    if not values_s:
        return LatencyStats(0, None, None, None, None)
    ms = [v * 1000.0 for v in values_s]
    return LatencyStats(len(ms), sum(ms) / len(ms), percentile(ms, 50), percentile(ms, 90),
                        percentile(ms, 99))


def tpot_s(record: RequestRecord) -> float | None:
    if record.ttft_s is None or record.e2e_s is None or record.output_tokens <= 1:
        return None
    return (record.e2e_s - record.ttft_s) / (record.output_tokens - 1)


def is_good(record: RequestRecord, slo_ttft_ms: float | None, slo_itl_ms: float | None) -> bool:
    if not record.is_success:
        return False
    if slo_ttft_ms is not None and (record.ttft_s is None or record.ttft_s * 1000 > slo_ttft_ms):
        return False
    tpot = tpot_s(record)
    return slo_itl_ms is None or tpot is None or tpot * 1000 <= slo_itl_ms


def summarize(records: list[RequestRecord], duration_s: float, peak_concurrency: int = 0,
              slo_ttft_ms: float | None = None, slo_itl_ms: float | None = None) -> Summary:
    done = [r for r in records if r.is_success]
    per_s = 1.0 / duration_s if duration_s > 0 else 0.0
    input_tokens = sum(r.prompt_tokens if r.prompt_tokens is not None else r.prompt_len
                       for r in done)
    output_tokens = sum(r.output_tokens for r in done)
    tpots = [t for t in map(tpot_s, done) if t is not None]
    has_slo = slo_ttft_ms is not None or slo_itl_ms is not None
    num_good = sum(is_good(r, slo_ttft_ms, slo_itl_ms) for r in done) if has_slo else None
    return Summary(
        num_requests=len(records), completed=len(done), failed=len(records) - len(done),
        duration_s=duration_s, request_throughput=len(done) * per_s,
        input_throughput=input_tokens * per_s, output_throughput=output_tokens * per_s,
        total_token_throughput=(input_tokens + output_tokens) * per_s,
        total_input_tokens=input_tokens, total_output_tokens=output_tokens,
        num_usage_missing=sum(not r.is_usage_reported for r in done),
        mean_concurrency=sum(r.e2e_s or 0.0 for r in done) * per_s,
        peak_concurrency=peak_concurrency,
        ttft_ms=latency_stats([r.ttft_s for r in done if r.ttft_s is not None]),
        itl_ms=latency_stats([gap for r in done for gap in r.itl_s]),
        tpot_ms=latency_stats(tpots),
        e2e_ms=latency_stats([r.e2e_s for r in done if r.e2e_s is not None]),
        slo_ttft_ms=slo_ttft_ms, slo_itl_ms=slo_itl_ms, num_good=num_good,
        goodput=None if num_good is None else num_good * per_s)


def _fmt(value: float | int | None, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    return str(value) if isinstance(value, int) else f"{value:.{digits}f}"


def format_table(summary: Summary, header: list[tuple[str, str]]) -> str:
    """SGLang-style result block; `header` rows (label, value) come first."""
    s = summary
    rows: list[tuple[str, str] | str] = ["Serving Benchmark Result", *header]
    rows += [("Successful requests:", _fmt(s.completed)), ("Failed requests:", _fmt(s.failed)),
             ("Benchmark duration (s):", _fmt(s.duration_s)),
             ("Total input tokens:", _fmt(s.total_input_tokens)),
             ("Total generated tokens:", _fmt(s.total_output_tokens)),
             ("Request throughput (req/s):", _fmt(s.request_throughput)),
             ("Input token throughput (tok/s):", _fmt(s.input_throughput)),
             ("Output token throughput (tok/s):", _fmt(s.output_throughput)),
             ("Total token throughput (tok/s):", _fmt(s.total_token_throughput)),
             ("Concurrency (mean / peak):", f"{s.mean_concurrency:.2f} / {s.peak_concurrency}")]
    if s.goodput is not None:
        slos = [f"TTFT<={s.slo_ttft_ms:g}ms"] if s.slo_ttft_ms is not None else []
        slos += [f"TPOT<={s.slo_itl_ms:g}ms"] if s.slo_itl_ms is not None else []
        rows += [(f"Goodput (req/s, {' '.join(slos)}):", _fmt(s.goodput)),
                 ("Good requests:", f"{s.num_good} of {s.num_requests}")]
    for title, stats in (("Time to First Token", s.ttft_ms), ("Inter-Token Latency", s.itl_ms),
                         ("Time per Output Token (excl. 1st)", s.tpot_ms),
                         ("End-to-End Latency", s.e2e_ms)):
        rows.append(title)
        rows += [(f"{name} (ms):", _fmt(getattr(stats, key))) for name, key in
                 (("Mean", "mean"), ("P50", "p50"), ("P90", "p90"), ("P99", "p99"))]
    lines: list[str] = []
    for row in rows:
        if isinstance(row, str):
            lines.append(f"{' ' + row + ' ':=^60}" if not lines else f"{' ' + row + ' ':-^60}")
        else:
            lines.append(f"{row[0]:<44}{row[1]:>16}")
    lines.append("=" * 60)
    return "\n".join(lines)


def machine_info() -> dict[str, str | int | None]:
    cpu_model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"node": platform.node(), "cpu_model": cpu_model, "num_cpus": os.cpu_count(),
            "platform": platform.platform(), "python": platform.python_version()}


def write_json(path: str | Path, config: dict[str, object], model: str, summary: Summary,
               records: list[RequestRecord]) -> None:
    """Everything: when, where, the config, the summary and every request's record. Infinite
    config values (--request-rate inf) are written as the string "inf"."""
    config = {k: str(v) if isinstance(v, float) and not math.isfinite(v) else v
              for k, v in config.items()}
    result = {"written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine_info(),
              "model": model, "config": config, "summary": asdict(summary),
              "requests": [{**asdict(r), "is_success": r.is_success} for r in records]}
    text = json.dumps(result, indent=2, allow_nan=False, default=str)
    Path(path).write_text(text + "\n", encoding="utf-8")
