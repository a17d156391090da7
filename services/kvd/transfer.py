"""Sharded transfer queues: the threads that call the backend's blocking `write`.

Contract: `submit(shard_key, job)` puts the job on queue `hash(shard_key) % queue_size` (the
key is the destination kvd, so transfers to different decode nodes share the threads and the
bandwidth, and those to one node keep their order) and returns a concurrent future resolving to
the seconds the write took, or raising `TransferError`; `call(shard_key, fn)` runs any
function there (kvd's: a write, then the notification that reports it). With
`SGLANG_DISAGGREGATION_QUEUE_SIZE=1` every job goes through one queue, first come first served.
The threads of `SGLANG_DISAGGREGATION_THREAD_POOL_SIZE` are split evenly across the queues (at
least one each).
`until_done(future)` awaits such a future (or an asyncio one) from the event loop; a
cancellation drops a job not yet started but waits for one already running.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

from services.kvd.backends.base import TransferBackend

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class TransferJob:
    backend: TransferBackend  # the network backend, or the same-node copy
    peer: str  # backend peer handle
    src: list[tuple[int, int]]  # (local address, length) per descriptor
    dst_addrs: list[int]  # peer address per descriptor

    @property
    def num_bytes(self) -> int:
        return sum(length for _, length in self.src)


class TransferQueues:
    def __init__(self, thread_pool_size: int, queue_size: int) -> None:
        threads = max(1, thread_pool_size // queue_size)
        self._shards = [
            ThreadPoolExecutor(max_workers=threads, thread_name_prefix=f"kv-transfer-{i}")
            for i in range(queue_size)
        ]

    def shard_of(self, shard_key: str) -> int:
        return zlib.crc32(shard_key.encode()) % len(self._shards)

    def submit(self, shard_key: str, job: TransferJob) -> tuple[Future[float], int]:
        return self.call(shard_key, partial(timed_write, job))

    def call(self, shard_key: str, fn: Callable[[], T]) -> tuple[Future[T], int]:
        """Run `fn` (a write and what must follow it on the same thread) on the key's queue."""
        shard = self.shard_of(shard_key)
        return self._shards[shard].submit(fn), shard

    def shutdown(self) -> None:
        for shard in self._shards:
            shard.shutdown(wait=False, cancel_futures=True)


def timed_write(job: TransferJob) -> float:
    """The job's blocking write; returns the seconds it took."""
    start = time.perf_counter()
    job.backend.write(job.peer, job.src, job.dst_addrs)
    return time.perf_counter() - start


async def until_done(future: Future[Any] | asyncio.Future[Any]) -> Any:
    """Await work running on a thread. Cancelled meanwhile: work not started is dropped, work
    already running is waited for (a write reads and writes a room's pages, which the caller
    unpins on its way out), then the cancellation goes on."""
    waited = asyncio.wrap_future(future) if isinstance(future, Future) else future
    try:
        return await asyncio.shield(waited)
    except asyncio.CancelledError:
        if not (isinstance(future, Future) and future.cancel()):
            await asyncio.wait({waited})
        raise
