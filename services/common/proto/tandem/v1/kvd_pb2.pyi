from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KvLayout(_message.Message):
    __slots__ = ("num_pages", "num_layers", "page_size", "num_kv_heads", "head_dim", "dtype", "model")
    NUM_PAGES_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    num_pages: int
    num_layers: int
    page_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    model: str
    def __init__(self, num_pages: _Optional[int] = ..., num_layers: _Optional[int] = ..., page_size: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., dtype: _Optional[str] = ..., model: _Optional[str] = ...) -> None: ...

class KvPlacement(_message.Message):
    __slots__ = ("gpu_index", "gpu_uuid")
    GPU_INDEX_FIELD_NUMBER: _ClassVar[int]
    GPU_UUID_FIELD_NUMBER: _ClassVar[int]
    gpu_index: int
    gpu_uuid: bytes
    def __init__(self, gpu_index: _Optional[int] = ..., gpu_uuid: _Optional[bytes] = ...) -> None: ...

class AttachPoolRequest(_message.Message):
    __slots__ = ("worker_id", "layout", "placement")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    layout: KvLayout
    placement: KvPlacement
    def __init__(self, worker_id: _Optional[str] = ..., layout: _Optional[_Union[KvLayout, _Mapping]] = ..., placement: _Optional[_Union[KvPlacement, _Mapping]] = ...) -> None: ...

class AttachPoolResponse(_message.Message):
    __slots__ = ("pool_id", "segment_name", "total_bytes", "reattached", "cuda_ipc_handle", "kvd_gpu_index", "ready_flags_segment")
    POOL_ID_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_NAME_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    REATTACHED_FIELD_NUMBER: _ClassVar[int]
    CUDA_IPC_HANDLE_FIELD_NUMBER: _ClassVar[int]
    KVD_GPU_INDEX_FIELD_NUMBER: _ClassVar[int]
    READY_FLAGS_SEGMENT_FIELD_NUMBER: _ClassVar[int]
    pool_id: str
    segment_name: str
    total_bytes: int
    reattached: bool
    cuda_ipc_handle: bytes
    kvd_gpu_index: int
    ready_flags_segment: str
    def __init__(self, pool_id: _Optional[str] = ..., segment_name: _Optional[str] = ..., total_bytes: _Optional[int] = ..., reattached: _Optional[bool] = ..., cuda_ipc_handle: _Optional[bytes] = ..., kvd_gpu_index: _Optional[int] = ..., ready_flags_segment: _Optional[str] = ...) -> None: ...

class RoomAux(_message.Message):
    __slots__ = ("first_token_id", "first_logprob", "top_token_ids", "top_logprobs", "cached_tokens")
    FIRST_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    first_token_id: int
    first_logprob: float
    top_token_ids: _containers.RepeatedScalarFieldContainer[int]
    top_logprobs: _containers.RepeatedScalarFieldContainer[float]
    cached_tokens: int
    def __init__(self, first_token_id: _Optional[int] = ..., first_logprob: _Optional[float] = ..., top_token_ids: _Optional[_Iterable[int]] = ..., top_logprobs: _Optional[_Iterable[float]] = ..., cached_tokens: _Optional[int] = ...) -> None: ...

class ExpectKvRequest(_message.Message):
    __slots__ = ("pool_id", "room", "page_ids", "peer_address", "timeout_seconds", "accept_ready_event", "accept_ready_flag")
    POOL_ID_FIELD_NUMBER: _ClassVar[int]
    ROOM_FIELD_NUMBER: _ClassVar[int]
    PAGE_IDS_FIELD_NUMBER: _ClassVar[int]
    PEER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ACCEPT_READY_EVENT_FIELD_NUMBER: _ClassVar[int]
    ACCEPT_READY_FLAG_FIELD_NUMBER: _ClassVar[int]
    pool_id: str
    room: str
    page_ids: _containers.RepeatedScalarFieldContainer[int]
    peer_address: str
    timeout_seconds: float
    accept_ready_event: bool
    accept_ready_flag: bool
    def __init__(self, pool_id: _Optional[str] = ..., room: _Optional[str] = ..., page_ids: _Optional[_Iterable[int]] = ..., peer_address: _Optional[str] = ..., timeout_seconds: _Optional[float] = ..., accept_ready_event: _Optional[bool] = ..., accept_ready_flag: _Optional[bool] = ...) -> None: ...

class ReadyFlag(_message.Message):
    __slots__ = ("index", "ticket")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TICKET_FIELD_NUMBER: _ClassVar[int]
    index: int
    ticket: int
    def __init__(self, index: _Optional[int] = ..., ticket: _Optional[int] = ...) -> None: ...

class ExpectKvResponse(_message.Message):
    __slots__ = ("aux", "kv_bytes", "ready_event", "ready_flag")
    AUX_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    READY_EVENT_FIELD_NUMBER: _ClassVar[int]
    READY_FLAG_FIELD_NUMBER: _ClassVar[int]
    aux: RoomAux
    kv_bytes: int
    ready_event: bytes
    ready_flag: ReadyFlag
    def __init__(self, aux: _Optional[_Union[RoomAux, _Mapping]] = ..., kv_bytes: _Optional[int] = ..., ready_event: _Optional[bytes] = ..., ready_flag: _Optional[_Union[ReadyFlag, _Mapping]] = ...) -> None: ...

class AwaitBootstrapRequest(_message.Message):
    __slots__ = ("room", "timeout_seconds")
    ROOM_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    room: str
    timeout_seconds: float
    def __init__(self, room: _Optional[str] = ..., timeout_seconds: _Optional[float] = ...) -> None: ...

class AwaitBootstrapResponse(_message.Message):
    __slots__ = ("num_pages",)
    NUM_PAGES_FIELD_NUMBER: _ClassVar[int]
    num_pages: int
    def __init__(self, num_pages: _Optional[int] = ...) -> None: ...

class SendKvRequest(_message.Message):
    __slots__ = ("pool_id", "room", "page_ids", "peer_address", "aux", "timeout_seconds", "source_ready_event")
    POOL_ID_FIELD_NUMBER: _ClassVar[int]
    ROOM_FIELD_NUMBER: _ClassVar[int]
    PAGE_IDS_FIELD_NUMBER: _ClassVar[int]
    PEER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    AUX_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_READY_EVENT_FIELD_NUMBER: _ClassVar[int]
    pool_id: str
    room: str
    page_ids: _containers.RepeatedScalarFieldContainer[int]
    peer_address: str
    aux: RoomAux
    timeout_seconds: float
    source_ready_event: bytes
    def __init__(self, pool_id: _Optional[str] = ..., room: _Optional[str] = ..., page_ids: _Optional[_Iterable[int]] = ..., peer_address: _Optional[str] = ..., aux: _Optional[_Union[RoomAux, _Mapping]] = ..., timeout_seconds: _Optional[float] = ..., source_ready_event: _Optional[bytes] = ...) -> None: ...

class SendKvPart(_message.Message):
    __slots__ = ("request", "aux")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    AUX_FIELD_NUMBER: _ClassVar[int]
    request: SendKvRequest
    aux: RoomAux
    def __init__(self, request: _Optional[_Union[SendKvRequest, _Mapping]] = ..., aux: _Optional[_Union[RoomAux, _Mapping]] = ...) -> None: ...

class SendKvResponse(_message.Message):
    __slots__ = ("kv_bytes", "num_descriptors", "transfer_seconds", "backend", "queue_shard")
    KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    NUM_DESCRIPTORS_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    QUEUE_SHARD_FIELD_NUMBER: _ClassVar[int]
    kv_bytes: int
    num_descriptors: int
    transfer_seconds: float
    backend: str
    queue_shard: int
    def __init__(self, kv_bytes: _Optional[int] = ..., num_descriptors: _Optional[int] = ..., transfer_seconds: _Optional[float] = ..., backend: _Optional[str] = ..., queue_shard: _Optional[int] = ...) -> None: ...

class ReleaseRoomRequest(_message.Message):
    __slots__ = ("room",)
    ROOM_FIELD_NUMBER: _ClassVar[int]
    room: str
    def __init__(self, room: _Optional[str] = ...) -> None: ...

class ReleaseRoomResponse(_message.Message):
    __slots__ = ("existed",)
    EXISTED_FIELD_NUMBER: _ClassVar[int]
    existed: bool
    def __init__(self, existed: _Optional[bool] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PoolStats(_message.Message):
    __slots__ = ("pool_id", "worker_id", "num_pages", "pinned_pages")
    POOL_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_PAGES_FIELD_NUMBER: _ClassVar[int]
    PINNED_PAGES_FIELD_NUMBER: _ClassVar[int]
    pool_id: str
    worker_id: str
    num_pages: int
    pinned_pages: int
    def __init__(self, pool_id: _Optional[str] = ..., worker_id: _Optional[str] = ..., num_pages: _Optional[int] = ..., pinned_pages: _Optional[int] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("pools", "open_rooms", "rooms_completed", "rooms_failed", "bytes_sent", "backend", "peer_address", "metrics_address")
    POOLS_FIELD_NUMBER: _ClassVar[int]
    OPEN_ROOMS_FIELD_NUMBER: _ClassVar[int]
    ROOMS_COMPLETED_FIELD_NUMBER: _ClassVar[int]
    ROOMS_FAILED_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    PEER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    METRICS_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    pools: _containers.RepeatedCompositeFieldContainer[PoolStats]
    open_rooms: int
    rooms_completed: int
    rooms_failed: int
    bytes_sent: int
    backend: str
    peer_address: str
    metrics_address: str
    def __init__(self, pools: _Optional[_Iterable[_Union[PoolStats, _Mapping]]] = ..., open_rooms: _Optional[int] = ..., rooms_completed: _Optional[int] = ..., rooms_failed: _Optional[int] = ..., bytes_sent: _Optional[int] = ..., backend: _Optional[str] = ..., peer_address: _Optional[str] = ..., metrics_address: _Optional[str] = ...) -> None: ...

class HandshakeRequest(_message.Message):
    __slots__ = ("kvd_id", "backend", "backend_metadata", "peer_address")
    KVD_ID_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    BACKEND_METADATA_FIELD_NUMBER: _ClassVar[int]
    PEER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    kvd_id: str
    backend: str
    backend_metadata: bytes
    peer_address: str
    def __init__(self, kvd_id: _Optional[str] = ..., backend: _Optional[str] = ..., backend_metadata: _Optional[bytes] = ..., peer_address: _Optional[str] = ...) -> None: ...

class HandshakeResponse(_message.Message):
    __slots__ = ("kvd_id", "backend_metadata")
    KVD_ID_FIELD_NUMBER: _ClassVar[int]
    BACKEND_METADATA_FIELD_NUMBER: _ClassVar[int]
    kvd_id: str
    backend_metadata: bytes
    def __init__(self, kvd_id: _Optional[str] = ..., backend_metadata: _Optional[bytes] = ...) -> None: ...

class BootstrapRequest(_message.Message):
    __slots__ = ("room", "kvd_id", "pool_id", "layout", "pool_base_addr", "page_ids")
    ROOM_FIELD_NUMBER: _ClassVar[int]
    KVD_ID_FIELD_NUMBER: _ClassVar[int]
    POOL_ID_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    POOL_BASE_ADDR_FIELD_NUMBER: _ClassVar[int]
    PAGE_IDS_FIELD_NUMBER: _ClassVar[int]
    room: str
    kvd_id: str
    pool_id: str
    layout: KvLayout
    pool_base_addr: int
    page_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, room: _Optional[str] = ..., kvd_id: _Optional[str] = ..., pool_id: _Optional[str] = ..., layout: _Optional[_Union[KvLayout, _Mapping]] = ..., pool_base_addr: _Optional[int] = ..., page_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class BootstrapResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TransferDoneRequest(_message.Message):
    __slots__ = ("room", "kvd_id", "aux", "kv_bytes", "error", "in_flight")
    ROOM_FIELD_NUMBER: _ClassVar[int]
    KVD_ID_FIELD_NUMBER: _ClassVar[int]
    AUX_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    room: str
    kvd_id: str
    aux: RoomAux
    kv_bytes: int
    error: str
    in_flight: bool
    def __init__(self, room: _Optional[str] = ..., kvd_id: _Optional[str] = ..., aux: _Optional[_Union[RoomAux, _Mapping]] = ..., kv_bytes: _Optional[int] = ..., error: _Optional[str] = ..., in_flight: _Optional[bool] = ...) -> None: ...

class TransferDoneResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CancelRoomRequest(_message.Message):
    __slots__ = ("room", "kvd_id")
    ROOM_FIELD_NUMBER: _ClassVar[int]
    KVD_ID_FIELD_NUMBER: _ClassVar[int]
    room: str
    kvd_id: str
    def __init__(self, room: _Optional[str] = ..., kvd_id: _Optional[str] = ...) -> None: ...

class CancelRoomResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("kvd_id",)
    KVD_ID_FIELD_NUMBER: _ClassVar[int]
    kvd_id: str
    def __init__(self, kvd_id: _Optional[str] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("kvd_id",)
    KVD_ID_FIELD_NUMBER: _ClassVar[int]
    kvd_id: str
    def __init__(self, kvd_id: _Optional[str] = ...) -> None: ...
