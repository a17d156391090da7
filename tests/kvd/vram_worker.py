"""A worker-like process for the VRAM pool tests: attaches to a kvd's GPU pool through the real
client path (KvdClient.attach with a GPU placement -> CUDA IPC -> the engine's KVPool view),
writes a seeded pattern over the whole pool, then exits (closing its mapping) or waits to be
killed — with `forward`, after queuing ~60 s of GPU work and an interprocess event behind it
(a forward pass that will not end before the test kills the process; the event's IPC handle
goes into the ready file, third).

    python -m tests.kvd.vram_worker SOCKET WORKER_ID GPU NUM_PAGES SEED READY_FILE exit|wait|forward
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import torch

from services.common.kvd_client import KvdClient, gpu_placement
from services.common.vram import IpcMapping
from services.engine.kv_pool import KVLayout
from services.engine.pd_pool import kvd_pool
from tests.kvd.vram_layout import kv_layout_proto, pattern


async def _main(socket: str, worker_id: str, gpu: int, num_pages: int, seed: int,
                ready: Path, then: str) -> None:
    layout_proto = kv_layout_proto(num_pages)
    kvd = KvdClient(socket)
    reply, memory = await kvd.attach(worker_id, layout_proto, gpu_placement(gpu))
    assert isinstance(memory, IpcMapping)
    layout = KVLayout(num_pages, layout_proto.num_layers, layout_proto.page_size,
                      layout_proto.num_kv_heads, layout_proto.head_dim, torch.bfloat16)
    pool = kvd_pool(memory, layout)
    assert pool.device == torch.device("cuda", gpu)
    raw = pool.data.view(-1).view(torch.uint8)  # [total_bytes]
    raw.copy_(pattern(raw.numel(), seed, pool.device))
    torch.cuda.synchronize(gpu)
    event_hex = ""
    if then == "forward":
        stream, event = torch.cuda.Stream(gpu), torch.cuda.Event(interprocess=True)
        with torch.cuda.stream(stream):
            torch.cuda._sleep(1 << 62)  # far longer than the test lives
        event.record(stream)
        event_hex = bytes(event.ipc_handle()).hex()
    ready.write_text(f"{reply.pool_id} {reply.cuda_ipc_handle.hex()} {event_hex}\n")
    if then in ("wait", "forward"):
        time.sleep(3600)  # the test kills this process
    del pool, raw
    memory.close()
    await kvd.close()


if __name__ == "__main__":
    sock, worker, gpu, pages, seed, ready, then = sys.argv[1:8]
    asyncio.run(_main(sock, worker, int(gpu), int(pages), int(seed), Path(ready), then))
