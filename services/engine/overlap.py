"""Overlapped decoding: the host prepares and processes one decode step while the GPU runs the
next.

Without overlap a decode step is host work (schedule, fill the graph's inputs), GPU work (the
replay) and host work again (wait for the tokens, detokenize, stop checks), one after the other;
at small batches the host parts are 10-20% of the step. Here, step k launches its replay
before the host learns step k-1's tokens: the sampled tokens of step k-1 stay on the GPU and feed
step k's inputs there (`DeviceTokens`), and the host processes step k-1's outputs (through a
pinned copy that was queued before step k's replay) while the GPU computes step k.

Contract (used by `LLMEngine`, which owns one `OverlappedDecode` when it has decode graphs):
- `eligible(engine)`: the next step can overlap — every live sequence is decoding (nothing
  waiting, no prefill chunk), they fit the largest graph, and the pool has a free page for each,
  so scheduling cannot preempt a sequence whose newest token only the GPU knows.
- `step(engine)` runs one overlapped step and returns the outputs of the PREVIOUS step (outputs
  lag one step). Each sequence of the step carries a placeholder token (-1) until its real token
  is known.
- `drain(engine)` waits for the step in flight and returns its outputs; afterwards every
  sequence holds real tokens and nothing runs on the GPU for this engine. The engine drains
  before anything that is not an overlapped step (a prefill, an abort, PD hooks).
- A request that finishes while its sequence is already part of the step in flight keeps its
  pages (KV_HELD) until that step is done on the GPU, then they are released: pages never go
  back to the pool (and to kvd, which may fill them from another process) while a kernel may
  still write them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from services.engine.output import RequestOutput
from services.engine.runner import DeviceTokens
from services.engine.sampler import TokenLogprobs
from services.engine.scheduler import ScheduledBatch
from services.engine.sequence import Sequence, SequenceStatus

if TYPE_CHECKING:
    from services.engine.engine import LLMEngine

PLACEHOLDER = -1  # a token sampled on the GPU, not yet copied to the host


@dataclass(slots=True)
class _InFlight:
    seqs: list[Sequence]  # the rows of `tokens`
    tokens: torch.Tensor  # [n] long on the GPU: the token sampled for each row
    host: torch.Tensor  # [n] long, pinned: its copy, valid once `copied` is done
    copied: torch.cuda.Event
    logprobs: list[TokenLogprobs | None]


class OverlappedDecode:
    def __init__(self, max_batch: int, device: torch.device) -> None:
        self.max_batch = max_batch
        self.device = device
        self._in_flight: _InFlight | None = None
        self._release_after_gpu: list[Sequence] = []  # finished during the step in flight

    @property
    def busy(self) -> bool:
        return self._in_flight is not None

    def eligible(self, engine: LLMEngine) -> bool:
        s = engine.scheduler
        running = s.running
        return (not s.waiting and 0 < len(running) <= self.max_batch
                and len(running) <= engine.config.chunked_prefill_size
                and engine.kv.num_free_pages >= len(running)
                and all(seq.num_uncomputed_tokens == 1 for seq in running))

    def step(self, engine: LLMEngine) -> list[RequestOutput]:
        batch = engine.scheduler.schedule()
        assert all(n == 1 for n in batch.num_new_tokens) and len(batch) == len(
            engine.scheduler.running), "an overlapped step must be a full decode batch"
        result = engine.runner.run(batch, self._device_tokens(batch.seqs))
        outputs = self._finish_in_flight(engine, release_now=False)
        live = [i for i, seq in enumerate(batch.seqs) if seq.status is SequenceStatus.RUNNING]
        seqs = [batch.seqs[i] for i in live]
        engine.scheduler.commit(ScheduledBatch(seqs, [1] * len(seqs)))
        if not seqs:  # every request finished: nothing to keep in flight
            torch.cuda.current_stream(self.device).synchronize()
            self._release(engine)
            return outputs
        if len(live) == len(batch):
            logits = result.logits
        else:  # some finished: their rows go (index copied without making the host wait)
            index = torch.tensor(live).pin_memory().to(self.device, non_blocking=True)
            logits = result.logits.index_select(0, index)
        states = [engine._requests[seq.request_id] for seq in seqs]
        tokens, logprobs = engine.sampler.sample_on_device(
            logits, [seq.params for seq in seqs], [st.generator for st in states],
            [seq.prompt_token_ids for seq in seqs], [seq.output_token_ids for seq in seqs])
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        for seq in seqs:
            seq.token_ids.append(PLACEHOLDER)
        self._in_flight = _InFlight(seqs, tokens, host, copied, logprobs)
        return outputs

    def drain(self, engine: LLMEngine) -> list[RequestOutput]:
        if self._in_flight is None:
            return []
        return self._finish_in_flight(engine, release_now=True)

    def _device_tokens(self, seqs: list[Sequence]) -> DeviceTokens | None:
        flight = self._in_flight
        if flight is None:
            return None
        row_of = {id(seq): row for row, seq in enumerate(flight.seqs)}
        rows = [i for i, seq in enumerate(seqs) if id(seq) in row_of]
        assert len(rows) == len(flight.seqs), "a sequence in flight left the batch"
        return DeviceTokens(rows, flight.tokens, [row_of[id(seqs[i])] for i in rows])

    def _finish_in_flight(self, engine: LLMEngine, release_now: bool) -> list[RequestOutput]:
        """The previous step's tokens to the host and through output processing. Sequences
        that finish are released now (`release_now`: nothing of theirs is on the GPU) or after
        the step just launched."""
        flight, self._in_flight = self._in_flight, None
        if flight is None:
            return []
        flight.copied.synchronize()  # the GPU is done with that step (and any before)
        self._release(engine)
        outputs = []
        for seq, token, logprobs in zip(flight.seqs, flight.host.tolist(), flight.logprobs,
                                        strict=True):
            state = engine._requests.get(seq.request_id)
            if state is None or seq.status is not SequenceStatus.RUNNING:
                continue  # aborted meanwhile (abort drains first, so this is defensive)
            assert seq.token_ids[-1] == PLACEHOLDER
            seq.token_ids.pop()
            output = state.append_token(token, logprobs)
            if output.finished:
                engine.scheduler.finish(seq, output.finish_reason or "stop", keep_kv=True)
                del engine._requests[seq.request_id]
                if release_now:
                    engine.scheduler.release_held(seq)
                else:
                    self._release_after_gpu.append(seq)
            outputs.append(output)
        return outputs

    def _release(self, engine: LLMEngine) -> None:
        for seq in self._release_after_gpu:
            engine.scheduler.release_held(seq)
        self._release_after_gpu.clear()
