"""A PD worker's KV pool, in the memory its node's kvd owns.

Contract: `kvd_pool(memory, layout)` views kvd's pool as the engine's `KVPool` without copying:
a mapped shared-memory segment (CPU), or kvd's VRAM opened through CUDA IPC (an `IpcMapping`,
which must outlive the pool: the worker closes it only on exit); `layout_for(loaded, page_size,
num_pages)` gives the numbers a worker sends kvd (the worker converts them to protobuf). The
model fingerprint names the model and every shape that must agree between a prefill and a
decode worker.
"""

from __future__ import annotations

import hashlib
import mmap

import torch

from services.common.vram import IpcMapping
from services.engine.kv_pool import KVLayout, KVPool
from services.engine.loader import LoadedModel


def model_fingerprint(loaded: LoadedModel) -> str:
    c = loaded.config
    shape = (f"{c.family}/{c.num_layers}x{c.hidden_size}/{c.num_heads}h{c.num_kv_heads}kv"
             f"{c.head_dim}d/v{c.vocab_size}")
    digest = hashlib.sha256(repr(c).encode()).hexdigest()[:12]
    return f"{loaded.name}/{shape}/{digest}"


def layout_for(loaded: LoadedModel, page_size: int, num_pages: int) -> KVLayout:
    c = loaded.config
    return KVLayout(num_pages, c.num_layers, page_size, c.num_kv_heads, c.head_dim,
                    loaded.model.dtype)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def kvd_pool(memory: mmap.mmap | IpcMapping, layout: KVLayout) -> KVPool:
    if isinstance(memory, IpcMapping):
        # [total_bytes] uint8 on the worker's GPU, viewing kvd's allocation
        raw = torch.as_tensor(memory, device=torch.device("cuda", memory.device))
        assert raw.data_ptr() == memory.ptr, "torch copied the IPC mapping"
        return KVPool.on_buffer(layout, raw)
    return KVPool.on_buffer(layout, torch.frombuffer(memory, dtype=torch.uint8))
