from liveserve.api.v1 import live_stream_pb2 as _live_stream_pb2
from liveserve.internal.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class OpenRequest(_message.Message):
    __slots__ = ("session_id", "open")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    OPEN_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    open: _live_stream_pb2.Open
    def __init__(self, session_id: _Optional[str] = ..., open: _Optional[_Union[_live_stream_pb2.Open, _Mapping]] = ...) -> None: ...

class OpenResponse(_message.Message):
    __slots__ = ("replica_id", "epoch", "limits")
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    epoch: int
    limits: _live_stream_pb2.Limits
    def __init__(self, replica_id: _Optional[str] = ..., epoch: _Optional[int] = ..., limits: _Optional[_Union[_live_stream_pb2.Limits, _Mapping]] = ...) -> None: ...

class FrameFeatures(_message.Message):
    __slots__ = ("timestamp", "features", "received_at")
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_AT_FIELD_NUMBER: _ClassVar[int]
    timestamp: float
    features: _tensor_pb2.Tensor
    received_at: float
    def __init__(self, timestamp: _Optional[float] = ..., features: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., received_at: _Optional[float] = ...) -> None: ...

class PushRequest(_message.Message):
    __slots__ = ("session_id", "epoch", "frame", "query", "close", "trace_context")
    class TraceContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    TRACE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    epoch: int
    frame: FrameFeatures
    query: _live_stream_pb2.Query
    close: CloseSession
    trace_context: _containers.ScalarMap[str, str]
    def __init__(self, session_id: _Optional[str] = ..., epoch: _Optional[int] = ..., frame: _Optional[_Union[FrameFeatures, _Mapping]] = ..., query: _Optional[_Union[_live_stream_pb2.Query, _Mapping]] = ..., close: _Optional[_Union[CloseSession, _Mapping]] = ..., trace_context: _Optional[_Mapping[str, str]] = ...) -> None: ...

class CloseSession(_message.Message):
    __slots__ = ("drain",)
    DRAIN_FIELD_NUMBER: _ClassVar[int]
    drain: bool
    def __init__(self, drain: _Optional[bool] = ...) -> None: ...

class PushResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class EventBatch(_message.Message):
    __slots__ = ("messages",)
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[_live_stream_pb2.ServerMessage]
    def __init__(self, messages: _Optional[_Iterable[_Union[_live_stream_pb2.ServerMessage, _Mapping]]] = ...) -> None: ...

class EventsRequest(_message.Message):
    __slots__ = ("session_id", "epoch")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    epoch: int
    def __init__(self, session_id: _Optional[str] = ..., epoch: _Optional[int] = ...) -> None: ...
