"""Tandem: LLM serving with prefill and decode disaggregated.

Importing this package (every Tandem process does, before anything loads grpc) sets gRPC's
`GRPC_EXPERIMENTS` unless the operator set it: grpcio's EventEngine client, listener and
callback-completion-queue paths add thread hops to every call, and Tandem's KV path is a chain
of small unary calls (worker -> kvd -> peer kvd -> worker). An aio-to-aio unary call over a
unix socket took 685 us p50 with them and 428 us without on the 2xH100 host (32 cores, Python
3.12, grpcio 1.85.1), 638 and 456 us on a 2-core VM (Python 3.11, grpcio 1.85.3)
(bench/grpc_latency.py, bench/results/grpc_latency-*.json). grpc reads the variable once, when
it is first imported.
"""

import os

GRPC_EXPERIMENTS = "-event_engine_client,-event_engine_listener,-event_engine_callback_cq"
os.environ.setdefault("GRPC_EXPERIMENTS", GRPC_EXPERIMENTS)
