"""The few CUDA runtime calls Tandem makes itself, through cuda-python (`cuda.bindings.runtime`).

Contract: cuda-bindings is imported on the first call, never at import time, so CPU-only
processes (kvd on a machine without GPUs, the gateway) never need it; when it is missing the
call raises `CudaUnavailable` naming the package. Every failed CUDA call raises `CudaError`
naming the call and CUDA's error name. Device indexes are this process's own numbering
(CUDA_VISIBLE_DEVICES applies); `device_uuid` names a GPU the same way in every process.
Calls that act on a device select it first (`cudaSetDevice`), so callers need no current-device
bookkeeping; the current device of the calling thread changes as a side effect.
"""

from __future__ import annotations

import ctypes
from typing import Any

IPC_HANDLE_BYTES = 64  # sizeof(cudaIpcMemHandle_t)
_PIP_HINT = "pip install 'cuda-bindings>=13,<14' (the major version of the driver's CUDA)"
_rt: Any = None
_held: Any = None  # libcuda through ctypes.PyDLL, for queue_copies


class CudaUnavailable(RuntimeError):
    """cuda-bindings is missing or no CUDA driver answers; the message says which."""


class CudaError(RuntimeError):
    """A CUDA runtime call failed; the message names the call and CUDA's error."""


def runtime() -> Any:
    """The `cuda.bindings.runtime` module, imported once."""
    global _rt
    if _rt is None:
        try:
            from cuda.bindings import runtime as rt  # type: ignore[import-not-found]
        except ImportError as e:
            raise CudaUnavailable(
                f"GPU KV pools need the Python package cuda-bindings: {_PIP_HINT} ({e})"
            ) from e
        _rt = rt
    return _rt


def _call(what: str, result: tuple[Any, ...]) -> Any:
    """CUDA's (error, *values) tuple -> the value(s), or CudaError naming `what`."""
    rt = runtime()
    err, *values = result
    if err != rt.cudaError_t.cudaSuccess:
        name = rt.cudaGetErrorName(err)[1]
        raise CudaError(f"{what} failed: {name.decode() if isinstance(name, bytes) else name}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def device_count() -> int:
    """GPUs this process sees; 0 when the driver has none (never raises for that)."""
    rt = runtime()
    err, count = rt.cudaGetDeviceCount()
    if err != rt.cudaError_t.cudaSuccess:
        return 0
    return int(count)


def check_device(device: int) -> None:
    """ValueError unless `device` is a GPU index this process sees."""
    count = device_count()
    if not 0 <= device < count:
        raise ValueError(f"GPU {device} does not exist here: this process sees {count} GPU(s)")


def device_uuid(device: int) -> bytes:
    """The GPU's 16-byte UUID (the same in every process, whatever its device numbering)."""
    props = _call(f"cudaGetDeviceProperties({device})", runtime().cudaGetDeviceProperties(device))
    return bytes(props.uuid.bytes)


def device_name(device: int) -> str:
    props = _call(f"cudaGetDeviceProperties({device})", runtime().cudaGetDeviceProperties(device))
    name = props.name
    return (name.decode() if isinstance(name, bytes) else str(name)).rstrip("\x00")


def find_device(uuid: bytes) -> int | None:
    """This process's index of the GPU with `uuid`, or None when it does not see that GPU."""
    for device in range(device_count()):
        if device_uuid(device) == uuid:
            return device
    return None


def set_device(device: int) -> None:
    _call(f"cudaSetDevice({device})", runtime().cudaSetDevice(device))


def malloc(device: int, num_bytes: int) -> int:
    """`num_bytes` of device memory on `device`, zero-filled; the caller frees it (`free`)."""
    set_device(device)
    ptr = int(_call(f"cudaMalloc({num_bytes} bytes on GPU {device})",
                    runtime().cudaMalloc(num_bytes)))
    try:
        _call("cudaMemset", runtime().cudaMemset(ptr, 0, num_bytes))
        _call("cudaDeviceSynchronize", runtime().cudaDeviceSynchronize())
    except CudaError:
        free(device, ptr)
        raise
    return ptr


def free(device: int, ptr: int) -> None:
    set_device(device)
    _call(f"cudaFree on GPU {device}", runtime().cudaFree(ptr))


def ipc_handle(device: int, ptr: int) -> bytes:
    """The CUDA IPC handle of an allocation's base pointer, as bytes another process opens."""
    set_device(device)
    handle = _call("cudaIpcGetMemHandle", runtime().cudaIpcGetMemHandle(ptr))
    return ctypes.string_at(handle.getPtr(), IPC_HANDLE_BYTES)


def ipc_open(device: int, handle: bytes) -> int:
    """Map another process's allocation into this one, on `device`; close with `ipc_close`."""
    rt = runtime()
    native = _native_handle(rt.cudaIpcMemHandle_t, handle, device)
    return int(_call("cudaIpcOpenMemHandle",
                     rt.cudaIpcOpenMemHandle(native, rt.cudaIpcMemLazyEnablePeerAccess)))


def _native_handle(kind: Any, handle: bytes, device: int) -> Any:
    """`handle`'s bytes as CUDA's handle struct `kind`, with `device` made current."""
    if len(handle) != IPC_HANDLE_BYTES:
        raise ValueError(f"a CUDA IPC handle has {IPC_HANDLE_BYTES} bytes, got {len(handle)}")
    set_device(device)
    native = kind()
    ctypes.memmove(native.getPtr(), handle, IPC_HANDLE_BYTES)
    return native


def ipc_close(device: int, ptr: int) -> None:
    set_device(device)
    _call("cudaIpcCloseMemHandle", runtime().cudaIpcCloseMemHandle(ptr))


def enable_peer_access(device: int, peer: int) -> bool:
    """Let kernels and copies on `device` reach `peer`'s memory directly (NVLink / PCIe P2P);
    False when the hardware cannot. Enabling twice is fine."""
    rt = runtime()
    if device == peer:
        return True
    if not _call("cudaDeviceCanAccessPeer", rt.cudaDeviceCanAccessPeer(device, peer)):
        return False
    set_device(device)
    err, = rt.cudaDeviceEnablePeerAccess(peer, 0)
    if err not in (rt.cudaError_t.cudaSuccess, rt.cudaError_t.cudaErrorPeerAccessAlreadyEnabled):
        _call(f"cudaDeviceEnablePeerAccess({device} -> {peer})", (err,))
    return True


def stream_create(device: int) -> Any:
    """A non-blocking stream on `device` (it does not wait for the legacy default stream)."""
    rt = runtime()
    set_device(device)
    return _call("cudaStreamCreateWithFlags",
                 rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking))


def stream_destroy(stream: Any) -> None:
    _call("cudaStreamDestroy", runtime().cudaStreamDestroy(stream))


def copy_async(dst: int, src: int, num_bytes: int, stream: Any) -> None:
    """Queue a copy between any two addresses of the unified address space (device memory of
    any GPU, peer-to-peer where enabled, or host memory) on `stream`."""
    rt = runtime()
    _call("cudaMemcpyAsync",
          rt.cudaMemcpyAsync(dst, src, num_bytes, rt.cudaMemcpyKind.cudaMemcpyDefault, stream))


def queue_copies(stream: Any, runs: list[tuple[int, int, int]], before: Any,
                 after: list[Any]) -> None:
    """Queue on `stream` (of this thread's current device): a record of the event `before`,
    one copy per (destination, source, bytes) run of unified addresses (as `copy_async`), then
    a record of each event in `after` — without letting go of the GIL in between. Each call
    only queues work and returns in microseconds; through cuda-bindings, which releases the
    GIL around every call, another busy thread of the process took it back in between: a
    handful of these calls took ~0.13 ms in kvd on an H100 host while it received a message.
    Raises CudaError naming the failed call (what was queued before it stays queued)."""
    cu = _driver_holding_gil()
    handle = int(stream)
    _held_call(cu, "cuEventRecord", cu.cuEventRecord(int(before), handle))
    for dst, src, num_bytes in runs:
        _held_call(cu, "cuMemcpyAsync", cu.cuMemcpyAsync(dst, src, num_bytes, handle))
    for event in after:
        _held_call(cu, "cuEventRecord", cu.cuEventRecord(int(event), handle))


def queue_wait_and_record(stream: Any, wait_for: Any, record: Any) -> None:
    """Queue on `stream` (of this thread's current device) a wait for the event `wait_for`
    (any device's), then a record of `record`, keeping the GIL (see `queue_copies`)."""
    cu = _driver_holding_gil()
    handle = int(stream)
    _held_call(cu, "cuStreamWaitEvent", cu.cuStreamWaitEvent(handle, int(wait_for), 0))
    _held_call(cu, "cuEventRecord", cu.cuEventRecord(int(record), handle))


def _driver_holding_gil() -> Any:
    global _held
    if _held is None:
        runtime()  # the same CUDA presence check as every call here
        try:
            lib = ctypes.PyDLL("libcuda.so.1")  # PyDLL: calls keep the GIL
        except OSError as e:
            raise CudaUnavailable(f"the CUDA driver library libcuda.so.1: {e}") from e
        lib.cuEventRecord.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        lib.cuMemcpyAsync.argtypes = [ctypes.c_uint64, ctypes.c_uint64, ctypes.c_size_t,
                                      ctypes.c_void_p]
        lib.cuStreamWaitEvent.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint]
        lib.cuGetErrorName.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
        for fn in (lib.cuEventRecord, lib.cuMemcpyAsync, lib.cuStreamWaitEvent,
                   lib.cuGetErrorName):
            fn.restype = ctypes.c_int
        _held = lib
    return _held


def _held_call(cu: Any, what: str, result: int) -> None:
    if result != 0:  # CUDA_SUCCESS
        name = ctypes.c_char_p()
        cu.cuGetErrorName(result, ctypes.byref(name))
        raise CudaError(f"{what} failed: {(name.value or b'CUDA error %d' % result).decode()}")


def stream_synchronize(stream: Any) -> None:
    _call("cudaStreamSynchronize", runtime().cudaStreamSynchronize(stream))


def copy_sync(dst: int, src: int, num_bytes: int) -> None:
    """A blocking copy between any two unified addresses (tests, small reads)."""
    rt = runtime()
    _call("cudaMemcpy", rt.cudaMemcpy(dst, src, num_bytes, rt.cudaMemcpyKind.cudaMemcpyDefault))


def mem_get_info(device: int) -> tuple[int, int]:
    """(free, total) bytes of `device`'s memory."""
    set_device(device)
    free_bytes, total = _call("cudaMemGetInfo", runtime().cudaMemGetInfo())
    return int(free_bytes), int(total)


def driver_version() -> str:
    """The driver's CUDA version as "major.minor" (e.g. "13.0")."""
    version = int(_call("cudaDriverGetVersion", runtime().cudaDriverGetVersion()))
    return f"{version // 1000}.{version % 1000 // 10}"


def ipc_event_create(device: int) -> tuple[Any, bytes]:
    """(event, its CUDA IPC handle) on `device`: an interprocess event without timing, which
    another process opens (cudaIpcOpenEventHandle; torch.cuda.Event.from_ipc_handle) to wait
    on this process's records of it."""
    event = event_create(device, interprocess=True)
    try:
        handle = _call("cudaIpcGetEventHandle", runtime().cudaIpcGetEventHandle(event))
    except CudaError:
        runtime().cudaEventDestroy(event)
        raise
    return event, ctypes.string_at(handle.getPtr(), IPC_HANDLE_BYTES)


def ipc_event_open(device: int, handle: bytes) -> Any:
    """Open another process's interprocess event (its `ipc_event_create` handle) on `device`,
    the GPU it was made on; destroy it with `event_destroy` (the other process's stays)."""
    rt = runtime()
    native = _native_handle(rt.cudaIpcEventHandle_t, handle, device)
    return _call("cudaIpcOpenEventHandle", rt.cudaIpcOpenEventHandle(native))


def event_record(event: Any, stream: Any) -> None:
    _call("cudaEventRecord", runtime().cudaEventRecord(event, stream))


def event_synchronize(event: Any) -> None:
    """Until the event's last record has completed (GIL released while waiting)."""
    _call("cudaEventSynchronize", runtime().cudaEventSynchronize(event))


def event_query(event: Any) -> bool:
    """Whether the event's last record has completed (never waits)."""
    rt = runtime()
    (err,) = rt.cudaEventQuery(event)
    if err == rt.cudaError_t.cudaErrorNotReady:
        return False
    _call("cudaEventQuery", (err,))
    return True


def event_destroy(event: Any) -> None:
    _call("cudaEventDestroy", runtime().cudaEventDestroy(event))


def event_create(device: int, interprocess: bool = False, timing: bool = False) -> Any:
    """An event on `device`: without timing (to order streams; `interprocess`: also another
    process's, see `ipc_event_create`), or with `timing` (for `event_elapsed_seconds`)."""
    rt = runtime()
    set_device(device)
    if timing:
        assert not interprocess, "CUDA's interprocess events cannot time"
        flags = rt.cudaEventDefault
    else:
        flags = rt.cudaEventDisableTiming | (rt.cudaEventInterprocess if interprocess else 0)
    return _call("cudaEventCreateWithFlags", rt.cudaEventCreateWithFlags(flags))


def event_elapsed_seconds(start: Any, end: Any) -> float:
    """GPU time between two completed records of timing events of one device."""
    return float(_call("cudaEventElapsedTime", runtime().cudaEventElapsedTime(start, end))) / 1e3


def stream_wait_event(stream: Any, event: Any) -> None:
    """Later work on `stream` waits for the event's last record (any device's)."""
    _call("cudaStreamWaitEvent", runtime().cudaStreamWaitEvent(stream, event, 0))
