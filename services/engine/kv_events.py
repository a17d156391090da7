"""Interprocess CUDA events that tell kvd when a prefill's KV is complete on the GPU.

A PD prefill worker sends its KV ahead (kvd.proto, SendKvAhead): as soon as the forward pass
that completes a prompt's KV is queued, before the host waits for its logits. kvd orders its
reads of the pages after the event named here (`source_ready_event`).

Contract (engine thread only): `record(request_id)` records an event after the work queued so
far on the engine's current stream and returns its CUDA IPC handle — b"" on a CPU engine, whose
work is done once queued. The event is the request's until `release(request_id)` (called when
its KV has been sent or given up, so kvd has waited on it), and only then reused: it is never
re-recorded while a reader may still be about to wait on it. At most one event per request in
flight exists; they live as long as the engine.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class KvComputed(NamedTuple):
    """A keep_kv request's prompt KV is queued on the GPU (not necessarily computed yet)."""

    request_id: str
    page_ids: list[int]  # the pages holding it, in token order (the finishing output's too)
    ready_event: bytes  # IPC handle of the event after which they are complete; b"": now


class KvEvents:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._free: list[tuple[torch.cuda.Event, bytes]] = []
        self._held: dict[str, tuple[torch.cuda.Event, bytes]] = {}

    def record(self, request_id: str) -> bytes:
        if self.device.type != "cuda":
            return b""
        held = self._held.pop(request_id, None)
        if held is None:
            held = self._free.pop() if self._free else self._new()
        self._held[request_id] = held
        event, handle = held
        event.record(torch.cuda.current_stream(self.device))
        return handle

    def release(self, request_id: str) -> None:
        held = self._held.pop(request_id, None)
        if held is not None:
            self._free.append(held)

    def _new(self) -> tuple[torch.cuda.Event, bytes]:
        event = torch.cuda.Event(enable_timing=False, blocking=False, interprocess=True)
        event.record(torch.cuda.current_stream(self.device))  # creates it on this device
        return event, bytes(event.ipc_handle())

    @property
    def num_held(self) -> int:
        return len(self._held)
