from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class StartProfileRequest(_message.Message):
    __slots__ = ("output_dir", "record_shapes", "with_stack", "activities")
    OUTPUT_DIR_FIELD_NUMBER: _ClassVar[int]
    RECORD_SHAPES_FIELD_NUMBER: _ClassVar[int]
    WITH_STACK_FIELD_NUMBER: _ClassVar[int]
    ACTIVITIES_FIELD_NUMBER: _ClassVar[int]
    output_dir: str
    record_shapes: bool
    with_stack: bool
    activities: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, output_dir: _Optional[str] = ..., record_shapes: _Optional[bool] = ..., with_stack: _Optional[bool] = ..., activities: _Optional[_Iterable[str]] = ...) -> None: ...

class StartProfileResponse(_message.Message):
    __slots__ = ("output_dir",)
    OUTPUT_DIR_FIELD_NUMBER: _ClassVar[int]
    output_dir: str
    def __init__(self, output_dir: _Optional[str] = ...) -> None: ...

class StopProfileRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StopProfileResponse(_message.Message):
    __slots__ = ("trace_path", "seconds")
    TRACE_PATH_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    trace_path: str
    seconds: float
    def __init__(self, trace_path: _Optional[str] = ..., seconds: _Optional[float] = ...) -> None: ...
