"""bench/serving_gpu.py end to end on this machine's CPU (`--device cpu --shape tiny`): the GPU
serving benchmark only runs on the lent GPU machine, where a broken script costs device time, so
its whole flow (the model written, warm-up, both deployments, a rate sweep, the results file) is
run here with a tiny model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_serving_bench_sweeps_two_rates_on_both_deployments(tmp_path: Path) -> None:
    out = tmp_path / "serving.json"
    cmd = [sys.executable, "-m", "bench.serving_gpu", "--device", "cpu", "--shape", "tiny",
           "--num-prompts", "6", "--warmup-prompts", "2", "--input-len", "48",
           "--output-len", "6", "--request-rate", "50,80", "--slo-ttft-ms", "60000",
           "--slo-itl-ms", "60000", "--worker-flags", "--max-running-requests 8",
           "--out", str(out)]
    log = tmp_path / "bench.log"
    with log.open("w") as sink:  # a file, not a pipe: no child's inherited stdout holds it open
        code = subprocess.run(cmd, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT,
                              timeout=300).returncode
    assert code == 0, log.read_text(errors="replace")[-4000:]

    results = json.loads(out.read_text())
    assert "partial" not in results
    assert results["config"]["worker_flags"] == "--max-running-requests 8"
    assert list(results["by_rate"]) == ["50rps", "80rps"]
    for key, rate in (("50rps", 50.0), ("80rps", 80.0)):
        run = results["by_rate"][key]
        assert run["request_rate"] == rate
        for name in ("unified_2x", "pd_1p1d"):
            summary = run[name]["summary"]
            assert (summary["completed"], summary["failed"]) == (6, 0), (key, name)
            assert summary["num_good"] == 6  # SLOs no run on this machine can miss
            assert run[name]["itl_by_position"]["later_gaps_ms"]["p50"] > 0
        assert run["pd_over_unified"]["goodput"] > 0
    # the first rate is the headline
    assert results["pd_1p1d"]["summary"] == results["by_rate"]["50rps"]["pd_1p1d"]["summary"]
    assert results["config"]["request_rate_used"] == 50.0
    assert results["goal"]["met"] == results["by_rate"]["50rps"]["goal_met"]
