"""`PendingLandings`: a PD decode engine's requests and pages that wait on kvd's ready flags.

kvd may answer a room early — first token known, KV still landing — with a `Landing`
(services/common/ready_flags.py): the flag the request waits on. One `LLMEngine` owns one
`PendingLandings` and calls it from its own thread; this module reads flags and tells the
scheduler, it never touches the pages or the GPU.

Contract:
- `decode_when_landed(seq, landing)`: the request's first token is out. Without `landing`, or
  with one that already polls LANDED, the scheduler queues the sequence to decode at once; else
  the request is gated: it stays AWAITING_KV, its pages unread, until its landing polls LANDED.
- `poll()` polls every gated landing: LANDED -> the scheduler queues the sequence to decode;
  FAILED -> its pages are freed and its request id is returned (the engine forgets the request;
  the driver tells its clients, who already have the first token). Then it frees parked pages
  whose landing is final. Each failed id is returned by exactly one `poll()`; ids the engine's
  own `step()` found are handed to `keep_failed()` and returned once by `take_failed()`.
- `release_or_park(seq, landing)`: the request of an AWAITING_KV sequence ended (its first
  output finished, or `abort(request_id)` of a gated request). Its pages are freed now if nothing
  can write them any more (no landing, or a final one); else they are parked: kvd may still write
  them, so they stay held — counted in the pool, no longer a request — until the landing is
  final, and a later `poll()` frees them.
- `is_waiting`: gated requests or parked pages exist; a driver keeps polling while it is true,
  work or not.
Decode pages of a room, by phase:
    reserved .. kv_arrived          kvd writes them; the engine does not touch them
    gated (landing PENDING)         same; the first token is out
    LANDED .. request ends          the engine's, like any request's pages
    parked (ended while PENDING)    kvd may still write them; held until the landing is final
"""

from __future__ import annotations

from services.common.ready_flags import Landing, LandingState
from services.engine.scheduler import Scheduler
from services.engine.sequence import Sequence


class PendingLandings:
    def __init__(self, scheduler: Scheduler) -> None:
        self._scheduler = scheduler
        # first token out, KV not yet landed: request id -> its AWAITING_KV sequence and flag
        self._gated: dict[str, tuple[Sequence, Landing]] = {}
        self._parked: list[tuple[Sequence, Landing]] = []  # ended; pages wait for the landing
        self._failed: list[str] = []  # found by the engine's step(), for take_failed()

    @property
    def is_waiting(self) -> bool:
        """Whether a gated request or parked pages wait for a landing (poll while true)."""
        return bool(self._gated or self._parked)

    def decode_when_landed(self, seq: Sequence, landing: Landing | None) -> None:
        """Queue `seq` to decode now if its KV is there, else gate it until `landing` polls
        LANDED."""
        if landing is None or landing.poll() is LandingState.LANDED:
            self._scheduler.kv_landed(seq)
        else:
            self._gated[seq.request_id] = (seq, landing)

    def poll(self) -> list[str]:
        """Poll the gated landings (LANDED: queued to decode; FAILED: pages freed) and free
        parked pages whose landing is final. Returns the ids of the requests failed by this
        call."""
        failed = []
        for request_id, (seq, landing) in list(self._gated.items()):
            landed = landing.poll()
            if landed is LandingState.PENDING:
                continue
            del self._gated[request_id]
            if landed is LandingState.LANDED:
                self._scheduler.kv_landed(seq)
            else:
                self._scheduler.release_held(seq)
                failed.append(request_id)
        if self._parked:
            parked, self._parked = self._parked, []
            for seq, landing in parked:
                self.release_or_park(seq, landing)
        return failed

    def keep_failed(self, request_ids: list[str]) -> None:
        """Failed ids the engine's `step()` found, to report by the next `take_failed()`."""
        self._failed += request_ids

    def take_failed(self) -> list[str]:
        """The ids given to `keep_failed()` since the last call."""
        failed, self._failed = self._failed, []
        return failed

    def abort(self, request_id: str) -> bool:
        """A gated request ended: its pages are freed or parked (`release_or_park`). False if
        `request_id` is not gated."""
        gated = self._gated.pop(request_id, None)
        if gated is None:
            return False
        self.release_or_park(*gated)
        return True

    def release_or_park(self, seq: Sequence, landing: Landing | None) -> None:
        """Free an ended AWAITING_KV sequence's pages now if nothing can write them any more,
        else park them until `landing` is final."""
        if landing is None or landing.poll() is not LandingState.PENDING:
            self._scheduler.release_held(seq)
        else:
            self._parked.append((seq, landing))
