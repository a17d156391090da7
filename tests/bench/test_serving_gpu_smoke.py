"""bench/serving_gpu.py end to end on this machine's CPU (`--device cpu --shape tiny`): the GPU
serving benchmark only runs on the lent GPU machine, where a broken script costs device time, so
its whole flow (the model written, warm-up, both deployments, a rate sweep, repeats, the
results file) is
run here with a tiny model, ~25 s a run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = 6


def _run_bench(tmp_path: Path, *flags: str) -> dict:
    out, log = tmp_path / "serving.json", tmp_path / "bench.log"
    cmd = [sys.executable, "-m", "bench.serving_gpu", "--device", "cpu", "--shape", "tiny",
           "--num-prompts", str(PROMPTS), "--warmup-prompts", "2", "--input-len", "48",
           "--output-len", "6", "--slo-ttft-ms", "60000", "--slo-itl-ms", "60000",
           *flags, "--out", str(out)]
    with log.open("w") as sink:  # a file, not a pipe: no child's inherited stdout holds it open
        code = subprocess.run(cmd, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT,
                              timeout=300).returncode
    assert code == 0, log.read_text(errors="replace")[-4000:]
    results = json.loads(out.read_text())
    assert "partial" not in results
    return results


def _check_runs(results: dict, rates: dict[str, float]) -> None:
    assert {key: run["request_rate"] for key, run in results["by_rate"].items()} == rates
    for key, run in results["by_rate"].items():
        for name in ("unified_2x", "pd_1p1d"):
            summary = run[name]["summary"]
            assert (summary["completed"], summary["failed"]) == (PROMPTS, 0), (key, name)
            assert summary["num_good"] == PROMPTS  # SLOs no run on this machine can miss
            assert run[name]["itl_by_position"]["later_gaps_ms"]["p50"] > 0
        for name, names in (("unified_2x", {"unified0", "unified1"}),
                            ("pd_1p1d", {"prefill", "decode"})):
            activity = run[name]["worker_activity"]
            assert set(activity) == names
            for w in activity.values():
                assert 0 <= w["duty"] <= w["duty_to_last_step"] <= 1
                assert w["active_s"] <= w["elapsed_s"]
        pd_workers = run["pd_1p1d"]["worker_activity"]
        for worker in pd_workers.values():
            assert worker["duty"] > 0 and worker["steps"] > 0
        # every prompt token computed on PD's prefill side, decode tokens on its decode side
        assert pd_workers["prefill"]["tokens_per_step"] > 1
        assert 1 <= pd_workers["decode"]["tokens_per_step"] <= PROMPTS
        # PD's prefill worker timed each request's prefill and KV send, the bootstrap wait too
        prefill = pd_workers["prefill"]
        assert prefill["prefill_ms_mean"] > 0 and prefill["kv_send_ms_mean"] > 0
        assert prefill["ttft_ms_mean"] >= prefill["prefill_ms_mean"]
        # unified: the router may send every request to one replica; together they did all
        unified = run["unified_2x"]["worker_activity"].values()
        assert sum(w["steps"] for w in unified) > 0
        assert any(w.get("ttft_ms_mean", 0) > 0 for w in unified)
        assert run["pd_over_unified"]["goodput"] > 0
        assert run["pd_over_unified"]["num_good"] == 1.0  # every request good on both sides
    headline = next(iter(results["by_rate"].values()))  # the first rate is the headline
    assert results["pd_1p1d"]["summary"] == headline["pd_1p1d"]["summary"]
    assert results["config"]["request_rate_used"] == headline["request_rate"]
    assert results["goal"]["met"] == headline["goal_met"]


def test_fixed_rates_with_extra_worker_flags(tmp_path: Path) -> None:
    results = _run_bench(tmp_path, "--request-rate", "50,80",
                         "--worker-flags", "--max-running-requests 8")
    assert results["config"]["worker_flags"] == "--max-running-requests 8"
    assert "capacity" not in results
    _check_runs(results, {"50rps": 50.0, "80rps": 80.0})


def test_auto_rate_a_fraction_of_unified_capacity_repeated(tmp_path: Path) -> None:
    results = _run_bench(tmp_path, "--rate-fractions", "0.5", "--capacity-prompts", "4",
                         "--repeats", "2")
    capacity = results["capacity"]
    assert capacity["num_requests"] == 4 and capacity["completed"] == 4
    rate = round(0.5 * capacity["request_throughput"], 2)
    _check_runs(results, {"0.5": rate, "0.5#2": rate})
    assert results["spread"] == {"0.5": {
        "unified_num_good": [PROMPTS, PROMPTS], "pd_num_good": [PROMPTS, PROMPTS],
        "goodput_ratio": [results["by_rate"][k]["pd_over_unified"]["goodput"]
                          for k in ("0.5", "0.5#2")],
        "itl_p99_ratio": [results["by_rate"][k]["pd_over_unified"]["itl_ms_p99"]
                          for k in ("0.5", "0.5#2")]}}
