"""Engine construction for a serving worker: device, model, KV pool, engine.

Contract: `resolve_device` turns `--device auto` / `--base-gpu-id` into the device really used
(warning where a flag has no effect here); `build_engine` loads the model and makes its
`LLMEngine`, on a KV pool handed in from outside (kvd's segment in PD modes) or its own.
`build_pd_engine` attaches the worker to its node's kvd: a host shared-memory pool on CPU, a
VRAM pool on the worker's GPU (kvd allocates it; the worker opens its CUDA IPC handle and
closes it on exit, `PDAttachment.close`). No protobuf here: workers convert at their boundary.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from services.common.kvd_client import (
    KvdClient,
    advertised_host,
    ensure_kvd,
    gpu_placement,
    kv_layout,
    map_ready_flags,
)
from services.common.proto.tandem.v1 import kvd_pb2
from services.common.ready_flags import Landing, ReadyFlags
from services.common.serve_config import ServeConfig
from services.common.vram import IpcMapping
from services.engine.engine import LLMEngine
from services.engine.engine_config import DEFAULT_CPU_PAGES, EngineConfig
from services.engine.kv_pool import KVPool, pages_for_memory
from services.engine.loader import LoadedModel, load_model, resolve_dtype
from services.engine.pd_pool import dtype_name, kvd_pool, layout_for, model_fingerprint

logger = logging.getLogger(__name__)


def resolve_device(config: ServeConfig) -> str:
    """`--device auto` and `--base-gpu-id` against the hardware that is really here."""
    has_cuda = torch.cuda.is_available()
    kind = ("cuda" if has_cuda else "cpu") if config.device == "auto" else config.device
    if kind == "cuda":
        if not has_cuda:
            raise ValueError("--device cuda: no CUDA device is available on this machine")
        count = torch.cuda.device_count()
        if config.base_gpu_id >= count:
            raise ValueError(f"--base-gpu-id {config.base_gpu_id}: this machine has {count} "
                             "GPU(s)")
        return f"cuda:{config.base_gpu_id}"
    if config.base_gpu_id != 0:
        logger.warning("--base-gpu-id %d has no effect: running on cpu (%s)", config.base_gpu_id,
                       "no GPU here" if not has_cuda else "--device cpu")
    if config.mem_fraction_static is not None:
        logger.warning("--mem-fraction-static has no effect on cpu; --num-kv-pages sizes the "
                       "KV pool")
    return "cpu"


def engine_config(config: ServeConfig, device: str) -> EngineConfig:
    return EngineConfig(
        page_size=config.page_size, num_pages=config.num_kv_pages,
        mem_fraction_static=config.mem_fraction_static,
        max_running_requests=config.max_running_requests,
        chunked_prefill_size=config.chunked_prefill_size,
        enable_prefix_cache=not config.disable_prefix_cache,
        max_model_len=config.max_model_len, device=device,
        attention_backend=config.attention_backend, disable_cuda_graph=config.disable_cuda_graph,
        cuda_graph_max_bs=config.cuda_graph_max_bs,
        disable_overlap_schedule=config.disable_overlap_schedule)


def build_engine(config: ServeConfig, pool: KVPool | None = None,
                 loaded: LoadedModel | None = None) -> tuple[LoadedModel, LLMEngine]:
    device = resolve_device(config)
    if loaded is None:
        loaded = load_model(config.model_path, device=device,
                            dtype=resolve_dtype(config.dtype, device))
    engine = LLMEngine(loaded.model, loaded.tokenizer, engine_config(config, device), pool=pool)
    logger.info("model %s on %s: %d KV pages of %d tokens, context %d", loaded.name, device,
                engine.kv.num_pages, engine.kv.page_size, engine.max_model_len)
    return loaded, engine


@dataclass(slots=True)
class PDAttachment:
    """A PD worker's link to its node's kvd."""

    kvd: KvdClient
    pool_id: str
    peer_address: str  # the kvd's peer service: what the other side of a room dials
    mapping: IpcMapping | None = field(default=None)  # a VRAM pool's CUDA IPC mapping
    ready_flags: ReadyFlags | None = field(default=None)  # the pool's flags (ready_flags.py)
    _ready_events: dict[bytes, Any] = field(default_factory=dict)  # IPC handle -> opened event

    @property
    def accepts_ready_event(self) -> bool:
        """A VRAM pool: kvd may answer ExpectKv with an event to wait on (see kvd.proto)."""
        return self.mapping is not None

    @property
    def accepts_ready_flag(self) -> bool:
        """kvd keeps ready flags for the pool: it may answer ExpectKv early (kvd.proto)."""
        return self.ready_flags is not None

    def landing(self, flag: kvd_pb2.ReadyFlag) -> Landing:
        """What the engine polls for a room kvd answered early (ValueError: a bad flag)."""
        assert self.ready_flags is not None, "ready flags come only where the pool has them"
        return self.ready_flags.landing(flag.index, flag.ticket)

    def ready_event(self, handle: bytes) -> Any:
        """The torch.cuda.Event of kvd's IPC event `handle`, opened once per handle (kvd
        reuses a bounded set of events)."""
        event = self._ready_events.get(handle)
        if event is None:
            assert self.mapping is not None, "ready events come only with a VRAM pool"
            event = torch.cuda.Event.from_ipc_handle(self.mapping.device, handle)
            self._ready_events[handle] = event
        return event

    def close(self) -> None:
        """Unmap a VRAM pool (kvd keeps it for a re-attach); the engine must be stopped.
        Idempotent; also run at interpreter exit."""
        if self.mapping is not None:
            self.mapping.close()


async def build_pd_engine(config: ServeConfig, loaded: LoadedModel,
                          device: str) -> tuple[LLMEngine, PDAttachment]:
    """The engine of a prefill/decode worker, computing in the pool its node's kvd owns (VRAM
    of this worker's GPU on CUDA, else host shared memory). Starts the kvd when none runs
    (`ensure_kvd`, blocking: call before serving). Call after loading the weights: a GPU pool
    is sized from what they left (`--mem-fraction-static`), unless `--num-kv-pages` is given or
    the pool exists already (a restarted worker re-attaches with its pool's size)."""
    stats = await asyncio.to_thread(
        ensure_kvd, config.kvd_socket, advertised_host(config.host), config.kvd_port,
        config.disaggregation_transfer_backend, config.disaggregation_ib_device)
    cfg = engine_config(config, device)
    worker_id = f"{config.disaggregation_mode}-{config.port}"
    placement = None
    num_pages = cfg.num_pages
    if device != "cpu":
        placement = gpu_placement(torch.device(device).index or 0)
        if num_pages is None:
            num_pages = _existing_pages(stats, worker_id) or pages_for_memory(
                layout_for(loaded, cfg.page_size, 1).page_bytes, device,
                cfg.mem_fraction_static)
    layout = layout_for(loaded, cfg.page_size, num_pages or DEFAULT_CPU_PAGES)
    kvd = KvdClient(config.kvd_socket)
    reply, memory = await kvd.attach(
        worker_id,
        kv_layout(layout.num_pages, layout.num_layers, layout.page_size, layout.num_kv_heads,
                  layout.head_dim, dtype_name(layout.dtype), model_fingerprint(loaded)),
        placement)
    mapping = memory if isinstance(memory, IpcMapping) else None
    attachment = PDAttachment(kvd, reply.pool_id, stats.peer_address, mapping,
                              map_ready_flags(reply, layout.num_pages))
    if mapping is not None:
        atexit.register(attachment.close)
    if reply.reattached:
        logger.info("re-attached to KV pool %s", reply.pool_id)
    try:
        engine = LLMEngine(loaded.model, loaded.tokenizer, cfg, pool=kvd_pool(memory, layout))
    except BaseException:
        attachment.close()
        raise
    return engine, attachment


def _existing_pages(stats: kvd_pb2.StatsResponse, worker_id: str) -> int | None:
    """Pages of the pool kvd already holds for this worker (a restart), else None."""
    return next((p.num_pages for p in stats.pools if p.worker_id == worker_id), None)
