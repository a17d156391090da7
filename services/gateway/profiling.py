"""Profiling workers through the gateway: `POST /start_profile`, `POST /stop_profile`.

Contract: the JSON body (optional) selects workers — `role` ("prefill", "decode", "worker" or
"all", the default) and/or `url` (one worker, as given on the gateway's command line) — and,
for start, passes `output_dir`, `record_shapes`, `with_stack`, `activities` to each worker's
ProfilerService. Prefill and decode workers are profiled separately (one trace file each), as
the seed requires. Answers 200 with one entry per worker (`url`, `role`, and `output_dir` or
`trace_path`), or, if any worker refused, the first refusal's status with every worker's
outcome in the message. Unknown role/url: 400. Workers out of rotation are included: profiling
is how one finds out why they are slow.
"""

from __future__ import annotations

import asyncio
import json

import grpc
from starlette.requests import Request
from starlette.responses import JSONResponse

from services.common.proto.tandem.v1 import profiler_pb2, profiler_pb2_grpc
from services.gateway.errors import APIError, bad_request
from services.gateway.router import Router
from services.gateway.workers import Worker

PROFILE_TIMEOUT_S = 120.0  # writing a long trace takes a while


async def _selection(request: Request, router: Router) -> tuple[list[Worker], dict]:
    raw = await request.body()
    try:
        body = json.loads(raw) if raw.strip() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    role = body.get("role", "all")
    roles = router.roles if role == "all" else (role,)
    if any(r not in router.roles for r in roles):
        raise bad_request(f"role must be one of {['all', *router.roles]}, got {role!r}", "role")
    workers = [w for r in roles for w in router.groups[r].workers]
    url = body.get("url")
    if url is not None:
        workers = [w for w in workers if w.url == url]
        if not workers:
            raise bad_request(f"no {role} worker {url!r} behind this gateway", "url")
    return workers, body


def _stub(worker: Worker) -> profiler_pb2_grpc.ProfilerServiceStub:
    return profiler_pb2_grpc.ProfilerServiceStub(worker.channel)


async def _each(workers: list[Worker], call) -> JSONResponse:
    results = await asyncio.gather(*(call(w) for w in workers), return_exceptions=True)
    entries, failures = [], []
    for worker, result in zip(workers, results, strict=True):
        entry = {"url": worker.url, "role": worker.role}
        if isinstance(result, grpc.aio.AioRpcError):
            failures.append((worker, result))
            entry["error"] = f"{result.code().name}: {result.details()}"
        elif isinstance(result, BaseException):
            raise result
        else:
            entry.update(result)
        entries.append(entry)
    if failures:
        first = APIError.from_grpc(failures[0][1], f"{failures[0][0].role} worker "
                                                   f"{failures[0][0].url}")
        first.message = "; ".join(
            f"{e['url']}: {e.get('error', 'ok')}" for e in entries)
        raise first
    return JSONResponse({"workers": entries})


async def start_profile(request: Request, router: Router) -> JSONResponse:
    workers, body = await _selection(request, router)
    activities = body.get("activities") or []
    if not isinstance(activities, list) or not all(isinstance(a, str) for a in activities):
        raise bad_request("activities must be a list of strings", "activities")
    message = profiler_pb2.StartProfileRequest(
        output_dir=str(body.get("output_dir") or ""),
        record_shapes=bool(body.get("record_shapes", False)),
        with_stack=bool(body.get("with_stack", False)), activities=activities)

    async def call(worker: Worker) -> dict:
        reply = await _stub(worker).StartProfile(message, timeout=PROFILE_TIMEOUT_S)
        return {"output_dir": reply.output_dir}

    return await _each(workers, call)


async def stop_profile(request: Request, router: Router) -> JSONResponse:
    workers, _ = await _selection(request, router)

    async def call(worker: Worker) -> dict:
        reply = await _stub(worker).StopProfile(profiler_pb2.StopProfileRequest(),
                                                timeout=PROFILE_TIMEOUT_S)
        return {"trace_path": reply.trace_path, "seconds": reply.seconds}

    return await _each(workers, call)
