"""OpenAI request bodies -> worker `GenerateRequest`s.

Contract: `parse_chat(body)` / `parse_completion(body)` validate a decoded JSON body and return a
`Job`: the model name, one `GenerateRequest` per choice (prompt-major: prompt p's choice c is
index p * n + c), the text that routing matches prefixes on, and how to answer. Bad bodies raise
`APIError` 400 naming the parameter. Parameters Tandem does not implement (tools, logit_bias,
response_format json, suffix, best_of > n, echo with logprobs) are refused, never ignored.
Sampling ranges the engine checks (temperature, top_p, ...) are checked again by the worker,
whose INVALID_ARGUMENT also becomes a 400.

Semantics: `max_completion_tokens` wins over `max_tokens`; chat without either generates up to
the context; completions default to 16 tokens, as OpenAI's. With `seed`, choice c samples with
`seed + c` so that `n` choices differ yet repeat. `top_k`, `min_p`, `ignore_eos`,
`repetition_penalty`, `stop_token_ids` and `skip_special_tokens` are accepted as extra fields.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from services.common.proto.tandem.v1 import worker_pb2
from services.gateway.errors import APIError, bad_request

if TYPE_CHECKING:
    from typing_extensions import TypeIs

MAX_N = 128


class _Body(BaseModel):
    """Fields OpenAI defines that Tandem does not read (user, metadata, ...) are ignored."""

    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _Sampling(_Body):
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # extra fields (vLLM / SGLang names)
    top_k: int | None = None
    min_p: float | None = Field(default=None, ge=0, le=1)
    ignore_eos: bool = False
    repetition_penalty: float | None = Field(default=None, gt=0)
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        stops = [] if v is None else [v] if isinstance(v, str) else v
        if any(s == "" for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessageIn(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[Any] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionBody(_Sampling):
    messages: list[ChatMessageIn] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None


class CompletionBody(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


@dataclass(slots=True)
class Job:
    """One OpenAI request, ready to route."""
    kind: Literal["chat", "completion"]
    id: str
    model: str
    requests: list[worker_pb2.GenerateRequest]  # index p * n + c
    routing_texts: list[str]                    # per request
    n: int
    stream: bool
    include_usage: bool
    continuous_usage: bool
    echo_texts: list[str] | None = None         # completions with echo: per prompt
    logprobs: bool = False


def _validate(model_type: type[BaseModel], body: Any) -> Any:
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    try:
        return model_type.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise bad_request(f"{param}: {first['msg']}" if param else first["msg"], param) from None


def _sampling(b: _Sampling, logprobs: int | None, default_max: int | None
              ) -> worker_pb2.SamplingParams:
    if b.logit_bias:
        raise bad_request("logit_bias is not supported", "logit_bias")
    s = worker_pb2.SamplingParams(stop=b.stop, stop_token_ids=b.stop_token_ids or [],
                                  ignore_eos=b.ignore_eos)
    max_tokens = b.max_completion_tokens or b.max_tokens or default_max
    if max_tokens is not None:
        s.max_tokens = min(max_tokens, 2**31 - 1)
    for name in ("temperature", "top_p", "min_p", "seed", "presence_penalty",
                 "frequency_penalty", "repetition_penalty", "skip_special_tokens"):
        value = getattr(b, name)
        if value is not None:
            setattr(s, name, value)
    if b.top_k is not None and b.top_k not in (0, -1):
        if b.top_k < 1:
            raise bad_request("top_k must be >= 1, or 0/-1 to disable it", "top_k")
        s.top_k = b.top_k
    if logprobs is not None:
        s.logprobs = logprobs
    return s


def _choices(base: worker_pb2.GenerateRequest, n: int, seed: int | None, prefix: str
             ) -> list[worker_pb2.GenerateRequest]:
    out = []
    for c in range(n):
        r = worker_pb2.GenerateRequest()
        r.CopyFrom(base)
        r.request_id = f"{prefix}-{c}"
        if seed is not None and c:
            r.sampling.seed = (seed + c + 2**63) % 2**64 - 2**63
        out.append(r)
    return out


def parse_chat(body: Any) -> Job:
    b: ChatCompletionBody = _validate(ChatCompletionBody, body)
    if b.tools and b.tool_choice != "none":
        raise bad_request("tool calling is not supported", "tools")
    if b.response_format and b.response_format.get("type") not in (None, "text"):
        raise bad_request("response_format other than text is not supported",
                          "response_format")
    for i, m in enumerate(b.messages):
        if m.tool_calls:
            raise bad_request("tool calls in messages are not supported",
                              f"messages.{i}.tool_calls")
    if b.top_logprobs is not None and not b.logprobs:
        raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
    logprobs = (b.top_logprobs or 0) if b.logprobs else None
    base = worker_pb2.GenerateRequest(
        chat=worker_pb2.ChatMessages(
            messages=[worker_pb2.ChatMessage(role=m.role, content=m.text())
                      for m in b.messages],
            add_generation_prompt=True),
        sampling=_sampling(b, logprobs, None))  # None: see default_max_tokens
    job_id = f"chatcmpl-{uuid.uuid4().hex}"
    requests = _choices(base, b.n, b.seed, job_id)
    routing = "".join(m.text() for m in b.messages)
    opts = b.stream_options or StreamOptions()
    return Job("chat", job_id, b.model, requests, [routing] * len(requests), b.n, b.stream,
               opts.include_usage, opts.continuous_usage_stats, logprobs=b.logprobs)


def _is_token_ids(prompt: list[str] | list[int] | list[list[int]]) -> TypeIs[list[int]]:
    """One tokenized prompt (ids, not empty) rather than a list of prompts."""
    return bool(prompt) and all(isinstance(x, int) for x in prompt)


def parse_completion(body: Any) -> Job:
    b: CompletionBody = _validate(CompletionBody, body)
    if b.suffix:
        raise bad_request("suffix is not supported", "suffix")
    if b.best_of is not None and b.best_of != b.n:
        raise bad_request("best_of other than n is not supported", "best_of")
    if b.echo and b.logprobs is not None:
        raise bad_request("echo with logprobs needs prompt logprobs, which Tandem does not "
                          "compute", "echo")
    prompts: list[str | list[int]]
    p = b.prompt
    if isinstance(p, str):
        prompts = [p]
    elif _is_token_ids(p):
        prompts = [p]  # one tokenized prompt
    else:
        prompts = list(p)
    if not prompts:
        raise bad_request("prompt must not be empty", "prompt")
    if b.echo and not all(isinstance(x, str) for x in prompts):
        raise bad_request("echo is supported for text prompts only", "echo")
    job_id = f"cmpl-{uuid.uuid4().hex}"
    sampling = _sampling(b, b.logprobs, 16)
    requests, routing = [], []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            base = worker_pb2.GenerateRequest(text=prompt, sampling=sampling)
            text = prompt
        else:
            if not prompt:
                raise bad_request("a token-id prompt must not be empty", "prompt")
            base = worker_pb2.GenerateRequest(token_ids=worker_pb2.TokenIds(ids=prompt),
                                              sampling=sampling)
            text = " ".join(map(str, prompt))
        choices = _choices(base, b.n, b.seed, f"{job_id}-{i}")
        requests += choices
        routing += [text] * len(choices)
    opts = b.stream_options or StreamOptions()
    return Job("completion", job_id, b.model, requests, routing, b.n, b.stream,
               opts.include_usage, opts.continuous_usage_stats,
               echo_texts=[str(x) for x in prompts] if b.echo else None,
               logprobs=b.logprobs is not None)


def default_max_tokens(job: Job, max_model_len: int) -> None:
    """Chat without a token limit generates up to the model's context (the engine stops there)."""
    for r in job.requests:
        if not r.sampling.HasField("max_tokens"):
            r.sampling.max_tokens = max_model_len


def check_model(job: Job, served: dict[str, Any]) -> None:
    if job.model not in served:
        names = ", ".join(sorted(served)) or "none is ready"
        raise APIError(404, f"The model {job.model!r} does not exist; served: {names}",
                       param="model", code="model_not_found")
