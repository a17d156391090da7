"""The memory behind one kvd pool: a host shared-memory segment or a VRAM allocation.

Contract: kvd creates a pool's memory with `host_memory` (CPU workers: /dev/shm, the worker maps
it by name) or `gpu_memory` (GPU workers: cudaMalloc on the worker's GPU, found by UUID in
kvd's own device numbering; the worker opens the CUDA IPC handle). Either way kvd owns it and
gives it back with `release()` only after every transfer backend that registered it was
closed: unlink the segment (mappings stay valid until unmapped) or cudaFree. A killed kvd
leaves its /dev/shm segments behind (as before), while the CUDA driver frees its VRAM once no
process maps it any more.

`mem_type` / `device` are what a transfer backend registers ("DRAM", or "VRAM" on kvd's GPU
`device`). cuda-bindings is imported only for GPU pools.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass

from services.common.shm import buffer_address, create_segment, unlink_segment


@dataclass(frozen=True, slots=True)
class GpuPlacement:
    """The GPU a worker computes on, as the worker names it."""

    gpu_index: int  # the worker's own device index (for messages)
    gpu_uuid: bytes  # identifies the GPU in every process


@dataclass(slots=True, eq=False)
class PoolMemory:
    base_addr: int
    num_bytes: int
    mem_type: str  # "DRAM" | "VRAM"
    device: int | None  # kvd's CUDA device index of a VRAM pool; None for host memory
    segment_name: str = ""  # host pools: /dev/shm/<name>
    ipc_handle: bytes = b""  # VRAM pools: what the worker opens
    _buffer: mmap.mmap | None = None
    _vram: object | None = None  # services.common.vram.VramSegment
    is_released: bool = False

    def release(self) -> None:
        """Idempotent: unlink the segment / cudaFree (backends must be closed first)."""
        if self.is_released:
            return
        self.is_released = True
        if self._vram is not None:
            self._vram.free()  # type: ignore[attr-defined]
        else:
            unlink_segment(self.segment_name)


def host_memory(name: str, num_bytes: int) -> PoolMemory:
    """A new shared-memory segment (FileExistsError if the name is taken)."""
    buffer = create_segment(name, num_bytes)
    return PoolMemory(buffer_address(buffer), num_bytes, "DRAM", None, segment_name=name,
                      _buffer=buffer)


def gpu_memory(placement: GpuPlacement, num_bytes: int) -> PoolMemory:
    """VRAM on the worker's GPU. ValueError when kvd does not see that GPU; CudaUnavailable
    without cuda-bindings; CudaError when CUDA refuses (e.g. out of memory)."""
    from services.common.vram import VramSegment

    device = kvd_device(placement)
    segment = VramSegment.allocate(device, num_bytes)
    return PoolMemory(segment.ptr, num_bytes, "VRAM", device, ipc_handle=segment.ipc_handle,
                      _vram=segment)


def kvd_device(placement: GpuPlacement) -> int:
    """kvd's device index of the worker's GPU."""
    from services.common import cudart

    if placement.gpu_uuid:
        device = cudart.find_device(placement.gpu_uuid)
    else:  # a client that sent no UUID: trust the index
        device = placement.gpu_index if placement.gpu_index < cudart.device_count() else None
    if device is None:
        raise ValueError(
            f"the worker's GPU {placement.gpu_index} (uuid {placement.gpu_uuid.hex() or '-'}) is "
            f"not visible to kvd, which sees {cudart.device_count()} GPU(s); start kvd with that "
            "GPU visible (CUDA_VISIBLE_DEVICES)"
        )
    return device
