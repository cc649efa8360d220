from liveserve.api.v1 import live_stream_pb2 as _live_stream_pb2
from liveserve.internal.v2 import session_pb2 as _session_pb2
from liveserve.internal.v2 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SyncFrames(_message.Message):
    __slots__ = ("session_id", "first", "frame_ids", "timestamps")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_FIELD_NUMBER: _ClassVar[int]
    FRAME_IDS_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMPS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    first: int
    frame_ids: _containers.RepeatedScalarFieldContainer[int]
    timestamps: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, session_id: _Optional[str] = ..., first: _Optional[int] = ..., frame_ids: _Optional[_Iterable[int]] = ..., timestamps: _Optional[_Iterable[float]] = ...) -> None: ...

class Respond(_message.Message):
    __slots__ = ("session_id", "trigger", "timestamp", "query", "trace_context")
    class TraceContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TRIGGER_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    TRACE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    trigger: _live_stream_pb2.Trigger
    timestamp: float
    query: str
    trace_context: _containers.ScalarMap[str, str]
    def __init__(self, session_id: _Optional[str] = ..., trigger: _Optional[_Union[_live_stream_pb2.Trigger, str]] = ..., timestamp: _Optional[float] = ..., query: _Optional[str] = ..., trace_context: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ReactionCommand(_message.Message):
    __slots__ = ("sync_frames", "respond", "close_session")
    SYNC_FRAMES_FIELD_NUMBER: _ClassVar[int]
    RESPOND_FIELD_NUMBER: _ClassVar[int]
    CLOSE_SESSION_FIELD_NUMBER: _ClassVar[int]
    sync_frames: SyncFrames
    respond: Respond
    close_session: _session_pb2.CloseSession
    def __init__(self, sync_frames: _Optional[_Union[SyncFrames, _Mapping]] = ..., respond: _Optional[_Union[Respond, _Mapping]] = ..., close_session: _Optional[_Union[_session_pb2.CloseSession, _Mapping]] = ...) -> None: ...

class ReactionPush(_message.Message):
    __slots__ = ("gateway_id", "commands", "features")
    GATEWAY_ID_FIELD_NUMBER: _ClassVar[int]
    COMMANDS_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    gateway_id: str
    commands: _containers.RepeatedCompositeFieldContainer[ReactionCommand]
    features: _tensor_pb2.Tensor
    def __init__(self, gateway_id: _Optional[str] = ..., commands: _Optional[_Iterable[_Union[ReactionCommand, _Mapping]]] = ..., features: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class ResponseStarted(_message.Message):
    __slots__ = ("session_id", "timestamp", "trigger", "query")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    TRIGGER_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    timestamp: float
    trigger: _live_stream_pb2.Trigger
    query: str
    def __init__(self, session_id: _Optional[str] = ..., timestamp: _Optional[float] = ..., trigger: _Optional[_Union[_live_stream_pb2.Trigger, str]] = ..., query: _Optional[str] = ...) -> None: ...

class ResponseDelta(_message.Message):
    __slots__ = ("session_id", "text", "num_tokens")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    text: str
    num_tokens: int
    def __init__(self, session_id: _Optional[str] = ..., text: _Optional[str] = ..., num_tokens: _Optional[int] = ...) -> None: ...

class ResponseDone(_message.Message):
    __slots__ = ("session_id", "text", "num_tokens", "finish_reason", "ttft_s", "duration_s", "token_ids")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    TTFT_S_FIELD_NUMBER: _ClassVar[int]
    DURATION_S_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    text: str
    num_tokens: int
    finish_reason: _live_stream_pb2.FinishReason
    ttft_s: float
    duration_s: float
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, session_id: _Optional[str] = ..., text: _Optional[str] = ..., num_tokens: _Optional[int] = ..., finish_reason: _Optional[_Union[_live_stream_pb2.FinishReason, str]] = ..., ttft_s: _Optional[float] = ..., duration_s: _Optional[float] = ..., token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class ResponseFailed(_message.Message):
    __slots__ = ("session_id", "message")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    message: str
    def __init__(self, session_id: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class ReactionEvent(_message.Message):
    __slots__ = ("response_started", "response_delta", "response_done", "response_failed")
    RESPONSE_STARTED_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_DELTA_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_DONE_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FAILED_FIELD_NUMBER: _ClassVar[int]
    response_started: ResponseStarted
    response_delta: ResponseDelta
    response_done: ResponseDone
    response_failed: ResponseFailed
    def __init__(self, response_started: _Optional[_Union[ResponseStarted, _Mapping]] = ..., response_delta: _Optional[_Union[ResponseDelta, _Mapping]] = ..., response_done: _Optional[_Union[ResponseDone, _Mapping]] = ..., response_failed: _Optional[_Union[ResponseFailed, _Mapping]] = ...) -> None: ...

class ReactionEvents(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[ReactionEvent]
    def __init__(self, events: _Optional[_Iterable[_Union[ReactionEvent, _Mapping]]] = ...) -> None: ...
