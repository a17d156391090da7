"""Turns a scheduled batch into tensors, runs the model, returns the logits to sample from.

Contract: `ModelRunner.run(batch)` computes, for every sequence of the batch, the KV of its
chunk `token_ids[num_computed_tokens : num_computed_tokens + num_new]` into the sequence's pages,
and returns logits only for the sequences whose chunk reaches their last token (those that
sample a next token now), with their indices in the batch. It does not change the sequences:
progress is the scheduler's to commit. Decode-only batches run through captured CUDA graphs
when the runner has them (`DecodeGraphs.fits`); everything else runs eagerly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch

from services.engine.attention import AttentionBackend, SequenceChunk
from services.engine.kv_pool import KVPool
from services.engine.model import LlamaModel
from services.engine.scheduler import ScheduledBatch

if TYPE_CHECKING:  # Triton is needed only where graphs are captured
    from services.engine.cuda_graphs import DecodeGraphs


class DeviceTokens(NamedTuple):
    """Input tokens still on the GPU: batch row `rows[i]` takes `tokens[source_rows[i]]`."""

    rows: list[int]
    tokens: torch.Tensor  # [m] long, on the GPU (a previous step's sampled tokens)
    source_rows: list[int]


@dataclass(slots=True)
class RunnerOutput:
    logits: torch.Tensor  # [num_sampling, vocab] float32
    sample_indices: list[int]  # batch index of each logits row


class ModelRunner:
    def __init__(self, model: LlamaModel, pool: KVPool, attention: AttentionBackend,
                 graphs: DecodeGraphs | None = None) -> None:
        self.model = model
        self.pool = pool
        self.attention = attention
        self.graphs = graphs

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch,
            device_tokens: DeviceTokens | None = None) -> RunnerOutput:
        """`device_tokens`: input tokens only the GPU knows yet (decode graphs only)."""
        input_ids: list[int] = []
        positions: list[int] = []
        chunks: list[SequenceChunk] = []
        last_rows: list[int] = []
        sample_indices: list[int] = []
        for i, (seq, num) in enumerate(zip(batch.seqs, batch.num_new_tokens, strict=True)):
            start = seq.num_computed_tokens
            end = start + num
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            chunks.append(SequenceChunk(seq.page_ids, start, num))
            if end == seq.num_tokens:
                last_rows.append(len(input_ids) - 1)
                sample_indices.append(i)
        if self.graphs is not None and self.graphs.fits(chunks):
            logits = self.graphs.run(input_ids, chunks, device_tokens)
            if len(sample_indices) < len(chunks):
                logits = logits[torch.tensor(sample_indices, device=logits.device)]
            return RunnerOutput(logits, sample_indices)
        assert device_tokens is None, "device-side input tokens need a decode graph"
        device = self.model.device
        meta = self.attention.prepare(chunks, self.pool)
        hidden = self.model.forward(
            torch.tensor(input_ids, dtype=torch.long).to(device),
            torch.tensor(positions, dtype=torch.long).to(device),
            self.attention, self.pool, meta,
        )
        if not last_rows:
            return RunnerOutput(hidden.new_empty((0, self.model.config.vocab_size)), [])
        rows = torch.tensor(last_rows, dtype=torch.long).to(device)
        return RunnerOutput(self.model.compute_logits(hidden[rows]), sample_indices)
