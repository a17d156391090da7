"""KV transfer backends of kvd (NIXL, Mooncake, same-node local; Ascend refused): see base.py."""

from services.kvd.backends.base import (
    BACKEND_NAMES,
    BackendUnavailable,
    TransferBackend,
    TransferError,
    create_backend,
)

__all__ = [
    "BACKEND_NAMES",
    "BackendUnavailable",
    "TransferBackend",
    "TransferError",
    "create_backend",
]
