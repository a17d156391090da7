"""What each worker did during a benchmark run, from two reads of its /metrics.

`snapshot(urls)` reads every worker's engine counters (steps, wall time in steps, scheduled
tokens) and the sums and counts of its latency histograms, with the time of reading;
`activity(before, after)` turns two snapshots into, per worker:
- `duty`: the share of the elapsed time its engine thread spent in steps (near 1: the engine
  never waited for work; well below 1 under a queue: it was starved), `steps`, `step_ms_mean`,
  `tokens_per_step` (batch fill);
- the means over the run of the worker's own latencies, in ms, where it had any: `ttft_ms_mean`
  (a prefill worker's: from its request to its first token, the bootstrap wait included),
  `prefill_ms_mean` (prefill: from the decode side's bootstrap to the first token) and
  `kv_send_ms_mean` (prefill: from asking kvd to send to the landing). Against the client's
  TTFT they say where a PD request's first token spends its time.
Workers are named by the caller: `{"prefill": "http://127.0.0.1:9100/metrics", ...}`.
"""

from __future__ import annotations

import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

COUNTERS = {"tandem_worker_engine_steps": "steps",
            "tandem_worker_engine_step_seconds": "step_seconds",
            "tandem_worker_scheduled_tokens": "tokens"}
HISTOGRAMS = {"tandem_worker_time_to_first_token_seconds": "ttft",
              "tandem_worker_prefill_seconds": "prefill",
              "tandem_worker_kv_send_seconds": "kv_send"}


def _read(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    values = {"at": time.monotonic()}
    for family in text_string_to_metric_families(text):
        if family.name in COUNTERS:
            values[COUNTERS[family.name]] = sum(s.value for s in family.samples
                                                if s.name.endswith("_total"))
        elif family.name in HISTOGRAMS:
            key = HISTOGRAMS[family.name]
            for sample in family.samples:
                for part in ("sum", "count"):
                    if sample.name.endswith("_" + part):
                        values[f"{key}_{part}"] = values.get(f"{key}_{part}", 0.0) + sample.value
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
        worker = {"duty": round(busy / elapsed, 4) if elapsed > 0 else 0.0,
                  "steps": int(steps), "elapsed_s": round(elapsed, 3),
                  "step_ms_mean": round(busy / steps * 1e3, 3) if steps else 0.0,
                  "tokens_per_step": round(tokens / steps, 1) if steps else 0.0}
        for key in HISTOGRAMS.values():
            count = end.get(f"{key}_count", 0.0) - start.get(f"{key}_count", 0.0)
            if count > 0:
                total = end[f"{key}_sum"] - start.get(f"{key}_sum", 0.0)
                worker[f"{key}_ms_mean"] = round(total / count * 1e3, 3)
        out[name] = worker
    return out
