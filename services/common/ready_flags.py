"""Ready flags: how a decode worker learns, without an RPC, that KV kvd promised has landed.

Why. A room whose KV comes through NIXL from another kvd is written by the prefill side's
process; the decode kvd learns of the landing from a notification. Answering the worker's
ExpectKv only then, and letting the answer cross gRPC and the worker's event loop, took 0.55-0.9
ms after the bytes were there (2xH100, a 512 MiB room whose copy takes ~1.4 ms). So kvd answers
ExpectKv early instead — as soon as the first token is known and the write is in flight — with a
ready flag, and sets the flag from the thread that reads the landing notification; the worker's
engine reads the flag between steps and decodes the request once it is set.

Layout. kvd creates one flags segment per pool (host shared memory, `flags_bytes(num_pages)`
bytes): one little-endian uint64 per page. A room's flag is the word of its first destination
page (a page belongs to one room at a time). kvd gives each such room a fresh `ticket` in
[1, 2**62), larger than every ticket before it for that pool, and writes:
- `ticket`: the room's KV has landed; read the pages.
- `ticket | FAILED_BIT`: the room ended without its KV, and no write into its pages can land
  any more: the pages may be freed or reused.
Any other value (zero, an older room's ticket) means still pending. kvd writes exactly one of the
two for every room it answered with a flag, unless it dies (its pools die with it).
Aligned 8-byte stores and loads do not tear on the CPUs Tandem runs on (x86-64, aarch64).
"""

from __future__ import annotations

import enum
import mmap

import numpy as np

FAILED_BIT = 1 << 63
MAX_TICKET = 1 << 62


class LandingState(enum.Enum):
    PENDING = "pending"
    LANDED = "landed"
    FAILED = "failed"  # ended without KV; nothing can land any more


def flags_bytes(num_pages: int) -> int:
    return 8 * max(num_pages, 1)


class ReadyFlags:
    """A flags segment's words (either side maps the segment; this view does not own it)."""

    def __init__(self, buf: mmap.mmap | memoryview, num_pages: int) -> None:
        self._words = np.frombuffer(buf, dtype="<u8", count=num_pages)
        self.num_pages = num_pages

    def state(self, index: int, ticket: int) -> LandingState:
        value = int(self._words[index])
        if value == ticket:
            return LandingState.LANDED
        if value == ticket | FAILED_BIT:
            return LandingState.FAILED
        return LandingState.PENDING

    def set_landed(self, index: int, ticket: int) -> None:
        """kvd only."""
        self._words[index] = ticket

    def set_failed(self, index: int, ticket: int) -> None:
        """kvd only, once no write into the room's pages can land any more."""
        self._words[index] = ticket | FAILED_BIT

    def landing(self, index: int, ticket: int) -> Landing:
        if not 0 <= index < self.num_pages:
            raise ValueError(f"ready flag {index} is outside the pool's {self.num_pages} pages")
        if not 0 < ticket < MAX_TICKET:
            raise ValueError(f"ready flag ticket {ticket} is out of range")
        return Landing(self, index, ticket)


class Landing:
    """One room's flag as the worker's engine polls it (`poll()` is a memory read)."""

    __slots__ = ("_flags", "index", "ticket")

    def __init__(self, flags: ReadyFlags, index: int, ticket: int) -> None:
        self._flags = flags
        self.index = index
        self.ticket = ticket

    def poll(self) -> LandingState:
        return self._flags.state(self.index, self.ticket)

    def __repr__(self) -> str:
        return f"Landing(page={self.index}, ticket={self.ticket}, {self.poll().value})"
