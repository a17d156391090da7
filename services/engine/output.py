"""Per-request output handling: detokenize, match stops, decide when a request is finished.

Contract: the engine creates one `RequestState` per request at admission and calls
`append_token` for every token sampled for it; the state appends the token to the sequence and
returns the `RequestOutput` delta the caller streams, with `finish_reason` set when the request
must end ("stop": EOS, a stop token id or a stop string; "length": max_tokens or the context
limit). Text never includes a stop string, EOS or a stop token, never ends inside a UTF-8
character, and is held back while it could be the start of a stop string.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from services.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
from services.engine.sampler import TokenLogprobs
from services.engine.sequence import Sequence
from services.engine.tokenizer import Tokenizer


@dataclass(slots=True)
class RequestOutput:
    """What one step produced for one request (a delta; accumulate for the whole answer)."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    new_logprobs: list[TokenLogprobs] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort"; None while running
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    kv_page_ids: list[int] | None = None  # PD prefill (keep_kv): pages holding the prompt's KV


class RequestState:
    def __init__(self, seq: Sequence, tokenizer: Tokenizer | None,
                 eos_token_ids: frozenset[int], max_model_len: int,
                 generator: torch.Generator | None) -> None:
        self.seq = seq
        self.generator = generator
        self._max_model_len = max_model_len
        params = seq.params
        self._stop_ids = frozenset(params.stop_token_ids) | (
            frozenset() if params.ignore_eos else eos_token_ids
        )
        self._detokenizer = (
            IncrementalDetokenizer(tokenizer, seq.prompt_token_ids, params.skip_special_tokens)
            if tokenizer is not None else None
        )
        self._stops = StopStringMatcher(params.stop)

    def append_token(self, token_id: int, logprobs: TokenLogprobs | None) -> RequestOutput:
        seq = self.seq
        seq.token_ids.append(token_id)
        reason = None
        text = ""
        if token_id in self._stop_ids:
            reason = "stop"
        elif self._detokenizer is not None:
            text, matched = self._stops.push(self._detokenizer.add(token_id))
            if matched is not None:
                reason = "stop"
        if reason is None and (
            seq.num_output_tokens >= seq.params.max_tokens or seq.num_tokens >= self._max_model_len
        ):
            reason = "length"
        if reason == "length" or (reason == "stop" and token_id in self._stop_ids):
            text += self._flush()
        return RequestOutput(
            request_id=seq.request_id,
            new_token_ids=[token_id],
            new_text=text,
            new_logprobs=[logprobs] if logprobs is not None else [],
            finished=reason is not None,
            finish_reason=reason,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_output_tokens=seq.num_output_tokens,
            num_cached_tokens=seq.num_cached_tokens,
        )

    def _flush(self) -> str:
        """What the detokenizer and the stop matcher still hold, when generation ends for a
        reason other than a stop string; still cut at a stop string."""
        held = self._detokenizer.flush() if self._detokenizer is not None else ""
        text, _ = self._stops.push(held)
        return text + self._stops.flush()

    def final_output(self, reason: str) -> RequestOutput:
        """The closing delta of a request ended from outside (abort)."""
        seq = self.seq
        return RequestOutput(
            request_id=seq.request_id, new_token_ids=[], new_text="", finished=True,
            finish_reason=reason, num_prompt_tokens=seq.num_prompt_tokens,
            num_output_tokens=seq.num_output_tokens, num_cached_tokens=seq.num_cached_tokens,
        )


@dataclass(slots=True)
class Completion:
    """A whole request's result, accumulated from its `RequestOutput` deltas."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    num_cached_tokens: int = 0

    def add(self, output: RequestOutput) -> None:
        self.token_ids.extend(output.new_token_ids)
        self.text += output.new_text
        self.logprobs.extend(output.new_logprobs)
        self.num_cached_tokens = output.num_cached_tokens
        if output.finished:
            self.finish_reason = output.finish_reason
