"""One streamed request to an OpenAI-compatible server, measured: `stream_request` -> a record.

Contract: `stream_request` never raises for what the server or the network does; every failure
(HTTP status other than 200, an `error` object in the stream, a malformed chunk, a stream that ends
without `data: [DONE]`, a connection error, the per-request timeout) ends up in `record.error` as
one line. The caller owns the `httpx.AsyncClient` and closes it.

Timing, all from `time.perf_counter()` and in seconds:
- send: just before the request is written; `ttft_s`: send -> the first chunk with non-empty text
  (`choices[0].text`, or `delta.content` / `delta.reasoning_content` for chat), so a role-only
  first chunk does not count.
- `itl_s`: one entry per later chunk with text, the gap since the previous one. This is per chunk,
  not per token: a chunk carrying k tokens adds one gap (no tokenizer here to split it).
- `e2e_s`: send -> `data: [DONE]` (or the failure).
Token counts come from the `usage` chunk (the request sets `stream_options.include_usage`); a
server that sends none leaves `is_usage_reported` False and `output_tokens` = chunks with text.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import httpx

from services.bench.workload import BenchRequest


@dataclass(frozen=True, slots=True)
class StreamSettings:
    """What every request of a run shares."""
    url: str                  # the endpoint, e.g. http://127.0.0.1:8000/v1/chat/completions
    is_chat: bool
    model: str
    temperature: float = 0.0
    ignore_eos: bool = False
    api_key: str | None = None
    timeout_s: float = 1800.0


@dataclass(slots=True)
class RequestRecord:
    index: int
    prompt_len: int                  # the workload's estimate
    output_len: int                  # max_tokens asked
    send_s: float = 0.0              # since the benchmark started
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    e2e_s: float | None = None
    prompt_tokens: int | None = None  # usage.prompt_tokens
    output_tokens: int = 0            # usage.completion_tokens, else chunks with text
    num_chunks: int = 0               # chunks with text
    is_usage_reported: bool = False
    error: str | None = None

    @property
    def is_success(self) -> bool:
        return self.error is None


class _StreamError(Exception):
    pass


class ModelLookupError(RuntimeError):
    """GET /v1/models failed or named no model; the message is one line."""


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def build_payload(settings: StreamSettings, request: BenchRequest) -> dict:
    payload: dict = {"model": settings.model, "max_tokens": request.output_len,
                     "temperature": settings.temperature, "stream": True,
                     "stream_options": {"include_usage": True}}
    if settings.is_chat:
        payload["messages"] = [{"role": "user", "content": request.prompt}]
    else:
        payload["prompt"] = request.prompt
    if settings.ignore_eos:
        payload["ignore_eos"] = True
    return payload


def error_message(body: bytes) -> str:
    """The `message` of an OpenAI-style error body, else the body's start."""
    try:
        error = json.loads(body).get("error")
        message = error.get("message") if isinstance(error, dict) else error
        if message:
            return " ".join(str(message).split())
    except (ValueError, AttributeError):
        pass
    return " ".join(body[:200].decode("utf-8", "replace").split()) or "(empty body)"


def _chunk_text(chunk: dict, is_chat: bool) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    if not is_chat:
        return choices[0].get("text") or ""
    delta = choices[0].get("delta") or {}
    return (delta.get("content") or "") + (delta.get("reasoning_content") or "")


async def _read_stream(response: httpx.Response, record: RequestRecord, is_chat: bool,
                       send: float) -> None:
    last = None
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue  # blank separators, comments, event: lines
        data = line[5:].strip()
        now = time.perf_counter()
        if data == "[DONE]":
            record.e2e_s = now - send
            return
        try:
            chunk = json.loads(data)
        except ValueError:
            raise _StreamError(f"malformed SSE chunk: {data[:100]!r}") from None
        if not isinstance(chunk, dict):
            raise _StreamError(f"malformed SSE chunk: {data[:100]!r}")
        if chunk.get("error"):
            raise _StreamError(f"error in stream: {error_message(data.encode())}")
        try:
            usage = chunk.get("usage")
            if usage:
                record.prompt_tokens = int(usage["prompt_tokens"])
                record.output_tokens = int(usage["completion_tokens"])
                record.is_usage_reported = True
            has_text = bool(_chunk_text(chunk, is_chat))
        except (AttributeError, KeyError, TypeError, ValueError):
            raise _StreamError(f"malformed SSE chunk: {data[:100]!r}") from None
        if has_text:
            record.num_chunks += 1
            if last is None:
                record.ttft_s = now - send
            else:
                record.itl_s.append(now - last)
            last = now
    raise _StreamError("stream ended without data: [DONE]")


async def stream_request(client: httpx.AsyncClient, settings: StreamSettings,
                         request: BenchRequest, index: int, origin: float) -> RequestRecord:
    """Send one request, read its stream to the end; `origin` is the benchmark's start time."""
    record = RequestRecord(index=index, prompt_len=request.prompt_len,
                           output_len=request.output_len)
    payload = build_payload(settings, request)
    send = time.perf_counter()
    record.send_s = send - origin
    try:
        async with asyncio.timeout(settings.timeout_s):
            async with client.stream("POST", settings.url, json=payload,
                                     headers=auth_headers(settings.api_key)) as response:
                if response.status_code != 200:
                    body = await response.aread()
                    raise _StreamError(f"HTTP {response.status_code}: {error_message(body)}")
                await _read_stream(response, record, settings.is_chat, send)
    except _StreamError as e:
        record.error = str(e)
    except TimeoutError:
        record.error = f"timeout after {settings.timeout_s:g}s"
    except httpx.HTTPError as e:
        record.error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    if not record.is_usage_reported:
        record.output_tokens = record.num_chunks
    if record.e2e_s is None:
        record.e2e_s = time.perf_counter() - send
    return record


async def first_model(client: httpx.AsyncClient, base_url: str, api_key: str | None,
                      timeout_s: float) -> str:
    """The id of the first model of GET /v1/models; ModelLookupError otherwise."""
    url = f"{base_url}/v1/models"
    try:
        response = await client.get(url, headers=auth_headers(api_key), timeout=timeout_s)
    except httpx.HTTPError as e:
        raise ModelLookupError(f"GET {url}: {type(e).__name__}: {e}") from None
    if response.status_code != 200:
        raise ModelLookupError(f"GET {url}: HTTP {response.status_code}: "
                           f"{error_message(response.content)}")
    try:
        return str(response.json()["data"][0]["id"])
    except (ValueError, KeyError, IndexError, TypeError):
        raise ModelLookupError(f"GET {url}: no model in the answer; pass --model") from None
