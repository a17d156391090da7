"""An SM-driven batched copy kernel, compiled at run time with NVRTC: the alternative to the
copy engines that bench/peer_copy_gpu.py measures for kvd's same-node path.

Measured on 2xH100 NV18 (bench/results/peer_copy-h100.json), 512 MiB GPU 0 -> GPU 1: this
kernel 333 GB/s pushing and 347 GB/s pulling, against 388 GB/s for one `cudaMemcpyAsync` and
383 GB/s for torch's copy; with 256 descriptors of 2 MiB it beat 256 `cudaMemcpyAsync` calls
(301 against 272 GB/s). kvd keeps the copy engines: its pages coalesce into few runs.

Contract: `BatchedCopy(device)` compiles the kernel for `device`'s architecture (once per
process and architecture) and loads it into the device's primary context; it needs
cuda-bindings and an NVRTC library (`libnvrtc.so`, shipped with the CUDA toolkit and with
torch's CUDA wheels), and raises `CudaUnavailable` naming what is missing. `copy(descriptors,
stream)` queues ONE launch that copies every `(dst, src, num_bytes)` descriptor on `stream`
(a stream of `device`), each address a unified device address `device` can reach (its own
memory, or a peer's with peer access enabled); it returns once queued: the caller synchronizes
the stream. Every address and length must be a multiple of `ALIGN` bytes (`aligned` says
whether they are; callers copy the rest with `cudaMemcpyAsync`). The kernel reads the
descriptor table from this instance's pinned host buffer, so the stream must be synchronized
before the next `copy` on the same instance: one instance serves one thread.
"""

from __future__ import annotations

import ctypes
import threading
from typing import Any

import numpy as np

from services.common import cudart

ALIGN = 16  # bytes per vector load/store (uint4)
_UNROLL = 4
_THREADS = 512
_BLOCKS_PER_SM = 4
_NAME = b"tandem_batched_copy"
_SOURCE = r"""
struct Desc { unsigned long long dst, src, n16; };
extern "C" __global__ void __launch_bounds__(THREADS)
tandem_batched_copy(const Desc* __restrict__ descs, int num_descs) {
  const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x * UNROLL;
  for (int d = blockIdx.y; d < num_descs; d += gridDim.y) {
    const uint4* __restrict__ src = (const uint4*)descs[d].src;
    uint4* __restrict__ dst = (uint4*)descs[d].dst;
    const unsigned long long n = descs[d].n16;
    for (unsigned long long base = (unsigned long long)blockIdx.x * blockDim.x * UNROLL
         + threadIdx.x; base < n; base += stride) {
      uint4 v[UNROLL];
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        unsigned long long i = base + (unsigned long long)u * blockDim.x;
        if (i < n) v[u] = __ldcs(src + i);
      }
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        unsigned long long i = base + (unsigned long long)u * blockDim.x;
        if (i < n) __stcs(dst + i, v[u]);
      }
    }
  }
}
"""
_DESC = np.dtype([("dst", np.uint64), ("src", np.uint64), ("n16", np.uint64)])
_cubins: dict[tuple[int, int], bytes] = {}  # (major, minor) -> compiled kernel
_compile_lock = threading.Lock()


def _attribute(device: int, name: str) -> int:
    rt = cudart.runtime()
    err, value = rt.cudaDeviceGetAttribute(getattr(rt.cudaDeviceAttr, name), device)
    if err != rt.cudaError_t.cudaSuccess:
        raise cudart.CudaError(f"cudaDeviceGetAttribute({name}) failed: {err.name}")
    return int(value)


def _host_alloc(num_bytes: int) -> int:
    """Pinned host memory every device can read (portable, mapped: under unified addressing
    its address is its device address)."""
    rt = cudart.runtime()
    err, ptr = rt.cudaHostAlloc(num_bytes, rt.cudaHostAllocPortable | rt.cudaHostAllocMapped)
    if err != rt.cudaError_t.cudaSuccess:
        raise cudart.CudaError(f"cudaHostAlloc failed: {err.name}")
    return int(ptr)


def _free_host(ptr: int) -> None:
    cudart.runtime().cudaFreeHost(ptr)


def aligned(dst: int, src: int, num_bytes: int) -> bool:
    return (dst | src | num_bytes) % ALIGN == 0


def _nvrtc() -> Any:
    try:
        from cuda.bindings import nvrtc  # type: ignore[import-not-found]

        nvrtc.nvrtcVersion()  # loads libnvrtc
    except Exception as e:  # noqa: BLE001 - ImportError or the library loader's own error
        raise cudart.CudaUnavailable(
            "the GPU copy kernel needs NVRTC (libnvrtc.so from the CUDA toolkit or the "
            f"nvidia-cuda-nvrtc wheel) and cuda-bindings: {e}") from e
    return nvrtc


def compile_cubin(major: int, minor: int) -> bytes:
    """The kernel as a cubin for compute capability major.minor (cached per process)."""
    with _compile_lock:
        cubin = _cubins.get((major, minor))
        if cubin is not None:
            return cubin
        nvrtc = _nvrtc()

        def check(what: str, result: tuple[Any, ...]) -> Any:
            err, *values = result
            if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
                raise cudart.CudaError(f"{what} failed: {err.name}")
            return values[0] if values else None

        prog = check("nvrtcCreateProgram",
                     nvrtc.nvrtcCreateProgram(_SOURCE.encode(), b"copy.cu", 0, [], []))
        try:
            options = [f"--gpu-architecture=sm_{major}{minor}".encode(),
                       f"-DTHREADS={_THREADS}".encode(), f"-DUNROLL={_UNROLL}".encode()]
            err, = nvrtc.nvrtcCompileProgram(prog, len(options), options)
            if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
                size = check("nvrtcGetProgramLogSize", nvrtc.nvrtcGetProgramLogSize(prog))
                log = b" " * size
                nvrtc.nvrtcGetProgramLog(prog, log)
                why = log.decode(errors="replace")
                raise cudart.CudaError(f"nvrtcCompileProgram failed: {why}")
            size = check("nvrtcGetCUBINSize", nvrtc.nvrtcGetCUBINSize(prog))
            cubin = b" " * size
            check("nvrtcGetCUBIN", nvrtc.nvrtcGetCUBIN(prog, cubin))
        finally:
            nvrtc.nvrtcDestroyProgram(prog)
        _cubins[(major, minor)] = cubin
        return cubin


class BatchedCopy:
    def __init__(self, device: int) -> None:
        from cuda.bindings import driver  # type: ignore[import-not-found]

        self._driver = driver
        self.device = device
        major = _attribute(device, "cudaDevAttrComputeCapabilityMajor")
        minor = _attribute(device, "cudaDevAttrComputeCapabilityMinor")
        cubin = compile_cubin(major, minor)
        cudart.set_device(device)  # the device's primary context is current from here on
        cudart.runtime().cudaFree(0)
        self._check("cuInit", driver.cuInit(0))
        self._module = self._check("cuModuleLoadData", driver.cuModuleLoadData(cubin))
        self._function = self._check("cuModuleGetFunction",
                                     driver.cuModuleGetFunction(self._module, _NAME))
        self._blocks = _attribute(device, "cudaDevAttrMultiProcessorCount") * _BLOCKS_PER_SM
        self._table = 0  # pinned host buffer of the descriptor table (read by the kernel)
        self._capacity = 0  # descriptors it holds

    def _check(self, what: str, result: tuple[Any, ...]) -> Any:
        err, *values = result
        if err != self._driver.CUresult.CUDA_SUCCESS:
            raise cudart.CudaError(f"{what} failed on GPU {self.device}: {err.name}")
        return values[0] if values else None

    def copy(self, descriptors: list[tuple[int, int, int]], stream: Any) -> None:
        """Queue one launch copying every (dst, src, num_bytes) on `stream` (see module doc)."""
        if not descriptors:
            return
        table = np.array([(d, s, n // ALIGN) for d, s, n in descriptors], dtype=_DESC)
        if any(not aligned(d, s, n) for d, s, n in descriptors):
            raise ValueError(f"copy kernel: addresses and lengths must be multiples of {ALIGN}")
        if len(table) > self._capacity:
            self._grow(len(table))
        ctypes.memmove(self._table, table.ctypes.data, table.nbytes)
        rows = min(len(table), 65535)
        cols = max(1, self._blocks // rows)
        cudart.set_device(self.device)
        self._check("cuLaunchKernel", self._driver.cuLaunchKernel(
            self._function, cols, rows, 1, _THREADS, 1, 1, 0, stream,
            ((self._table, len(table)), (ctypes.c_void_p, ctypes.c_int)), 0))

    def _grow(self, count: int) -> None:
        if self._table:
            _free_host(self._table)
            self._table = 0
        capacity = max(count, 2 * self._capacity, 256)
        self._table = _host_alloc(capacity * _DESC.itemsize)
        self._capacity = capacity

    def close(self) -> None:
        """Free the table and unload the module (no copy of this instance may be queued)."""
        if self._table:
            _free_host(self._table)
            self._table = 0
        if self._module is not None:
            cudart.set_device(self.device)
            self._driver.cuModuleUnload(self._module)
            self._module = None
