"""Continuous batching with chunked prefill and preemption by recompute.

Contract: the engine calls `schedule()` once per step and gets a `ScheduledBatch`: for each
chosen sequence, how many of its not-yet-computed tokens to run now (a decode is 1, a prefill
chunk is up to the remaining token budget). Before returning, `schedule` has made sure every
chosen sequence holds pages for its chunk. After the forward pass the engine calls
`commit(batch)` to advance progress, then `finish(seq)` for sequences that are done.

Policy, per step, with a budget of `chunked_prefill_size` tokens:
1. running sequences, oldest first, each gets min(uncomputed, budget) tokens; when pages run
   out the most recently admitted running sequence is preempted (pages released, progress
   reset, put back at the head of the queue to be recomputed);
2. waiting sequences are admitted in arrival order while the budget, `max_running_requests`
   and the pool allow; their longest cached prefix is reused.

No torch, no grpc.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from services.engine.kv_cache_manager import KVCacheManager
from services.engine.sequence import Sequence, SequenceStatus


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_running_requests: int = 64
    chunked_prefill_size: int = 512  # tokens per step, prefill chunks and decodes together

    def __post_init__(self) -> None:
        if self.max_running_requests < 1:
            raise ValueError(
                f"--max-running-requests must be >= 1, got {self.max_running_requests}"
            )
        if self.chunked_prefill_size < 1:
            raise ValueError(
                f"--chunked-prefill-size must be >= 1, got {self.chunked_prefill_size}"
            )


@dataclass(slots=True)
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)  # chunk length, per sequence

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order
        self.num_preemptions = 0
        self.scheduled_tokens = 0  # tokens of every batch scheduled (computed, not cached)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.config.chunked_prefill_size
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num = min(seq.num_uncomputed_tokens, budget)
            if self._reserve_or_preempt(seq, num):
                batch.seqs.append(seq)
                batch.num_new_tokens.append(num)
                budget -= num
                i += 1
        while self.waiting and budget > 0 and len(self.running) < self.config.max_running_requests:
            seq = self.waiting[0]
            if not seq.page_ids:
                self.kv.match_prefix(seq)
                if seq.num_preemptions == 0:
                    seq.num_cached_tokens = seq.num_computed_tokens
            num = min(seq.num_uncomputed_tokens, budget)
            if not self.kv.ensure_pages(seq, seq.num_computed_tokens + num):
                self.kv.release(seq)
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(num)
            budget -= num
        self.scheduled_tokens += batch.num_tokens
        return batch

    def commit(self, batch: ScheduledBatch) -> None:
        """The forward pass computed each chunk: advance progress, index full pages."""
        for seq, num in zip(batch.seqs, batch.num_new_tokens, strict=True):
            seq.num_computed_tokens += num
            self.kv.register_full_pages(seq)

    def finish(self, seq: Sequence, reason: str, keep_kv: bool = False) -> None:
        """End a sequence (stop, length or abort) wherever it is; frees its pages, unless
        `keep_kv`: then it leaves the queues in state KV_HELD, pages still held, until
        `release_held`."""
        self._dequeue(seq)
        seq.finish_reason = reason
        if keep_kv:
            seq.status = SequenceStatus.KV_HELD
            return
        self.kv.release(seq)
        seq.status = SequenceStatus.FINISHED

    def release_held(self, seq: Sequence) -> None:
        """Free the pages of a KV_HELD or AWAITING_KV sequence that is not coming back."""
        assert seq.status in (SequenceStatus.KV_HELD, SequenceStatus.AWAITING_KV)
        self.kv.release(seq)
        seq.status = SequenceStatus.FINISHED

    def reserve_for_remote_kv(self, seq: Sequence) -> bool:
        """Decode side of PD: pages for the whole prompt, whose KV another node computes.
        False (nothing held) if the pool cannot supply them now."""
        assert not seq.page_ids
        if not self.kv.ensure_pages(seq, seq.num_tokens):
            return False
        seq.status = SequenceStatus.AWAITING_KV
        return True

    def kv_landed(self, seq: Sequence) -> None:
        """The prompt's KV is in the pages: queue the sequence to decode (it is admitted like
        any waiting sequence, with nothing left to compute but its newest token)."""
        assert seq.status is SequenceStatus.AWAITING_KV
        seq.num_computed_tokens = seq.num_prompt_tokens
        self.kv.register_full_pages(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def _dequeue(self, seq: Sequence) -> None:
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)

    def _reserve_or_preempt(self, seq: Sequence, num: int) -> bool:
        """Pages for `seq`'s next `num` tokens, preempting the newest running sequences until
        they fit. False if `seq` itself had to be preempted."""
        while not self.kv.ensure_pages(seq, seq.num_computed_tokens + num):
            victim = self.running.pop()
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.kv.release(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
