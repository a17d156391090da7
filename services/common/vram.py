"""GPU memory for KV pools: kvd allocates it, workers map it through CUDA IPC.

Contract (the GPU counterpart of shm.py):

    kvd      VramSegment.allocate(device, size)   cudaMalloc, zero-filled; `ipc_handle` to send
             segment.free()                        cudaFree, after every backend that registered
                                                   it was closed; a dead kvd's memory is freed
                                                   by the driver
    worker   IpcMapping.open(device, handle, size) cudaIpcOpenMemHandle on the worker's GPU;
             mapping.__cuda_array_interface__      a uint8 view of the whole pool (no copy;
                                                   torch.as_tensor takes it)
             mapping.close()                       cudaIpcCloseMemHandle (on exit); kvd's
                                                   allocation stays, for a re-attach

`device` is each process's own index of the GPU (the two may differ when the processes see
different CUDA_VISIBLE_DEVICES: kvd finds the worker's GPU by its UUID). No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from services.common import cudart


@dataclass(slots=True, eq=False)
class VramSegment:
    """kvd's allocation of one pool on one GPU."""

    device: int
    ptr: int
    num_bytes: int
    ipc_handle: bytes
    is_freed: bool = False

    @classmethod
    def allocate(cls, device: int, num_bytes: int) -> VramSegment:
        """Raises ValueError for a GPU kvd does not see, CudaError (e.g. out of memory)."""
        if num_bytes <= 0:
            raise ValueError(f"a VRAM pool needs a positive size, got {num_bytes}")
        cudart.check_device(device)
        ptr = cudart.malloc(device, num_bytes)
        try:
            handle = cudart.ipc_handle(device, ptr)
        except cudart.CudaError:
            cudart.free(device, ptr)
            raise
        return cls(device, ptr, num_bytes, handle)

    def free(self) -> None:
        """Idempotent."""
        if not self.is_freed:
            self.is_freed = True
            cudart.free(self.device, self.ptr)


@dataclass(slots=True, eq=False)
class IpcMapping:
    """A worker's mapping of kvd's VRAM pool; the pool tensor must not outlive it."""

    device: int
    ptr: int
    num_bytes: int
    is_closed: bool = False

    @classmethod
    def open(cls, device: int, handle: bytes, num_bytes: int) -> IpcMapping:
        cudart.check_device(device)
        return cls(device, cudart.ipc_open(device, handle), num_bytes)

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        if self.is_closed:
            raise ValueError("the KV pool's IPC mapping is closed")
        # version 3, no "stream": the consumer need not synchronize with any stream
        return {"shape": (self.num_bytes,), "typestr": "|u1", "data": (self.ptr, False),
                "strides": None, "version": 3}

    def close(self) -> None:
        """Idempotent; tensors viewing the mapping must be gone (or never used again)."""
        if not self.is_closed:
            self.is_closed = True
            cudart.ipc_close(self.device, self.ptr)
