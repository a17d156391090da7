"""TransferDone as a backend notification (services/kvd/notifications.py), without NIXL: the
message format, the prefill side's `Notice`, the decode side's listener. (Between two real
kvds over NIXL: tests/kvd/test_kvd.py.)"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from services.common.proto.tandem.v1 import kvd_pb2
from services.kvd import notifications
from services.kvd.notifications import Notice, NotificationListener, notifies


class _Backend:
    """Notifications in memory: `notify` records, `notifications` hands out `inbox`."""

    def __init__(self, fail: bool = False) -> None:
        self.sent: list[tuple[str, bytes]] = []
        self.inbox: list[tuple[str, bytes]] = []
        self.polls = 0
        self.fail = fail
        self.lock = threading.Lock()

    def notify(self, peer: str, message: bytes) -> None:
        if self.fail:
            raise RuntimeError("connection dropped")
        self.sent.append((peer, message))

    def notifications(self) -> list[tuple[str, bytes]]:
        with self.lock:
            self.polls += 1
            got, self.inbox = self.inbox, []
        return got


def _done(room: str = "r1", **fields) -> kvd_pb2.TransferDoneRequest:
    return kvd_pb2.TransferDoneRequest(room=room, kvd_id="kvd-a", kv_bytes=4096,
                                       aux=kvd_pb2.RoomAux(first_token_id=7), **fields)


def test_a_transfer_done_round_trips_and_anything_else_is_refused():
    assert notifications.decode(notifications.encode(_done())) == _done()
    with pytest.raises(ValueError, match="by RPC"):
        notifications.encode(_done(error="boom"))
    forged_error = notifications.PREFIX + _done(error="boom").SerializeToString()
    nameless = notifications.PREFIX + kvd_pb2.TransferDoneRequest(kvd_id="a").SerializeToString()
    for message in (b"", b"hello", notifications.PREFIX + b"\xff\xff\xff", forged_error,
                    nameless):
        with pytest.raises(ValueError):
            notifications.decode(message)


def test_notifies_only_backends_with_both_sides():
    assert notifies(_Backend())
    assert not notifies(object())


def test_a_notice_sends_only_once_its_message_is_set_and_reports_a_refusal():
    backend = _Backend()
    notice = Notice(backend, "peer-agent", "r1")
    assert notice.send() is False and backend.sent == []  # aux data not known yet
    notice.posted()
    notice.message = notifications.encode(_done())
    assert notice.send() is True
    assert backend.sent == [("peer-agent", notifications.POSTED + b"r1"),
                            ("peer-agent", notice.message)]
    refused = Notice(_Backend(fail=True), "peer-agent", "r1")
    refused.posted()  # best effort: no error
    refused.message = notice.message
    assert refused.send() is False  # the loop then tells by RPC


def test_the_listener_polls_finely_only_after_a_write_is_posted():
    assert notifications.pause(1e9) == notifications.IDLE_POLL_S  # nothing posted lately
    assert notifications.pause(0.0) == notifications.POLL_S
    assert notifications.pause(0.0014) == notifications.POLL_S  # a GPU write's time
    assert notifications.POLL_S < notifications.pause(0.016) < notifications.IDLE_POLL_S
    assert notifications.pause(0.3) == notifications.IDLE_POLL_S  # a long CPU write: ~1.5%


def test_the_listener_delivers_on_the_loop_and_polls_only_while_rooms_wait():
    backend = _Backend()

    async def run():
        loop_thread = threading.get_ident()
        got: list[tuple[str, bytes, int]] = []
        arrived = asyncio.Event()

        def deliver(sender: str, message: bytes) -> None:
            got.append((sender, message, threading.get_ident()))
            arrived.set()

        listener = NotificationListener(backend, deliver)
        try:
            await asyncio.sleep(0.05)
            assert backend.polls == 0  # no room waits: no thread, no polling
            listener.expect()
            with backend.lock:  # a POSTED only changes the pace: it is not delivered
                backend.inbox += [("agent-a", notifications.POSTED + b"r"), ("agent-a", b"m1")]
            await asyncio.wait_for(arrived.wait(), 2)
            assert got == [("agent-a", b"m1", loop_thread)]
            listener.forget()
            await asyncio.sleep(0.05)  # a poll under way may still finish
            idle = backend.polls
            await asyncio.sleep(0.1)
            assert backend.polls == idle  # nobody waits: it stopped polling
            listener.expect()
            with backend.lock:
                backend.inbox.append(("agent-b", b"m2"))
            arrived.clear()
            await asyncio.wait_for(arrived.wait(), 2)
            assert got[-1][:2] == ("agent-b", b"m2")
        finally:
            listener.close()
        assert not any(t.name == "kvd-notifications" for t in threading.enumerate())

    asyncio.run(run())


def test_the_listener_survives_a_failing_poll():
    class Flaky(_Backend):
        def notifications(self):
            if self.polls == 0:
                self.polls += 1
                raise RuntimeError("transient")
            return super().notifications()

    backend = Flaky()

    async def run():
        got = asyncio.Event()
        listener = NotificationListener(backend, lambda sender, message: got.set())
        try:
            listener.expect()
            with backend.lock:
                backend.inbox.append(("agent-a", b"m"))
            started = time.monotonic()
            await asyncio.wait_for(got.wait(), 2)
            assert time.monotonic() - started < 1
        finally:
            listener.close()

    asyncio.run(run())


def test_rooms_into_gpu_pools_are_polled_finely_others_at_the_idle_pace():
    backend = _Backend()

    async def polls_in(seconds: float) -> int:
        before = backend.polls
        await asyncio.sleep(seconds)
        return backend.polls - before

    async def run():
        listener = NotificationListener(backend, lambda sender, message: None)
        try:
            listener.expect(fine=False)  # a host-memory room: nothing posted yet
            idle = await polls_in(0.2)
            listener.expect(fine=True)  # and a GPU room
            fine = await polls_in(0.2)
            listener.forget(fine=True)
            idle_again = await polls_in(0.2)
        finally:
            listener.close()
        most_idle = 0.2 / notifications.IDLE_POLL_S + 5
        assert idle <= most_idle and idle_again <= most_idle, (idle, idle_again)
        assert fine > 2 * most_idle, fine  # well above the idle pace

    asyncio.run(run())


def _in_flight(done: kvd_pb2.TransferDoneRequest) -> bytes:
    early = kvd_pb2.TransferDoneRequest()
    early.CopyFrom(done)
    early.in_flight = True
    return notifications.encode(early)


def test_the_aux_data_goes_early_once_while_the_write_is_in_flight():
    # known before the post: the post's notification carries it instead of POSTED
    backend = _Backend()
    notice = Notice(backend, "peer", "r1")
    notice.set_aux(_done())
    assert backend.sent == []  # nothing posted yet
    notice.posted()
    assert notice.send() is True
    assert backend.sent == [("peer", _in_flight(_done())), ("peer", notifications.encode(_done()))]
    # known after the post: sent by set_aux, at once
    backend = _Backend()
    notice = Notice(backend, "peer", "r1")
    notice.posted()
    notice.set_aux(_done())
    notice.send()
    assert backend.sent == [("peer", notifications.POSTED + b"r1"), ("peer", _in_flight(_done())),
                            ("peer", notifications.encode(_done()))]
    # known only after the landing: no early message (the loop reports by RPC)
    backend = _Backend()
    notice = Notice(backend, "peer", "r1")
    notice.posted()
    assert notice.send() is False
    notice.set_aux(_done())
    assert backend.sent == [("peer", notifications.POSTED + b"r1")]


def test_a_landing_goes_to_on_landed_on_the_listening_thread_before_the_loop():
    backend = _Backend()

    async def run():
        delivered: list[bytes] = []
        arrived = asyncio.Event()

        def deliver(sender: str, message: bytes) -> None:
            delivered.append(message)
            arrived.set()

        landed: list[tuple[str, str, int, int]] = []  # room, sender, thread, delivered by then
        listener = NotificationListener(backend, deliver, lambda room, sender: landed.append(
            (room, sender, threading.get_ident(), len(delivered))))
        try:
            listener.expect(fine=True)
            with backend.lock:  # in flight: no landing; garbage: neither
                backend.inbox += [("agent-a", _in_flight(_done())), ("agent-x", b"garbage")]
            while len(delivered) < 2:
                arrived.clear()
                await asyncio.wait_for(arrived.wait(), 2)
            assert landed == []
            with backend.lock:
                backend.inbox.append(("agent-a", notifications.encode(_done(room="r2"))))
            while len(delivered) < 3:
                arrived.clear()
                await asyncio.wait_for(arrived.wait(), 2)
            # on the listening thread, before the loop had the message; the loop still gets it
            assert [(r, s, n) for r, s, _, n in landed] == [("r2", "agent-a", 2)]
            assert landed[0][2] != threading.get_ident()
        finally:
            listener.close()

    asyncio.run(run())
