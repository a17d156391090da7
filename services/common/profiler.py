"""The torch profiler of one worker, behind the ProfilerService gRPC service.

Contract: `ProfilerServicer(engine, name, device)` serves StartProfile / StopProfile for the
worker whose `EngineLoop` it is given. The profiler is started and stopped on the engine's own
thread (between two steps), so it records the forward passes; StopProfile writes one
Chrome-trace JSON file, `<output_dir>/<name>-<unix time>.trace.json`, and answers its path.
One profile at a time: starting twice or stopping when none runs is FAILED_PRECONDITION; an
output directory that cannot be written or an unknown activity is INVALID_ARGUMENT. The default
directory is `$SGLANG_TORCH_PROFILER_DIR` (SGLang's variable), else /tmp.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import grpc
import torch

from services.common.proto.tandem.v1 import profiler_pb2, profiler_pb2_grpc
from services.engine.engine_loop import EngineLoop

ACTIVITIES = {"CPU": torch.profiler.ProfilerActivity.CPU,
              "GPU": torch.profiler.ProfilerActivity.CUDA}


def default_output_dir() -> str:
    return os.environ.get("SGLANG_TORCH_PROFILER_DIR") or "/tmp"


class ProfilerServicer(profiler_pb2_grpc.ProfilerServiceServicer):
    def __init__(self, engine: EngineLoop, name: str, device: str) -> None:
        self.engine = engine
        self.name = name
        self.device = device
        self._profile: torch.profiler.profile | None = None
        self._output_dir: Path | None = None
        self._started = 0.0

    async def StartProfile(self, request: profiler_pb2.StartProfileRequest,
                           context: grpc.aio.ServicerContext
                           ) -> profiler_pb2.StartProfileResponse:
        if self._profile is not None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"{self.name} is already being profiled; stop it first")
        output_dir = Path(request.output_dir or default_output_dir())
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
            if not os.access(output_dir, os.W_OK):
                raise PermissionError(f"{output_dir} is not writable")
        except OSError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"output_dir: {e}")
        names = list(request.activities) or (
            ["CPU", "GPU"] if self.device.startswith("cuda") else ["CPU"])
        unknown = [a for a in names if a not in ACTIVITIES]
        if unknown:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"unknown activities {unknown}; choose from {sorted(ACTIVITIES)}")
        if "GPU" in names and not self.device.startswith("cuda"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"GPU activity on a worker running on {self.device}")
        profile = torch.profiler.profile(
            activities=[ACTIVITIES[a] for a in names], record_shapes=request.record_shapes,
            with_stack=request.with_stack)
        self._profile, self._output_dir = profile, output_dir  # claimed before the await
        try:
            await self.engine.run_on_engine_thread(lambda engine: profile.start())
        except BaseException:
            self._profile = None
            raise
        self._started = time.monotonic()
        return profiler_pb2.StartProfileResponse(output_dir=str(output_dir))

    async def StopProfile(self, request: profiler_pb2.StopProfileRequest,
                          context: grpc.aio.ServicerContext) -> profiler_pb2.StopProfileResponse:
        profile, output_dir = self._profile, self._output_dir
        if profile is None or output_dir is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"{self.name} is not being profiled")
        self._profile = None
        seconds = time.monotonic() - self._started
        path = output_dir / f"{self.name}-{int(time.time() * 1000)}.trace.json"

        def stop_and_export(engine: object) -> None:
            profile.stop()
            profile.export_chrome_trace(str(path))

        await self.engine.run_on_engine_thread(stop_and_export)
        return profiler_pb2.StopProfileResponse(trace_path=str(path), seconds=seconds)
