"""One room a local decode worker expects (receiving.py's `Receiver` keeps them by name):
its pages, its peer, how the worker wants to be answered, and how its waiter wakes.

Contract (on kvd's asyncio loop): the `Receiver` creates a room in ExpectKv and closes it
(unpinning its pages) when the room ends. Whoever changes `done`, `released` or `in_flight`
calls `wake()`, so that the ExpectKv waiting in `until_changed` looks at the room again on the
loop's next turn. The send side of this kvd (delivery.py, same-node rooms) reads
`accepts_ready_event` / `accepts_ready_flag` and sets `landing` to the queued copy into the
pages: the pages stay pinned until it is done.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from services.common.proto.tandem.v1 import kvd_pb2
from services.kvd.peers import Peer
from services.kvd.pools import Pool


@dataclass(slots=True)
class RecvRoom:
    pool: Pool
    page_ids: list[int]
    peer: Peer
    done: asyncio.Future[tuple[kvd_pb2.RoomAux, int, bytes]]  # TransferDone (aux, bytes,
    # ready event or b""), or the peer's death
    accepts_ready_event: bool = False  # the worker waits on a ready event before reading
    accepts_ready_flag: bool = False  # the worker polls a ready flag before reading
    in_flight: kvd_pb2.TransferDoneRequest | None = None  # aux known, the write not landed yet
    flag: kvd_pb2.ReadyFlag | None = None  # answered early: the flag that tells the worker the end
    landing: asyncio.Future[None] | None = None  # a queued copy into the pages, until done
    released: asyncio.Event = field(default_factory=asyncio.Event)  # the worker gave up
    drained: asyncio.Event = field(default_factory=asyncio.Event)  # no write can land any more
    is_bootstrapped: bool = False  # `peer` took the bootstrap: its heartbeats now count
    listens: bool = False  # counted by the notification listener until it closes
    wakeup: asyncio.Future[None] | None = None  # what the waiting ExpectKv awaits

    def __post_init__(self) -> None:
        self.done.add_done_callback(lambda _: self.wake())  # the safety net of `wake`

    def wake(self) -> None:
        """Let the room's waiter (`until_changed`) look at it again (`done`, `released` or
        `in_flight` changed). Called directly where they change, so that the waiter runs on the
        loop's next turn; a done-callback on `done` is only the safety net."""
        if self.wakeup is not None and not self.wakeup.done():
            self.wakeup.set_result(None)

    async def until_changed(self, timeout: float, early: bool = False) -> None:
        """Until the room is done or released — or, with `early`, has an in-flight report —
        at most `timeout` seconds."""
        try:
            async with asyncio.timeout(timeout):
                while not self.done.done() and not self.released.is_set():
                    if early and self.in_flight is not None:
                        return
                    self.wakeup = asyncio.get_running_loop().create_future()
                    await self.wakeup
        except TimeoutError:
            pass

    @property
    def landed(self) -> bool:
        """The prefill side reported the KV in the pages."""
        return (self.done.done() and not self.done.cancelled()
                and self.done.exception() is None)
