"""What each worker did during a benchmark run, from two reads of its /metrics.

`snapshot(urls)` reads every worker's engine counters (steps, wall time in steps, scheduled
tokens) and the sums and counts of its latency histograms, with the time of reading;
`activity(before, after)` turns two snapshots into, per worker:
- `duty`: the share of the elapsed time its engine thread spent in steps (near 1: the engine
  never waited for work; well below 1 under a queue: it was starved), `steps`, `step_ms_mean`,
  `tokens_per_step` (batch fill);
- `duty_to_last_step`: the same share up to the end of its last step in the run. A run ends
  with a tail where some workers have nothing left (a PD prefill worker once every prompt is
  prefilled, while decoding goes on): at 18 req/s on 2xH100 the prefill worker's `duty` read
  0.61 while it spent 13.0 of the ~14.5 s in which prompts arrived in steps;
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
LAST_STEP_END = "tandem_worker_engine_last_step_end_seconds"  # a gauge: Unix time
HISTOGRAMS = {"tandem_worker_time_to_first_token_seconds": "ttft",
              "tandem_worker_prefill_seconds": "prefill",
              "tandem_worker_kv_send_seconds": "kv_send"}


def _read(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    values = {"at": time.monotonic(), "wall": time.time()}
    for family in text_string_to_metric_families(text):
        if family.name == LAST_STEP_END:
            values["last_step_end"] = max(s.value for s in family.samples)
        elif family.name in COUNTERS:
            values[COUNTERS[family.name]] = sum(s.value for s in family.samples
                                                if s.name.endswith("_total"))
        elif family.name in HISTOGRAMS:
            key = HISTOGRAMS[family.name]
            for sample in family.samples:
                for part in ("sum", "count"):
                    if sample.name.endswith("_" + part):
                        values[f"{key}_{part}"] = values.get(f"{key}_{part}", 0.0) + sample.value
    missing = {*COUNTERS.values(), "last_step_end"} - set(values)
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
        # the bench and the worker share a host (and so a clock) in every bench that calls this;
        # a step in flight at the first read counts whole, hence the cap at 1
        active = min(end["last_step_end"] - start["wall"], elapsed) if steps else 0.0
        worker = {"duty": round(busy / elapsed, 4) if elapsed > 0 else 0.0,
                  "duty_to_last_step": round(min(1.0, busy / active), 4) if active > 0 else 0.0,
                  "steps": int(steps), "elapsed_s": round(elapsed, 3),
                  "active_s": round(max(active, 0.0), 3),
                  "step_ms_mean": round(busy / steps * 1e3, 3) if steps else 0.0,
                  "tokens_per_step": round(tokens / steps, 1) if steps else 0.0}
        for key in HISTOGRAMS.values():
            count = end.get(f"{key}_count", 0.0) - start.get(f"{key}_count", 0.0)
            if count > 0:
                total = end[f"{key}_sum"] - start.get(f"{key}_sum", 0.0)
                worker[f"{key}_ms_mean"] = round(total / count * 1e3, 3)
        out[name] = worker
    return out
