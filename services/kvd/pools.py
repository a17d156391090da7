"""The KV pools kvd owns: one per local worker (host shared memory, or VRAM on the worker's GPU),
and who pins which page.

Contract: `attach(worker_id, layout, placement)` creates the worker's pool memory
(pool_memory.py) and registers it once with every transfer backend, as DRAM or as VRAM of its
GPU (one kvd may hold pools on several GPUs); a second attach with the same worker id, layout
and placement returns the same pool (a restarted worker re-attaches and re-opens the same
memory; open rooms of the pool go on). `close()` releases every pool's memory: call it after
the backends are closed. Workers compute in the pool; kvd only reads it (sending) or lets peers
write it (receiving), and only pages pinned to an open room:

    page of pool p    unpinned: the worker's engine alone uses it
                      pinned for writing by one room: a peer may fill it (receive side)
                      pinned for reading by rooms r1..rn: sent from (prefix-shared pages
                      may be read by several rooms at once)

`pin` checks bounds, duplicates and conflicts before changing anything. No torch here.

Each pool also has its ready flags (`Pool.flags`, services/common/ready_flags.py): a small
shared-memory segment the worker maps, one word per page, in which kvd tells a worker it answered
early that a room's KV landed (or never will). Created and released with the pool.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import mmap
from dataclasses import dataclass, field

from services.common.proto.tandem.v1 import kvd_pb2
from services.common.ready_flags import MAX_TICKET, ReadyFlags, flags_bytes
from services.common.shm import create_segment, unlink_segment
from services.kvd.backends.base import TransferBackend
from services.kvd.pool_memory import GpuPlacement, PoolMemory, gpu_memory, host_memory

logger = logging.getLogger(__name__)

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1}


class PageError(ValueError):
    """Page ids a caller named are out of range, repeated, or pinned by another room."""


@dataclass(frozen=True, slots=True)
class PoolLayout:
    num_pages: int
    num_layers: int
    page_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    model: str

    @classmethod
    def from_proto(cls, m: kvd_pb2.KvLayout) -> PoolLayout:
        layout = cls(m.num_pages, m.num_layers, m.page_size, m.num_kv_heads, m.head_dim,
                     m.dtype, m.model)
        if min(layout.num_pages, layout.num_layers, layout.page_size, layout.num_kv_heads,
               layout.head_dim) < 1:
            raise ValueError(f"every KV layout dimension must be >= 1, got {layout}")
        if layout.dtype not in DTYPE_BYTES:
            raise ValueError(f"unknown KV dtype {layout.dtype!r}; known: {sorted(DTYPE_BYTES)}")
        return layout

    def to_proto(self) -> kvd_pb2.KvLayout:
        return kvd_pb2.KvLayout(num_pages=self.num_pages, num_layers=self.num_layers,
                                page_size=self.page_size, num_kv_heads=self.num_kv_heads,
                                head_dim=self.head_dim, dtype=self.dtype, model=self.model)

    @property
    def page_bytes(self) -> int:
        return (self.num_layers * 2 * self.page_size * self.num_kv_heads * self.head_dim
                * DTYPE_BYTES[self.dtype])

    @property
    def total_bytes(self) -> int:
        return self.num_pages * self.page_bytes

    def mismatch(self, other: PoolLayout) -> str | None:
        """Why KV of a pool with layout `other` cannot go into this one (None: it can).
        Pool sizes may differ; everything that shapes a page must not."""
        for name in ("model", "dtype", "page_size", "num_layers", "num_kv_heads", "head_dim"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                return f"{name} differs: {mine!r} here, {theirs!r} on the peer"
        return None


class PoolFlags:
    """A pool's ready flags segment (`segment_name` in /dev/shm) and its tickets: each room
    answered with a flag gets the next one (the segment starts zeroed, so 1, 2, ...)."""

    def __init__(self, segment_name: str, num_pages: int) -> None:
        self.segment_name = segment_name
        self._buffer: mmap.mmap | None = create_segment(segment_name, flags_bytes(num_pages))
        self.flags = ReadyFlags(self._buffer, num_pages)
        self._tickets = itertools.count(1)

    def next_ticket(self) -> int:
        ticket = next(self._tickets)
        if ticket >= MAX_TICKET:  # 2**62 rooms: not in this universe's lifetime
            raise OverflowError("ready flag tickets exhausted")
        return ticket

    def release(self) -> None:
        """Idempotent: unlink the segment (the worker's mapping stays valid until unmapped)."""
        if self._buffer is not None:
            self._buffer = None
            unlink_segment(self.segment_name)


@dataclass(slots=True, eq=False)
class Pool:
    pool_id: str
    worker_id: str
    layout: PoolLayout
    memory: PoolMemory
    placement: GpuPlacement | None  # None: host shared memory
    flags: PoolFlags
    writer: dict[int, str] = field(default_factory=dict)  # page id -> the room filling it
    readers: dict[int, int] = field(default_factory=dict)  # page id -> rooms sending it
    pins: dict[str, tuple[list[int], bool]] = field(default_factory=dict)  # room -> (pages, write)

    @property
    def num_pinned(self) -> int:
        return len(self.writer.keys() | self.readers.keys())

    @property
    def base_addr(self) -> int:
        return self.memory.base_addr

    def page_addr(self, page_id: int) -> int:
        return self.base_addr + page_id * self.layout.page_bytes


class PoolRegistry:
    def __init__(self, kvd_name: str, backends: list[TransferBackend]) -> None:
        self._kvd_name = kvd_name  # unique per kvd process: prefixes segment names
        self._backends = backends  # each registers every pool once
        self._by_id: dict[str, Pool] = {}
        self._by_worker: dict[str, Pool] = {}
        self._stranded: list[PoolMemory] = []  # registered somewhere, then a register failed
        self._attach_lock = asyncio.Lock()

    async def attach(self, worker_id: str, layout: PoolLayout,
                     placement: GpuPlacement | None = None) -> tuple[Pool, bool]:
        """The worker's pool and whether it already existed. A new pool is created, committed
        and registered on a thread (seconds for GBs): health checks and rooms of other pools
        keep being answered meanwhile. Attaches are serialized."""
        if not worker_id or "/" in worker_id:
            raise ValueError(f"worker_id must be a non-empty name without '/', got {worker_id!r}")
        async with self._attach_lock:
            pool = self._by_worker.get(worker_id)
            if pool is not None:
                if pool.layout != layout:
                    raise ValueError(f"worker {worker_id} re-attached with layout {layout}, "
                                     f"but its pool has {pool.layout}")
                if pool.placement != placement:
                    raise ValueError(f"worker {worker_id} re-attached on {_where(placement)}, "
                                     f"but its pool is on {_where(pool.placement)}")
                return pool, True
            pool = await asyncio.to_thread(self._create, worker_id, layout, placement)
            self._by_id[pool.pool_id] = pool
            self._by_worker[worker_id] = pool
        logger.info("pool %s: %d pages of %d bytes for worker %s in %s", pool.pool_id,
                    layout.num_pages, layout.page_bytes, worker_id, _where(placement))
        return pool, False

    def _create(self, worker_id: str, layout: PoolLayout,
                placement: GpuPlacement | None) -> Pool:
        pool_id = f"{self._kvd_name}-{worker_id}"
        if placement is None:
            memory = host_memory(pool_id, layout.total_bytes)
        else:
            memory = gpu_memory(placement, layout.total_bytes)
        num_registered = 0
        try:
            for backend in self._backends:
                backend.register(memory.base_addr, memory.num_bytes, mem_type=memory.mem_type,
                                 device_id=memory.device or 0)
                num_registered += 1
        except BaseException:
            if num_registered:  # a backend still holds it: release once backends are closed
                self._stranded.append(memory)
            else:
                memory.release()
            raise
        try:
            flags = PoolFlags(f"{pool_id}-flags", layout.num_pages)
        except BaseException:
            self._stranded.append(memory)
            raise
        return Pool(pool_id, worker_id, layout, memory, placement, flags)

    def get(self, pool_id: str) -> Pool:
        try:
            return self._by_id[pool_id]
        except KeyError:
            raise KeyError(f"unknown pool {pool_id!r}") from None

    def pools(self) -> list[Pool]:
        return list(self._by_id.values())

    def pin(self, pool: Pool, room: str, page_ids: list[int], write: bool) -> None:
        """Bind pages to a room: for a peer to fill (`write`) or to be sent from."""
        check_page_ids(page_ids, pool.layout.num_pages)
        if room in pool.pins:
            raise PageError(f"room {room!r} already has pages in pool {pool.pool_id}")
        busy = pool.writer.keys() | (pool.readers.keys() if write else set())
        taken = [p for p in page_ids if p in busy]
        if taken:
            raise PageError(f"pages {taken[:5]} of pool {pool.pool_id} are in use by another "
                            "room")
        for page_id in page_ids:
            if write:
                pool.writer[page_id] = room
            else:
                pool.readers[page_id] = pool.readers.get(page_id, 0) + 1
        pool.pins[room] = (page_ids, write)

    def unpin(self, pool: Pool, room: str) -> None:
        page_ids, write = pool.pins.pop(room, ([], False))
        for page_id in page_ids:
            if write:
                del pool.writer[page_id]
            elif pool.readers[page_id] == 1:
                del pool.readers[page_id]
            else:
                pool.readers[page_id] -= 1

    def close(self) -> None:
        """Release every pool's memory (the backends must be closed already). Idempotent."""
        for memory in [p.memory for p in self._by_id.values()] + self._stranded:
            try:
                memory.release()
            except Exception:  # one failure must not keep the others allocated
                logger.exception("could not release pool memory at %#x", memory.base_addr)
        for pool in self._by_id.values():
            try:
                pool.flags.release()
            except OSError:
                logger.exception("could not remove %s", pool.flags.segment_name)


def _where(placement: GpuPlacement | None) -> str:
    return "host memory" if placement is None else f"GPU {placement.gpu_index}"


def check_page_ids(page_ids: list[int], num_pages: int) -> None:
    if not page_ids:
        raise PageError("no page ids given")
    bad = [p for p in page_ids if not 0 <= p < num_pages]
    if bad:
        raise PageError(f"page ids {bad[:5]} are outside [0, {num_pages})")
    if len(set(page_ids)) != len(page_ids):
        raise PageError("page ids repeat")


def coalesce(src_pages: list[int], dst_pages: list[int]) -> list[tuple[int, int, int]]:
    """[(src_first, dst_first, num_pages)]: runs where both sides are consecutive pages —
    one transfer descriptor each."""
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src_pages, dst_pages, strict=True):
        if runs and runs[-1][0] + runs[-1][2] == s and runs[-1][1] + runs[-1][2] == d:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((s, d, 1))
    return runs
