"""Report arithmetic against hand-computed values: percentiles, throughput, TPOT, goodput."""

from __future__ import annotations

import json

import pytest

from services.bench.client import RequestRecord
from services.bench.report import (
    format_table,
    latency_stats,
    percentile,
    summarize,
    tpot_s,
    write_json,
)

DURATION_S = 2.0


def _make_record(index: int, ttft: float | None, e2e: float, itl: list[float], out: int,
                 prompt_tokens: int | None, error: str | None = None) -> RequestRecord:
    return RequestRecord(index=index, prompt_len=7, output_len=out, send_s=0.1 * index,
                         ttft_s=ttft, itl_s=itl, e2e_s=e2e, prompt_tokens=prompt_tokens,
                         output_tokens=out, num_chunks=len(itl) + 1,
                         is_usage_reported=prompt_tokens is not None, error=error)


def _make_records() -> list[RequestRecord]:
    return [
        _make_record(0, 0.100, 0.150, [0.020, 0.030], 3, 10),    # TPOT 25 ms
        _make_record(1, 0.300, 0.500, [0.050] * 4, 5, 20),       # TPOT 50 ms
        _make_record(2, 0.050, 0.050, [], 1, None),              # no TPOT; usage missing
        _make_record(3, None, 0.010, [], 0, None, error="HTTP 500: boom"),
    ]


def test_percentile_interpolates_between_ranks():
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == pytest.approx(2.5)
    assert percentile([1.0, 2.0, 3.0, 4.0], 90) == pytest.approx(3.7)
    assert percentile([1.0, 2.0, 3.0, 4.0], 99) == pytest.approx(3.97)
    assert percentile([1.0, 2.0, 3.0, 4.0], 0) == 1.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 100) == 4.0
    assert percentile([5.0], 99) == 5.0


def test_latency_stats_converts_to_ms_and_handles_empty():
    stats = latency_stats([0.001, 0.002, 0.003, 0.010])
    assert stats.count == 4
    assert stats.mean == pytest.approx(4.0)
    assert stats.p50 == pytest.approx(2.5)
    assert stats.p99 == pytest.approx(3 + 0.97 * 7)
    empty = latency_stats([])
    assert empty.count == 0 and empty.mean is None and empty.p99 is None


def test_tpot_excludes_the_first_token():
    records = _make_records()
    assert tpot_s(records[0]) == pytest.approx(0.025)
    assert tpot_s(records[1]) == pytest.approx(0.05)
    assert tpot_s(records[2]) is None


def test_summary_counts_throughputs_and_latencies():
    s = summarize(_make_records(), DURATION_S, peak_concurrency=3)
    assert (s.num_requests, s.completed, s.failed) == (4, 3, 1)
    assert s.request_throughput == pytest.approx(1.5)
    assert s.total_input_tokens == 10 + 20 + 7          # the estimate where usage is missing
    assert s.num_usage_missing == 1
    assert s.total_output_tokens == 9
    assert s.input_throughput == pytest.approx(37 / 2)
    assert s.output_throughput == pytest.approx(4.5)
    assert s.total_token_throughput == pytest.approx(46 / 2)
    assert s.mean_concurrency == pytest.approx((0.15 + 0.5 + 0.05) / 2)
    assert s.peak_concurrency == 3
    # TTFT of the successful requests: 100, 300, 50 ms
    assert s.ttft_ms.count == 3
    assert s.ttft_ms.mean == pytest.approx(150)
    assert s.ttft_ms.p50 == pytest.approx(100)
    assert s.ttft_ms.p90 == pytest.approx(260)
    assert s.ttft_ms.p99 == pytest.approx(296)
    # ITL pooled over requests: 20, 30, 50, 50, 50, 50 ms
    assert s.itl_ms.count == 6
    assert s.itl_ms.mean == pytest.approx(250 / 6)
    assert s.itl_ms.p50 == pytest.approx(50)
    assert s.tpot_ms.count == 2 and s.tpot_ms.mean == pytest.approx(37.5)
    assert s.e2e_ms.mean == pytest.approx(700 / 3)
    assert s.goodput is None and s.num_good is None


@pytest.mark.parametrize("slo_ttft, slo_itl, good", [
    (200.0, 30.0, 2),     # r0 meets both; r1 misses TTFT; r2 has no TPOT; r3 failed
    (None, 30.0, 2),      # r1's TPOT 50 ms > 30
    (None, 50.0, 3),      # on the limit counts as met
    (60.0, None, 1),      # only r2's 50 ms TTFT
    (1000.0, 1000.0, 3),  # the failed request never counts
])
def test_goodput_counts_requests_meeting_every_slo(slo_ttft, slo_itl, good):
    s = summarize(_make_records(), DURATION_S, slo_ttft_ms=slo_ttft, slo_itl_ms=slo_itl)
    assert s.num_good == good
    assert s.goodput == pytest.approx(good / DURATION_S)


def test_all_failed_run_has_no_latencies():
    records = [_make_record(0, None, 0.01, [], 0, None, error="HTTP 503: busy")]
    s = summarize(records, 0.5, slo_ttft_ms=100.0)
    assert (s.completed, s.failed, s.num_good, s.goodput) == (0, 1, 0, 0.0)
    assert s.ttft_ms.mean is None
    assert "n/a" in format_table(s, [])


def test_table_shows_the_numbers_and_the_slo(tmp_path):
    s = summarize(_make_records(), DURATION_S, 3, slo_ttft_ms=200.0, slo_itl_ms=30.0)
    table = format_table(s, [("Backend:", "openai-chat")])
    assert "openai-chat" in table
    assert "Goodput (req/s, TTFT<=200ms TPOT<=30ms):" in table
    assert "Good requests:" in table and "2 of 4" in table
    assert "260.00" in table  # TTFT P90
    assert "1.50" in table    # request throughput


def test_json_has_config_machine_summary_and_records(tmp_path):
    records = _make_records()
    s = summarize(records, DURATION_S, 3, slo_ttft_ms=200.0)
    out = tmp_path / "result.json"
    write_json(out, {"request_rate": float("inf"), "num_prompts": 4}, "m", s, records)
    data = json.loads(out.read_text())
    assert data["config"] == {"request_rate": "inf", "num_prompts": 4}
    assert data["machine"]["node"] and "cpu_model" in data["machine"]
    assert data["summary"]["completed"] == 3 and data["summary"]["ttft_ms"]["p50"] == 100
    assert [r["is_success"] for r in data["requests"]] == [True, True, True, False]
    assert data["requests"][3]["error"] == "HTTP 500: boom"
    assert data["requests"][1]["itl_s"] == [0.05] * 4
