"""Tandem: LLM serving with prefill and decode disaggregated.

Importing this package (every Tandem process does, before anything loads grpc) sets gRPC's
`GRPC_EXPERIMENTS` unless the operator set it: grpcio's EventEngine client, listener and
callback-completion-queue paths add thread hops to every call, and Tandem's KV path is a chain
of small unary calls (worker -> kvd -> peer kvd -> worker). An aio-to-aio unary call over a
unix socket took 685 us p50 with them and 428 us without on the 2xH100 host (32 cores, Python
3.12, grpcio 1.85.1), 638 and 456 us on a 2-core VM (Python 3.11, grpcio 1.85.3)
(bench/grpc_latency.py, bench/results/grpc_latency-*.json). grpc reads the variable once, when
it is first imported.

It also turns gRPC's fork support off (`GRPC_ENABLE_FORK_SUPPORT=0`, unless set): grpcio's
fork handlers make every fork wait for gRPC's own threads to pause, and Tandem processes fork
while gRPC runs — a worker starting its node's kvd, `tandem stack`, the benchmarks and tests
starting processes. A benchmark hung in `fork()` inside those handlers (bench/serving_gpu in
a CI run on the 2-core VM, grpcio 1.85.3; grpc/grpc#37259 tracks such hangs). Every child
Tandem forks execs at once and uses no gRPC state of its parent, so the handlers buy nothing.
Processes that start others import this package before grpc (tests: conftest.py; bench:
procs.py).
"""

import os

GRPC_EXPERIMENTS = "-event_engine_client,-event_engine_listener,-event_engine_callback_cq"
os.environ.setdefault("GRPC_EXPERIMENTS", GRPC_EXPERIMENTS)
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
