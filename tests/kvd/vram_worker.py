"""A worker-like process for the VRAM pool tests: attaches to a kvd's GPU pool through the real
client path (KvdClient.attach with a GPU placement -> CUDA IPC -> the engine's KVPool view),
writes a seeded pattern over the whole pool, then exits (closing its mapping) or waits to be
killed.

    python -m tests.kvd.vram_worker SOCKET WORKER_ID GPU NUM_PAGES SEED READY_FILE exit|wait
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
    ready.write_text(f"{reply.pool_id} {reply.cuda_ipc_handle.hex()}\n")
    if then == "wait":
        time.sleep(3600)  # the test kills this process
    del pool, raw
    memory.close()
    await kvd.close()


if __name__ == "__main__":
    sock, worker, gpu, pages, seed, ready, then = sys.argv[1:8]
    asyncio.run(_main(sock, worker, int(gpu), int(pages), int(seed), Path(ready), then))
