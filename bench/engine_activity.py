"""How busy each worker's engine was during a benchmark run, from its /metrics.

`snapshot(urls)` reads every worker's engine counters (steps, wall time in steps, scheduled
tokens) with the time of reading; `activity(before, after)` turns two snapshots into, per
worker: `duty` (the share of the elapsed time its engine thread spent in steps: near 1 means
the engine never waited for work, well below 1 under a queue means it was starved), steps,
mean step time and scheduled tokens per step (batch fill). Workers are named by the caller:
`{"prefill": "http://127.0.0.1:9100/metrics", ...}`.
"""

from __future__ import annotations

import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

COUNTERS = {"tandem_worker_engine_steps": "steps",
            "tandem_worker_engine_step_seconds": "step_seconds",
            "tandem_worker_scheduled_tokens": "tokens"}


def _read(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    values = {"at": time.monotonic()}
    for family in text_string_to_metric_families(text):
        if family.name in COUNTERS:
            values[COUNTERS[family.name]] = sum(s.value for s in family.samples
                                                if s.name.endswith("_total"))
    missing = set(COUNTERS.values()) - set(values)
    if missing:
        raise RuntimeError(f"{url} has no {sorted(missing)}: not a Tandem worker's /metrics?")
    return values


def snapshot(urls: dict[str, str]) -> dict[str, dict[str, float]]:
    return {name: _read(url) for name, url in urls.items()}


def activity(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]
             ) -> dict[str, dict[str, float]]:
    out = {}
    for name, end in after.items():
        start = before[name]
        elapsed = end["at"] - start["at"]
        steps = end["steps"] - start["steps"]
        busy = end["step_seconds"] - start["step_seconds"]
        tokens = end["tokens"] - start["tokens"]
        out[name] = {"duty": round(busy / elapsed, 4) if elapsed > 0 else 0.0,
                     "steps": int(steps), "elapsed_s": round(elapsed, 3),
                     "step_ms_mean": round(busy / steps * 1e3, 3) if steps else 0.0,
                     "tokens_per_step": round(tokens / steps, 1) if steps else 0.0}
    return out
