"""kvd's transfer queues and `until_done`, in-process: a cancelled SendKv must not return
while its write still touches the room's pages."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from services.kvd.transfer import TransferJob, TransferQueues, until_done


class _SlowBackend:
    """A backend whose write blocks until released (records when it ended)."""

    name = "slow"

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started = threading.Event()
        self.ended_at: float | None = None

    def write(self, peer: str, src: list[tuple[int, int]], dst_addrs: list[int]) -> None:
        self.started.set()
        self.release.wait(10)
        self.ended_at = time.monotonic()


def _job(backend: _SlowBackend) -> TransferJob:
    return TransferJob(backend, "peer", [(4096, 16)], [8192])  # type: ignore[arg-type]


def test_cancelled_wait_returns_only_after_the_running_write_ended():
    queues = TransferQueues(thread_pool_size=1, queue_size=1)
    backend = _SlowBackend()

    async def run() -> float:
        future, _ = queues.submit("decode-kvd", _job(backend))
        waiter = asyncio.ensure_future(until_done(future))
        await asyncio.to_thread(backend.started.wait, 10)
        waiter.cancel()
        await asyncio.sleep(0.2)
        assert not waiter.done(), "the wait ended while the write was still running"
        backend.release.set()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        return time.monotonic()

    try:
        returned_at = asyncio.run(run())
        assert backend.ended_at is not None and backend.ended_at <= returned_at
    finally:
        backend.release.set()
        queues.shutdown()


def test_cancelled_wait_drops_a_write_not_yet_started():
    queues = TransferQueues(thread_pool_size=1, queue_size=1)
    busy, queued = _SlowBackend(), _SlowBackend()

    async def run() -> None:
        first, _ = queues.submit("decode-kvd", _job(busy))
        second, _ = queues.submit("decode-kvd", _job(queued))  # behind `first` on one thread
        await asyncio.to_thread(busy.started.wait, 10)
        waiter = asyncio.ensure_future(until_done(second))
        await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(waiter, 5)  # no waiting for `busy` to finish
        assert second.cancelled()
        busy.release.set()
        assert await until_done(first) > 0

    try:
        asyncio.run(run())
        assert not queued.started.is_set()
    finally:
        busy.release.set()
        queues.shutdown()


def test_until_done_returns_the_result_and_raises_the_error():
    async def run() -> None:
        loop = asyncio.get_running_loop()
        assert await until_done(loop.run_in_executor(None, lambda: 7)) == 7
        with pytest.raises(ZeroDivisionError):
            await until_done(loop.run_in_executor(None, lambda: 1 / 0))

    asyncio.run(run())
