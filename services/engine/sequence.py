"""One request's state inside the engine: its tokens, its page table and its progress.

Region map of a sequence (P = page size):

    token_ids    [0, num_prompt_tokens)            prompt
                 [num_prompt_tokens, num_tokens)   generated so far
    KV in pages  [0, num_computed_tokens)          valid: attention reads it
                 [num_computed_tokens, num_tokens) not yet computed (the next chunk)
    page_ids     [0, num_hashed_pages)             full pages indexed in the prefix cache
                                                   (shared, immutable)
                 [num_hashed_pages, len(page_ids)) owned by this sequence alone

Page ownership: `page_ids` holds one reference per page, taken by `KVCacheManager` and given
back by it when the sequence finishes, aborts or is preempted. In PD mode two more states hold
pages outside the scheduler's queues: AWAITING_KV (decode: pages granted to a room, the prompt's
KV not yet landed) and KV_HELD (prefill: finished, pages kept while kvd sends them). No torch.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from services.engine.prefix_cache import ROOT_HASH
from services.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued, or preempted and waiting to be recomputed
    RUNNING = "running"  # holds pages; prefilling or decoding
    AWAITING_KV = "awaiting_kv"  # decode side of PD: holds pages the prompt's KV will land in
    KV_HELD = "kv_held"  # prefill side of PD: done, pages kept until the KV has been sent
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Sequence:
    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    arrival_index: int
    status: SequenceStatus = SequenceStatus.WAITING
    page_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at admission
    num_hashed_pages: int = 0
    last_page_hash: int = ROOT_HASH
    num_preemptions: int = 0
    finish_reason: str | None = None  # "stop" | "length" | "abort"

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens
