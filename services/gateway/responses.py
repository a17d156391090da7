"""Worker responses -> OpenAI response bodies and stream chunks.

Contract: `Choice` accumulates one choice's deltas; `usage(choices, n)` counts each prompt once
(choices of one prompt share it) and every generated token; the builders return plain dicts in
the shapes OpenAI documents (`chat.completion`, `chat.completion.chunk`, `text_completion`), with
logprobs as chat's `content` list (token, logprob, bytes, top_logprobs) or completions' parallel
lists. Logprobs below -9999 are reported as -9999, as OpenAI does, so JSON stays finite.
A worker's ABORT ends the choice with an APIError 503.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from services.common.proto.tandem.v1 import worker_pb2
from services.gateway.errors import APIError
from services.gateway.protocol import Job

FLOOR = -9999.0
_FINISH = {worker_pb2.FINISH_REASON_STOP: "stop", worker_pb2.FINISH_REASON_LENGTH: "length"}


@dataclass(slots=True)
class Choice:
    index: int
    text: list[str] = field(default_factory=list)
    logprobs: list[worker_pb2.TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    def add(self, r: worker_pb2.GenerateResponse) -> None:
        self.text.append(r.text)
        self.logprobs.extend(r.logprobs)
        self.prompt_tokens = r.usage.prompt_tokens
        self.completion_tokens = r.usage.completion_tokens
        self.cached_tokens = r.usage.cached_tokens
        if r.finish_reason == worker_pb2.FINISH_REASON_ABORT:
            raise APIError(503, "the worker aborted the request (it is shutting down?)",
                           code="aborted")
        self.finish_reason = _FINISH.get(r.finish_reason)


def usage(choices: list[Choice], n: int) -> dict:
    prompt = sum(c.prompt_tokens for c in choices if c.index % n == 0)
    cached = sum(c.cached_tokens for c in choices if c.index % n == 0)
    completion = sum(c.completion_tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _lp(x: float) -> float:
    return max(float(x), FLOOR)


def chat_logprobs(lps: list[worker_pb2.TokenLogprob]) -> dict:
    return {"content": [
        {"token": lp.token, "logprob": _lp(lp.logprob), "bytes": list(lp.token_bytes),
         "top_logprobs": [{"token": t, "logprob": _lp(v), "bytes": list(b)}
                          for t, v, b in zip(lp.top_tokens, lp.top_logprobs,
                                             lp.top_token_bytes, strict=True)]}
        for lp in lps]}


def completion_logprobs(lps: list[worker_pb2.TokenLogprob], offset: int = 0) -> dict:
    offsets = []
    for lp in lps:
        offsets.append(offset)
        offset += len(lp.token)
    return {"tokens": [lp.token for lp in lps],
            "token_logprobs": [_lp(lp.logprob) for lp in lps],
            "top_logprobs": [{t: _lp(v) for t, v in zip(lp.top_tokens, lp.top_logprobs,
                                                        strict=True)} for lp in lps],
            "text_offset": offsets}


def full_response(job: Job, choices: list[Choice], created: int | None = None) -> dict:
    created = created or int(time.time())
    body = []
    for c in choices:
        text = "".join(c.text)
        if job.kind == "chat":
            body.append({"index": c.index,
                         "message": {"role": "assistant", "content": text},
                         "logprobs": chat_logprobs(c.logprobs) if job.logprobs else None,
                         "finish_reason": c.finish_reason})
        else:
            echo = job.echo_texts[c.index // job.n] if job.echo_texts else ""
            body.append({"index": c.index, "text": echo + text,
                         "logprobs": completion_logprobs(c.logprobs) if job.logprobs else None,
                         "finish_reason": c.finish_reason})
    obj = "chat.completion" if job.kind == "chat" else "text_completion"
    return {"id": job.id, "object": obj, "created": created, "model": job.model,
            "choices": body, "usage": usage(choices, job.n)}


class ChunkWriter:
    """Stream chunks of one job; `created` is fixed for all of them, as OpenAI does."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.created = int(time.time())
        self.obj = "chat.completion.chunk" if job.kind == "chat" else "text_completion"
        self._offsets = [0] * len(job.requests)

    def _chunk(self, choices: list[dict], usage_: dict | None) -> dict:
        chunk = {"id": self.job.id, "object": self.obj, "created": self.created,
                 "model": self.job.model, "choices": choices}
        if self.job.include_usage or self.job.continuous_usage:
            chunk["usage"] = usage_
        return chunk

    def opening(self, index: int) -> dict | None:
        """Chat's first chunk of a choice (its role); completions' echo, if asked."""
        if self.job.kind == "chat":
            return self._chunk([{"index": index, "delta": {"role": "assistant", "content": ""},
                                 "logprobs": None, "finish_reason": None}], None)
        if self.job.echo_texts:
            echo = self.job.echo_texts[index // self.job.n]
            return self._chunk([{"index": index, "text": echo, "logprobs": None,
                                 "finish_reason": None}], None)
        return None

    def delta(self, choice: Choice, r: worker_pb2.GenerateResponse,
              choices: list[Choice]) -> dict:
        lps = list(r.logprobs)
        if self.job.kind == "chat":
            delta = {"content": r.text} if r.text or not choice.finish_reason else {}
            item = {"index": choice.index, "delta": delta,
                    "logprobs": chat_logprobs(lps) if self.job.logprobs else None,
                    "finish_reason": choice.finish_reason}
        else:
            offset = self._offsets[choice.index]
            item = {"index": choice.index, "text": r.text,
                    "logprobs": completion_logprobs(lps, offset) if self.job.logprobs else None,
                    "finish_reason": choice.finish_reason}
            self._offsets[choice.index] = offset + sum(len(lp.token) for lp in lps)
        running = usage(choices, self.job.n) if self.job.continuous_usage else None
        return self._chunk([item], running)

    def final_usage(self, choices: list[Choice]) -> dict:
        return {"id": self.job.id, "object": self.obj, "created": self.created,
                "model": self.job.model, "choices": [], "usage": usage(choices, self.job.n)}
