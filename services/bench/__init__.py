"""`tandem bench`: a serving benchmark client for any OpenAI-compatible server (SGLang
`bench_serving` flags): streamed requests, latency percentiles, throughput and goodput.

Modules: `config` (flags), `workload` (what to send), `client` (one streamed request -> its
timing record), `runner` (arrivals, concurrency cap, warmup), `report` (metrics, table, JSON).
Nothing here imports torch.
"""
