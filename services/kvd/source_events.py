"""The CUDA IPC events prefill workers send with their KV (`SendKvRequest.source_ready_event`).

A prefill worker may send a room before its GPU has finished computing the KV: it records an
interprocess event on its stream after the forward pass and names it in the request. kvd opens
the event once per handle (a worker reuses a handful) and orders its reads of the source pages
after the event's latest record: the same-node copy makes its stream wait on it, a network
write waits for it on the transfer thread first.

Contract (`open` on kvd's event loop; the events it returns are used on any thread):
`open(handle, device)` returns the event opened in this process on `device` (kvd's index of the
source pool's GPU), or raises `ValueError` for a handle that is not one (wrong size, or CUDA
refuses it). At most `capacity` events stay open: the least recently used is destroyed first
(CUDA defers that until work already waiting on it is done). `close()` destroys them all.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from services.common import cudart


class SourceEvents:
    def __init__(self, capacity: int = 256) -> None:
        self.capacity = capacity
        self._open: OrderedDict[tuple[int, bytes], Any] = OrderedDict()

    def open(self, handle: bytes, device: int) -> Any:
        key = (device, handle)
        event = self._open.get(key)
        if event is not None:
            self._open.move_to_end(key)
            return event
        try:
            event = cudart.ipc_event_open(device, handle)
        except cudart.CudaError as e:
            raise ValueError(f"source_ready_event is not an event kvd can open on its GPU "
                             f"{device}: {e}") from None
        self._open[key] = event
        while len(self._open) > self.capacity:
            _, oldest = self._open.popitem(last=False)
            cudart.event_destroy(oldest)
        return event

    def __len__(self) -> int:
        return len(self._open)

    def close(self) -> None:
        events, self._open = list(self._open.values()), OrderedDict()
        for event in events:
            cudart.event_destroy(event)
