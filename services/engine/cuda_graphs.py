"""CUDA graphs for decode steps: one captured forward pass per padded batch size.

A decode step of a large model is hundreds of small kernel launches; launched one by one from
Python they cost more than the GPU work at small batches. `DecodeGraphs` captures, for each
batch size in `capture_sizes(max_batch)`, the model's forward pass and the logits of a batch
of that many one-token sequences, on fixed input and metadata tensors (`DecodeBuffers`). A step
of `b` decoding sequences fills the buffers (padding up to the next captured size) and replays.

Contract: `DecodeGraphs.run` takes only batches where every sequence computes exactly one new
token and `len(chunks) <= max_batch` (`fits` says so); it returns float32 logits of every row of
the batch, in batch order, without waiting for the GPU. Input tokens not yet known on the host
(overlapped decoding) come from a device tensor (`DeviceTokens`), copied on the GPU before the
replay. The returned tensor is overwritten by the next replay. The graphs read the KV pool in
place: the pool tensor must not be reallocated while they exist.
"""

from __future__ import annotations

import logging
import time

import torch

from services.engine.attention import SequenceChunk
from services.engine.kv_pool import KVPool
from services.engine.model import LlamaModel
from services.engine.runner import DeviceTokens
from services.engine.triton_attention import TritonPagedAttention

logger = logging.getLogger(__name__)


def capture_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to 64, every 16 up to 256, every 32 beyond; max_batch last."""
    sizes = [s for s in (1, 2, 4) if s < max_batch]
    s = 8
    while s < max_batch:
        sizes.append(s)
        s += 8 if s < 64 else 16 if s < 256 else 32
    sizes.append(max_batch)
    return sizes


class DecodeGraphs:
    def __init__(self, model: LlamaModel, pool: KVPool, attention: TritonPagedAttention,
                 max_batch: int, max_pages_per_seq: int) -> None:
        self.model = model
        self.pool = pool
        self.sizes = capture_sizes(max_batch)
        self.max_batch = max_batch
        self.buffers = attention.decode_buffers(max_batch, max_pages_per_seq)
        self._attention = attention
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        started = time.monotonic()
        memory_pool = torch.cuda.graph_pool_handle()
        with torch.inference_mode():
            for size in reversed(self.sizes):  # largest first: smaller ones reuse its memory
                self._graphs[size] = self._capture(size, memory_pool)
        torch.cuda.synchronize(model.device)
        logger.info("captured decode CUDA graphs for batch sizes %s in %.1f s", self.sizes,
                    time.monotonic() - started)

    def _forward(self, size: int) -> torch.Tensor:
        b = self.buffers
        hidden = self.model.forward(b.input_ids[:size], b.positions[:size], self._attention,
                                    self.pool, b.metadata(size))
        return self.model.compute_logits(hidden)

    def _capture(self, size: int, memory_pool: torch.cuda._POOL_HANDLE
                 ) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # Padding rows only: nothing is stored and the kernels compile before capture.
        self.buffers.slot_rows.fill_(-1)
        self.buffers.kv_lens.zero_()
        stream = torch.cuda.Stream(self.model.device)
        stream.wait_stream(torch.cuda.current_stream(self.model.device))
        with torch.cuda.stream(stream):
            self._forward(size)
        torch.cuda.current_stream(self.model.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # our own stream: torch's default capture stream is made once per process, on the GPU
        # that was current then (an engine on another GPU would capture into it and fail)
        with torch.cuda.graph(graph, pool=memory_pool, stream=stream):
            logits = self._forward(size)
        return graph, logits

    def fits(self, chunks: list[SequenceChunk]) -> bool:
        return len(chunks) <= self.max_batch and all(c.num_new == 1 for c in chunks)

    def run(self, input_ids: list[int], chunks: list[SequenceChunk],
            device_tokens: DeviceTokens | None = None) -> torch.Tensor:
        """Logits [len(chunks), vocab] of one decode step (see the module contract)."""
        size = next(s for s in self.sizes if s >= len(chunks))
        layout = self.pool.layout
        feed = None if device_tokens is None else (device_tokens.rows,
                                                   device_tokens.source_rows)
        self.buffers.fill(size, input_ids, chunks, layout.page_size, layout.rows_per_page, feed)
        if device_tokens is not None:
            rows, sources = self.buffers.token_feed_rows(len(device_tokens.rows))
            self.buffers.input_ids.index_copy_(0, rows, device_tokens.tokens.index_select(0,
                                                                                     sources))
        graph, logits = self._graphs[size]
        graph.replay()
        return logits[: len(chunks)]
