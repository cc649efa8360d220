from liveserve.api.v1 import live_stream_pb2 as _live_stream_pb2
from liveserve.internal.v2 import reaction_pb2 as _reaction_pb2
from liveserve.internal.v2 import session_pb2 as _session_pb2
from liveserve.internal.v2 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FrameFeatures(_message.Message):
    __slots__ = ("session_id", "epoch", "frame_id", "timestamp", "trace_context")
    class TraceContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    FRAME_ID_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    TRACE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    epoch: int
    frame_id: int
    timestamp: float
    trace_context: _containers.ScalarMap[str, str]
    def __init__(self, session_id: _Optional[str] = ..., epoch: _Optional[int] = ..., frame_id: _Optional[int] = ..., timestamp: _Optional[float] = ..., trace_context: _Optional[_Mapping[str, str]] = ...) -> None: ...

class QueryText(_message.Message):
    __slots__ = ("session_id", "epoch", "timestamp", "text", "trace_context")
    class TraceContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TRACE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    epoch: int
    timestamp: float
    text: str
    trace_context: _containers.ScalarMap[str, str]
    def __init__(self, session_id: _Optional[str] = ..., epoch: _Optional[int] = ..., timestamp: _Optional[float] = ..., text: _Optional[str] = ..., trace_context: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ReplyText(_message.Message):
    __slots__ = ("session_id", "epoch", "text", "token_ids")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    epoch: int
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, session_id: _Optional[str] = ..., epoch: _Optional[int] = ..., text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class DecisionCommand(_message.Message):
    __slots__ = ("frame_features", "query_text", "reply_text", "close_session")
    FRAME_FEATURES_FIELD_NUMBER: _ClassVar[int]
    QUERY_TEXT_FIELD_NUMBER: _ClassVar[int]
    REPLY_TEXT_FIELD_NUMBER: _ClassVar[int]
    CLOSE_SESSION_FIELD_NUMBER: _ClassVar[int]
    frame_features: FrameFeatures
    query_text: QueryText
    reply_text: ReplyText
    close_session: _session_pb2.CloseSession
    def __init__(self, frame_features: _Optional[_Union[FrameFeatures, _Mapping]] = ..., query_text: _Optional[_Union[QueryText, _Mapping]] = ..., reply_text: _Optional[_Union[ReplyText, _Mapping]] = ..., close_session: _Optional[_Union[_session_pb2.CloseSession, _Mapping]] = ...) -> None: ...

class DecisionPush(_message.Message):
    __slots__ = ("gateway_id", "commands", "features")
    GATEWAY_ID_FIELD_NUMBER: _ClassVar[int]
    COMMANDS_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    gateway_id: str
    commands: _containers.RepeatedCompositeFieldContainer[DecisionCommand]
    features: _tensor_pb2.Tensor
    def __init__(self, gateway_id: _Optional[str] = ..., commands: _Optional[_Iterable[_Union[DecisionCommand, _Mapping]]] = ..., features: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class Decision(_message.Message):
    __slots__ = ("session_id", "frame_id", "timestamp", "p_silent", "fired", "action", "trace_context")
    class TraceContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    FRAME_ID_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    P_SILENT_FIELD_NUMBER: _ClassVar[int]
    FIRED_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    TRACE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    frame_id: int
    timestamp: float
    p_silent: float
    fired: bool
    action: _live_stream_pb2.Action
    trace_context: _containers.ScalarMap[str, str]
    def __init__(self, session_id: _Optional[str] = ..., frame_id: _Optional[int] = ..., timestamp: _Optional[float] = ..., p_silent: _Optional[float] = ..., fired: _Optional[bool] = ..., action: _Optional[_Union[_live_stream_pb2.Action, str]] = ..., trace_context: _Optional[_Mapping[str, str]] = ...) -> None: ...

class FramesDropped(_message.Message):
    __slots__ = ("session_id", "frame_ids", "timestamps", "reason")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    FRAME_IDS_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMPS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    frame_ids: _containers.RepeatedScalarFieldContainer[int]
    timestamps: _containers.RepeatedScalarFieldContainer[float]
    reason: str
    def __init__(self, session_id: _Optional[str] = ..., frame_ids: _Optional[_Iterable[int]] = ..., timestamps: _Optional[_Iterable[float]] = ..., reason: _Optional[str] = ...) -> None: ...

class ReplyRequested(_message.Message):
    __slots__ = ("session_id", "trigger", "timestamp", "query", "frame_id", "trace_context")
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
    FRAME_ID_FIELD_NUMBER: _ClassVar[int]
    TRACE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    trigger: _live_stream_pb2.Trigger
    timestamp: float
    query: str
    frame_id: int
    trace_context: _containers.ScalarMap[str, str]
    def __init__(self, session_id: _Optional[str] = ..., trigger: _Optional[_Union[_live_stream_pb2.Trigger, str]] = ..., timestamp: _Optional[float] = ..., query: _Optional[str] = ..., frame_id: _Optional[int] = ..., trace_context: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Refused(_message.Message):
    __slots__ = ("session_id", "input", "frame_id", "message")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    FRAME_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    input: str
    frame_id: int
    message: str
    def __init__(self, session_id: _Optional[str] = ..., input: _Optional[str] = ..., frame_id: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class SessionClosed(_message.Message):
    __slots__ = ("session_id", "frames_decided", "frames_dropped", "responses", "frames_replayed", "code", "message")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    FRAMES_DECIDED_FIELD_NUMBER: _ClassVar[int]
    FRAMES_DROPPED_FIELD_NUMBER: _ClassVar[int]
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    FRAMES_REPLAYED_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    frames_decided: int
    frames_dropped: int
    responses: int
    frames_replayed: int
    code: int
    message: str
    def __init__(self, session_id: _Optional[str] = ..., frames_decided: _Optional[int] = ..., frames_dropped: _Optional[int] = ..., responses: _Optional[int] = ..., frames_replayed: _Optional[int] = ..., code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class DecisionEvent(_message.Message):
    __slots__ = ("decision", "frames_dropped", "reply_requested", "refused", "session_closed", "response_started", "response_delta", "response_done")
    DECISION_FIELD_NUMBER: _ClassVar[int]
    FRAMES_DROPPED_FIELD_NUMBER: _ClassVar[int]
    REPLY_REQUESTED_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    SESSION_CLOSED_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_STARTED_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_DELTA_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_DONE_FIELD_NUMBER: _ClassVar[int]
    decision: Decision
    frames_dropped: FramesDropped
    reply_requested: ReplyRequested
    refused: Refused
    session_closed: SessionClosed
    response_started: _reaction_pb2.ResponseStarted
    response_delta: _reaction_pb2.ResponseDelta
    response_done: _reaction_pb2.ResponseDone
    def __init__(self, decision: _Optional[_Union[Decision, _Mapping]] = ..., frames_dropped: _Optional[_Union[FramesDropped, _Mapping]] = ..., reply_requested: _Optional[_Union[ReplyRequested, _Mapping]] = ..., refused: _Optional[_Union[Refused, _Mapping]] = ..., session_closed: _Optional[_Union[SessionClosed, _Mapping]] = ..., response_started: _Optional[_Union[_reaction_pb2.ResponseStarted, _Mapping]] = ..., response_delta: _Optional[_Union[_reaction_pb2.ResponseDelta, _Mapping]] = ..., response_done: _Optional[_Union[_reaction_pb2.ResponseDone, _Mapping]] = ...) -> None: ...

class DecisionEvents(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[DecisionEvent]
    def __init__(self, events: _Optional[_Iterable[_Union[DecisionEvent, _Mapping]]] = ...) -> None: ...
