"""One room's SendKvAhead call (kvd.proto): the prompt's KV is announced to kvd while the
forward pass still runs on the GPU, the first token follows once sampled.

Why: kvd starts the transfer the moment the GPU has finished the KV (it orders its reads after
the engine's CUDA event), instead of after the host has waited for the logits, sampled, and
sent one RPC — a control-plane delay that is a large share of a same-node NVLink transfer.

Contract (all on one event loop):
- `announce(notice)` is the engine's `on_kv_computed` callback: it opens the call and sends the
  request (the notice's pages and event) without waiting. Only the first notice counts.
- `finish(first)` sends the aux data of the finishing output — opening the call first, without
  an event, if nothing was announced (the KV is complete by then) — ends the stream, and
  returns kvd's SendKvResponse once the KV has landed. Any refusal raises `RoomFailed`; pages
  that differ from the announced ones cancel the call and raise RuntimeError (an engine bug).
- `cancel()` ends an unfinished call without aux: kvd fails the room on both sides and frees
  its pins once no copy reads the pages. It does nothing once `finish` has returned or raised.
Tracing: the `kv.transfer` span runs from the call's opening to its end (so it overlaps the
forward pass when sent ahead), a child of the span current at construction; kvd's `kvd.send`
is its child.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from services.common import tracing
from services.common.kvd_client import RoomFailed
from services.common.proto.tandem.v1 import kvd_pb2, kvd_pb2_grpc
from services.engine.kv_events import KvComputed
from services.engine.output import RequestOutput


class AheadSend:
    def __init__(self, stub: kvd_pb2_grpc.KvdServiceStub, pool_id: str, room: str,
                 peer_address: str) -> None:
        self._stub = stub
        self._pool_id = pool_id
        self.room = room
        self._peer_address = peer_address
        self._parent = tracing.current_span()  # the request's span, not the callback's
        self._span: Any = None  # kv.transfer, from `_open`
        self._call: grpc.aio.StreamUnaryCall | None = None
        self._opened: asyncio.Future[None] | None = None  # the request's write
        self._page_ids: list[int] = []
        self._is_over = False

    @property
    def was_announced(self) -> bool:
        return self._call is not None

    def announce(self, notice: KvComputed) -> None:
        if self._call is None and not self._is_over:
            self._open(notice.page_ids, notice.ready_event)

    def _open(self, page_ids: list[int], ready_event: bytes) -> None:
        self._page_ids = list(page_ids)
        self._span = tracing.start_span("kv.transfer", parent=self._parent,
                                        attributes={"tandem.room": self.room,
                                                    "tandem.sent_ahead": bool(ready_event)})
        self._call = self._stub.SendKvAhead(metadata=tracing.metadata_for(self._span))
        request = kvd_pb2.SendKvRequest(pool_id=self._pool_id, room=self.room,
                                        page_ids=self._page_ids, peer_address=self._peer_address,
                                        source_ready_event=ready_event)
        self._opened = asyncio.ensure_future(self._call.write(kvd_pb2.SendKvPart(request=request)))
        self._opened.add_done_callback(lambda f: f.cancelled() or f.exception())  # see finish

    async def finish(self, first: RequestOutput) -> kvd_pb2.SendKvResponse:
        page_ids = first.kv_page_ids or []
        error: BaseException | None = None
        try:
            if self._call is None:
                self._open(page_ids, b"")
            elif page_ids != self._page_ids:
                self.cancel()
                raise RuntimeError(f"room {self.room!r}: the engine announced pages "
                                   f"{self._page_ids[:8]}... but finished with "
                                   f"{page_ids[:8]}...")
            assert self._call is not None and self._opened is not None
            try:
                await self._opened
                await self._call.write(kvd_pb2.SendKvPart(aux=room_aux(first)))
                await self._call.done_writing()
            except (asyncio.InvalidStateError, grpc.aio.AioRpcError):
                pass  # the call has ended: its status below says why
            try:
                sent = await self._call
            except grpc.aio.AioRpcError as e:
                # FAILED_PRECONDITION: the two sides cannot share KV (layouts, page counts),
                # so no retry will help; say so rather than UNAVAILABLE
                raise RoomFailed.from_rpc(self.room, e,
                                          keep=(grpc.StatusCode.FAILED_PRECONDITION,)) from None
            tracing.set_attributes(self._span,
                                   **tracing.kv_transfer_attributes(sent, len(page_ids)))
            return sent
        except BaseException as e:
            error = e
            raise
        finally:
            self._is_over = True
            tracing.end_span(self._span, error)
            self._span = None

    def cancel(self) -> None:
        if self._call is not None and not self._call.done():
            self._call.cancel()
        self._is_over = True
        tracing.end_span(self._span, asyncio.CancelledError("the room's send was cancelled"))
        self._span = None


def room_aux(first: RequestOutput) -> kvd_pb2.RoomAux:
    """The aux data a room carries: the first token, its logprobs, the cached prompt tokens."""
    aux = kvd_pb2.RoomAux(first_token_id=first.new_token_ids[0],
                          cached_tokens=first.num_cached_tokens)
    lp = first.new_logprobs[0] if first.new_logprobs else None
    if lp is not None:
        aux.first_logprob = lp.logprob
        aux.top_token_ids.extend(lp.top_token_ids)
        aux.top_logprobs.extend(lp.top_logprobs)
    return aux
