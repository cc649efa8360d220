from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Action(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACTION_UNSPECIFIED: _ClassVar[Action]
    ACTION_SILENT: _ClassVar[Action]
    ACTION_RESPOND: _ClassVar[Action]
    ACTION_QUERY: _ClassVar[Action]
    ACTION_SUPPRESSED: _ClassVar[Action]

class Trigger(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRIGGER_UNSPECIFIED: _ClassVar[Trigger]
    TRIGGER_PROACTIVE: _ClassVar[Trigger]
    TRIGGER_QUERY: _ClassVar[Trigger]
    TRIGGER_COMMENTARY: _ClassVar[Trigger]

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_EOS: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]

class WarningCode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WARNING_CODE_UNSPECIFIED: _ClassVar[WarningCode]
    WARNING_CODE_FRAME_DROPPED: _ClassVar[WarningCode]
    WARNING_CODE_BAD_FRAME: _ClassVar[WarningCode]
    WARNING_CODE_BAD_QUERY: _ClassVar[WarningCode]
    WARNING_CODE_LAGGING: _ClassVar[WarningCode]
    WARNING_CODE_SESSION_RECOVERED: _ClassVar[WarningCode]

class Role(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROLE_UNSPECIFIED: _ClassVar[Role]
    ROLE_USER: _ClassVar[Role]
    ROLE_ASSISTANT: _ClassVar[Role]
ACTION_UNSPECIFIED: Action
ACTION_SILENT: Action
ACTION_RESPOND: Action
ACTION_QUERY: Action
ACTION_SUPPRESSED: Action
TRIGGER_UNSPECIFIED: Trigger
TRIGGER_PROACTIVE: Trigger
TRIGGER_QUERY: Trigger
TRIGGER_COMMENTARY: Trigger
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_EOS: FinishReason
FINISH_REASON_LENGTH: FinishReason
WARNING_CODE_UNSPECIFIED: WarningCode
WARNING_CODE_FRAME_DROPPED: WarningCode
WARNING_CODE_BAD_FRAME: WarningCode
WARNING_CODE_BAD_QUERY: WarningCode
WARNING_CODE_LAGGING: WarningCode
WARNING_CODE_SESSION_RECOVERED: WarningCode
ROLE_UNSPECIFIED: Role
ROLE_USER: Role
ROLE_ASSISTANT: Role

class ClientMessage(_message.Message):
    __slots__ = ("open", "frame", "query", "close")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    open: Open
    frame: Frame
    query: Query
    close: Close
    def __init__(self, open: _Optional[_Union[Open, _Mapping]] = ..., frame: _Optional[_Union[Frame, _Mapping]] = ..., query: _Optional[_Union[Query, _Mapping]] = ..., close: _Optional[_Union[Close, _Mapping]] = ...) -> None: ...

class Open(_message.Message):
    __slots__ = ("model", "threshold", "fps", "cache", "max_new_tokens", "system_prompt", "credentials", "client_session_id", "decisions_only", "resume_session_id", "resume_token", "mode", "commentary")
    class CredentialsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SYSTEM_PROMPT_FIELD_NUMBER: _ClassVar[int]
    CREDENTIALS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    DECISIONS_ONLY_FIELD_NUMBER: _ClassVar[int]
    RESUME_SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    RESUME_TOKEN_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    COMMENTARY_FIELD_NUMBER: _ClassVar[int]
    model: str
    threshold: float
    fps: float
    cache: CacheOptions
    max_new_tokens: int
    system_prompt: str
    credentials: _containers.ScalarMap[str, str]
    client_session_id: str
    decisions_only: bool
    resume_session_id: str
    resume_token: str
    mode: str
    commentary: CommentaryOptions
    def __init__(self, model: _Optional[str] = ..., threshold: _Optional[float] = ..., fps: _Optional[float] = ..., cache: _Optional[_Union[CacheOptions, _Mapping]] = ..., max_new_tokens: _Optional[int] = ..., system_prompt: _Optional[str] = ..., credentials: _Optional[_Mapping[str, str]] = ..., client_session_id: _Optional[str] = ..., decisions_only: _Optional[bool] = ..., resume_session_id: _Optional[str] = ..., resume_token: _Optional[str] = ..., mode: _Optional[str] = ..., commentary: _Optional[_Union[CommentaryOptions, _Mapping]] = ...) -> None: ...

class CommentaryOptions(_message.Message):
    __slots__ = ("chunk_s", "max_tokens_per_chunk", "query", "decoding", "temperature", "top_p", "repetition_penalty", "seed", "resize")
    CHUNK_S_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_PER_CHUNK_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    DECODING_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    RESIZE_FIELD_NUMBER: _ClassVar[int]
    chunk_s: float
    max_tokens_per_chunk: int
    query: str
    decoding: str
    temperature: float
    top_p: float
    repetition_penalty: float
    seed: int
    resize: str
    def __init__(self, chunk_s: _Optional[float] = ..., max_tokens_per_chunk: _Optional[int] = ..., query: _Optional[str] = ..., decoding: _Optional[str] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., repetition_penalty: _Optional[float] = ..., seed: _Optional[int] = ..., resize: _Optional[str] = ...) -> None: ...

class CacheOptions(_message.Message):
    __slots__ = ("policy", "window_frames", "text_window_tokens")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FRAMES_FIELD_NUMBER: _ClassVar[int]
    TEXT_WINDOW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    policy: str
    window_frames: int
    text_window_tokens: int
    def __init__(self, policy: _Optional[str] = ..., window_frames: _Optional[int] = ..., text_window_tokens: _Optional[int] = ...) -> None: ...

class Frame(_message.Message):
    __slots__ = ("timestamp", "image")
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    timestamp: float
    image: bytes
    def __init__(self, timestamp: _Optional[float] = ..., image: _Optional[bytes] = ...) -> None: ...

class Query(_message.Message):
    __slots__ = ("timestamp", "text")
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    timestamp: float
    text: str
    def __init__(self, timestamp: _Optional[float] = ..., text: _Optional[str] = ...) -> None: ...

class Close(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServerMessage(_message.Message):
    __slots__ = ("opened", "decision", "response_started", "response_delta", "response_done", "warning", "error", "closed")
    OPENED_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_STARTED_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_DELTA_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_DONE_FIELD_NUMBER: _ClassVar[int]
    WARNING_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CLOSED_FIELD_NUMBER: _ClassVar[int]
    opened: SessionOpened
    decision: Decision
    response_started: ResponseStarted
    response_delta: ResponseDelta
    response_done: ResponseDone
    warning: Warning
    error: Error
    closed: SessionClosed
    def __init__(self, opened: _Optional[_Union[SessionOpened, _Mapping]] = ..., decision: _Optional[_Union[Decision, _Mapping]] = ..., response_started: _Optional[_Union[ResponseStarted, _Mapping]] = ..., response_delta: _Optional[_Union[ResponseDelta, _Mapping]] = ..., response_done: _Optional[_Union[ResponseDone, _Mapping]] = ..., warning: _Optional[_Union[Warning, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., closed: _Optional[_Union[SessionClosed, _Mapping]] = ...) -> None: ...

class SessionOpened(_message.Message):
    __slots__ = ("session_id", "client_session_id", "limits", "resume_token", "next_frame_index")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    RESUME_TOKEN_FIELD_NUMBER: _ClassVar[int]
    NEXT_FRAME_INDEX_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    client_session_id: str
    limits: Limits
    resume_token: str
    next_frame_index: int
    def __init__(self, session_id: _Optional[str] = ..., client_session_id: _Optional[str] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., resume_token: _Optional[str] = ..., next_frame_index: _Optional[int] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_frame_bytes", "max_query_tokens", "max_new_tokens", "max_lag_s", "tokens_per_frame")
    MAX_FRAME_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_QUERY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_LAG_S_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_FRAME_FIELD_NUMBER: _ClassVar[int]
    max_frame_bytes: int
    max_query_tokens: int
    max_new_tokens: int
    max_lag_s: float
    tokens_per_frame: int
    def __init__(self, max_frame_bytes: _Optional[int] = ..., max_query_tokens: _Optional[int] = ..., max_new_tokens: _Optional[int] = ..., max_lag_s: _Optional[float] = ..., tokens_per_frame: _Optional[int] = ...) -> None: ...

class Decision(_message.Message):
    __slots__ = ("timestamp", "frame_index", "p_silent", "fired", "action", "lag_s")
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    FRAME_INDEX_FIELD_NUMBER: _ClassVar[int]
    P_SILENT_FIELD_NUMBER: _ClassVar[int]
    FIRED_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    LAG_S_FIELD_NUMBER: _ClassVar[int]
    timestamp: float
    frame_index: int
    p_silent: float
    fired: bool
    action: Action
    lag_s: float
    def __init__(self, timestamp: _Optional[float] = ..., frame_index: _Optional[int] = ..., p_silent: _Optional[float] = ..., fired: _Optional[bool] = ..., action: _Optional[_Union[Action, str]] = ..., lag_s: _Optional[float] = ...) -> None: ...

class ResponseStarted(_message.Message):
    __slots__ = ("timestamp", "trigger", "query")
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    TRIGGER_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    timestamp: float
    trigger: Trigger
    query: str
    def __init__(self, timestamp: _Optional[float] = ..., trigger: _Optional[_Union[Trigger, str]] = ..., query: _Optional[str] = ...) -> None: ...

class ResponseDelta(_message.Message):
    __slots__ = ("timestamp", "text", "token_times")
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_TIMES_FIELD_NUMBER: _ClassVar[int]
    timestamp: float
    text: str
    token_times: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, timestamp: _Optional[float] = ..., text: _Optional[str] = ..., token_times: _Optional[_Iterable[float]] = ...) -> None: ...

class ResponseDone(_message.Message):
    __slots__ = ("timestamp", "trigger", "text", "num_tokens", "finish_reason", "ttft_s", "duration_s")
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    TRIGGER_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    TTFT_S_FIELD_NUMBER: _ClassVar[int]
    DURATION_S_FIELD_NUMBER: _ClassVar[int]
    timestamp: float
    trigger: Trigger
    text: str
    num_tokens: int
    finish_reason: FinishReason
    ttft_s: float
    duration_s: float
    def __init__(self, timestamp: _Optional[float] = ..., trigger: _Optional[_Union[Trigger, str]] = ..., text: _Optional[str] = ..., num_tokens: _Optional[int] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., ttft_s: _Optional[float] = ..., duration_s: _Optional[float] = ...) -> None: ...

class Warning(_message.Message):
    __slots__ = ("code", "message", "timestamps", "frame_indexes")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMPS_FIELD_NUMBER: _ClassVar[int]
    FRAME_INDEXES_FIELD_NUMBER: _ClassVar[int]
    code: WarningCode
    message: str
    timestamps: _containers.RepeatedScalarFieldContainer[float]
    frame_indexes: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, code: _Optional[_Union[WarningCode, str]] = ..., message: _Optional[str] = ..., timestamps: _Optional[_Iterable[float]] = ..., frame_indexes: _Optional[_Iterable[int]] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class SessionClosed(_message.Message):
    __slots__ = ("frames_decided", "frames_dropped", "responses")
    FRAMES_DECIDED_FIELD_NUMBER: _ClassVar[int]
    FRAMES_DROPPED_FIELD_NUMBER: _ClassVar[int]
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    frames_decided: int
    frames_dropped: int
    responses: int
    def __init__(self, frames_decided: _Optional[int] = ..., frames_dropped: _Optional[int] = ..., responses: _Optional[int] = ...) -> None: ...

class GetTranscriptRequest(_message.Message):
    __slots__ = ("session_id", "credentials")
    class CredentialsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CREDENTIALS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    credentials: _containers.ScalarMap[str, str]
    def __init__(self, session_id: _Optional[str] = ..., credentials: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Turn(_message.Message):
    __slots__ = ("timestamp", "role", "text")
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    timestamp: float
    role: Role
    text: str
    def __init__(self, timestamp: _Optional[float] = ..., role: _Optional[_Union[Role, str]] = ..., text: _Optional[str] = ...) -> None: ...

class Transcript(_message.Message):
    __slots__ = ("session_id", "state", "created", "last_timestamp", "threshold", "max_new_tokens", "cache_policy", "window_frames", "turns")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    LAST_TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHE_POLICY_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FRAMES_FIELD_NUMBER: _ClassVar[int]
    TURNS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    state: str
    created: float
    last_timestamp: float
    threshold: float
    max_new_tokens: int
    cache_policy: str
    window_frames: int
    turns: _containers.RepeatedCompositeFieldContainer[Turn]
    def __init__(self, session_id: _Optional[str] = ..., state: _Optional[str] = ..., created: _Optional[float] = ..., last_timestamp: _Optional[float] = ..., threshold: _Optional[float] = ..., max_new_tokens: _Optional[int] = ..., cache_policy: _Optional[str] = ..., window_frames: _Optional[int] = ..., turns: _Optional[_Iterable[_Union[Turn, _Mapping]]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ("credentials",)
    class CredentialsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CREDENTIALS_FIELD_NUMBER: _ClassVar[int]
    credentials: _containers.ScalarMap[str, str]
    def __init__(self, credentials: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "is_default", "family", "threshold", "max_new_tokens", "cache_policy", "window_frames", "mode")
    NAME_FIELD_NUMBER: _ClassVar[int]
    IS_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHE_POLICY_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FRAMES_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    name: str
    is_default: bool
    family: str
    threshold: float
    max_new_tokens: int
    cache_policy: str
    window_frames: int
    mode: str
    def __init__(self, name: _Optional[str] = ..., is_default: _Optional[bool] = ..., family: _Optional[str] = ..., threshold: _Optional[float] = ..., max_new_tokens: _Optional[int] = ..., cache_policy: _Optional[str] = ..., window_frames: _Optional[int] = ..., mode: _Optional[str] = ...) -> None: ...

class ModelList(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...
