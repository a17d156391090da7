"""SourceEvents' waiting contract with CUDA stood in for (the GPU behaviour is
tests/kvd/test_vram_pools.py): an event that completes ends the wait and runs `then` there,
exactly once unless the caller abandoned it first; an abandoned send or a passed deadline ends
it without; one thread polls every wait; each handle is opened once; close destroys what was
opened once no wait runs."""

from __future__ import annotations

import threading
import time

import pytest

from services.common import cudart
from services.kvd.source_events import OPENERS, Claim, SourceEvents, SourceNotReady


class FakeCuda:
    def __init__(self, monkeypatch) -> None:
        self.opened: list[bytes] = []
        self.destroyed: list[object] = []
        self.done: set[bytes] = set()
        monkeypatch.setattr(cudart, "ipc_event_open", self.open)
        monkeypatch.setattr(cudart, "event_query", lambda event: event in self.done)
        monkeypatch.setattr(cudart, "event_destroy", self.destroyed.append)

    def open(self, device: int, handle: bytes) -> bytes:
        if handle.startswith(b"bad"):
            raise cudart.CudaError("cudaIpcOpenEventHandle failed: cudaErrorInvalidValue")
        self.opened.append(handle)
        return handle  # the "event" is its handle


H1, H2 = b"1" * 64, b"2" * 64


def test_a_wait_ends_when_the_event_completes_and_opens_each_handle_once(monkeypatch):
    cuda = FakeCuda(monkeypatch)
    events = SourceEvents()
    waiting = events.wait(H1, 0, Claim(), time.monotonic() + 10)
    time.sleep(0.05)
    assert not waiting.done()
    cuda.done.add(H1)
    waiting.result(timeout=5)
    events.wait(H1, 0, Claim(), time.monotonic() + 10).result(timeout=5)
    assert cuda.opened == [H1] and len(events) == 1
    events.close()
    assert cuda.destroyed == [H1]


def test_abandoned_or_late_waits_end_without_the_event(monkeypatch):
    FakeCuda(monkeypatch)
    events = SourceEvents()
    claim, ran = Claim(), []
    waiting = events.wait(H1, 0, claim, time.monotonic() + 60, lambda: ran.append(1))
    time.sleep(0.05)
    start = time.monotonic()
    assert claim.abandon() == (False, None)
    with pytest.raises(SourceNotReady, match="abandoned"):
        waiting.result(timeout=5)
    assert time.monotonic() - start < 1.0 and ran == []
    with pytest.raises(SourceNotReady, match="did not finish"):
        events.wait(H2, 0, Claim(), time.monotonic() + 0.1).result(timeout=5)
    events.close()


def test_then_runs_on_the_waiting_thread_once_the_event_completes(monkeypatch):
    cuda = FakeCuda(monkeypatch)
    events = SourceEvents()
    claim, threads = Claim(), []

    def then() -> str:
        threads.append(threading.current_thread())
        return "queued"

    waiting = events.wait(H1, 0, claim, time.monotonic() + 10, then)
    time.sleep(0.05)
    assert threads == []
    cuda.done.add(H1)
    assert waiting.result(timeout=5) == "queued"
    assert threads[0] is not threading.current_thread()
    assert claim.abandon() == (True, "queued")  # too late: the caller must wait for it
    events.close()


def test_abandoning_while_then_runs_waits_for_it_and_gets_its_result(monkeypatch):
    cuda = FakeCuda(monkeypatch)
    cuda.done.add(H1)
    events = SourceEvents()
    claim, inside, release = Claim(), threading.Event(), threading.Event()

    def then() -> str:
        inside.set()
        release.wait(5)
        return "queued"

    waiting = events.wait(H1, 0, claim, time.monotonic() + 10, then)
    assert inside.wait(5)
    threading.Timer(0.1, release.set).start()
    start = time.monotonic()
    assert claim.abandon() == (True, "queued")
    assert time.monotonic() - start >= 0.05 and waiting.result(timeout=5) == "queued"
    events.close()


def test_one_thread_polls_every_wait_and_runs_every_then(monkeypatch):
    """A batch of rooms announced at once: 32 waits cost no thread each."""
    cuda = FakeCuda(monkeypatch)
    events = SourceEvents()
    before = threading.active_count()
    handles = [bytes([65 + i]) * 64 for i in range(32)]
    ran_on = set()
    waits = [events.wait(h, 0, Claim(), time.monotonic() + 10,
                         lambda: ran_on.add(threading.current_thread())) for h in handles]
    time.sleep(0.1)
    assert not any(w.done() for w in waits)
    assert threading.active_count() <= before + OPENERS + 1  # the openers, one poller
    cuda.done.update(handles[:16])
    for w in waits[:16]:
        w.result(timeout=5)
    assert not any(w.done() for w in waits[16:])
    cuda.done.update(handles[16:])
    for w in waits[16:]:
        w.result(timeout=5)
    assert len(ran_on) == 1
    events.close()


def test_a_handle_cuda_refuses_is_a_value_error(monkeypatch):
    FakeCuda(monkeypatch)
    events = SourceEvents()
    with pytest.raises(ValueError, match="not an event kvd can open"):
        events.wait(b"bad" + b"0" * 61, 0, Claim(), time.monotonic() + 5).result(5)
    events.close()


def test_an_event_being_polled_is_never_evicted(monkeypatch):
    cuda = FakeCuda(monkeypatch)
    events = SourceEvents(capacity=1)
    polled = events.wait(H1, 0, Claim(), time.monotonic() + 10)
    time.sleep(0.05)
    cuda.done.add(H2)
    events.wait(H2, 0, Claim(), time.monotonic() + 5).result(5)
    assert cuda.destroyed == [] and len(events) == 2  # over capacity while H1 is polled
    cuda.done.add(H1)
    polled.result(timeout=5)
    h3 = b"3" * 64
    cuda.done.add(h3)
    events.wait(h3, 0, Claim(), time.monotonic() + 5).result(5)
    assert cuda.destroyed == [H1, H2] and len(events) == 1
    events.close()


def test_close_ends_running_waits_and_least_recently_used_events_go_first(monkeypatch):
    cuda = FakeCuda(monkeypatch)
    events = SourceEvents(capacity=2)
    cuda.done.update({H1, H2})
    for handle in (H1, H2, H1):
        events.wait(handle, 0, Claim(), time.monotonic() + 5).result(5)
    h3 = b"3" * 64
    cuda.done.add(h3)
    events.wait(h3, 0, Claim(), time.monotonic() + 5).result(5)
    assert cuda.destroyed == [H2]  # H1 was used more recently
    pending = events.wait(b"4" * 64, 0, Claim(), time.monotonic() + 60)
    time.sleep(0.05)
    events.close()
    with pytest.raises(SourceNotReady):
        pending.result(timeout=5)
    assert sorted(cuda.destroyed) == sorted([H2, H1, h3, b"4" * 64])
