from liveserve.api.v1 import live_stream_pb2 as _live_stream_pb2
from liveserve.internal.v2 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SessionSettings(_message.Message):
    __slots__ = ("threshold", "max_new_tokens", "temperature", "top_p", "seed", "system_prompt", "max_query_tokens", "cache_policy", "positions", "window_frames", "text_window_tokens", "evict_frames", "decisions_only", "mode", "chunk_s", "fps", "max_tokens_per_chunk", "commentary_query", "repetition_penalty", "vision_window_chunks", "text_rounds", "text_sink_tokens", "commentary_text_window_tokens", "commentary_positions", "previous_text", "commentary_max_query_tokens", "resize", "min_pixels", "max_pixels")
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    SYSTEM_PROMPT_FIELD_NUMBER: _ClassVar[int]
    MAX_QUERY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHE_POLICY_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FRAMES_FIELD_NUMBER: _ClassVar[int]
    TEXT_WINDOW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    EVICT_FRAMES_FIELD_NUMBER: _ClassVar[int]
    DECISIONS_ONLY_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_S_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_PER_CHUNK_FIELD_NUMBER: _ClassVar[int]
    COMMENTARY_QUERY_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    VISION_WINDOW_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    TEXT_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_SINK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMMENTARY_TEXT_WINDOW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMMENTARY_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_TEXT_FIELD_NUMBER: _ClassVar[int]
    COMMENTARY_MAX_QUERY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RESIZE_FIELD_NUMBER: _ClassVar[int]
    MIN_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MAX_PIXELS_FIELD_NUMBER: _ClassVar[int]
    threshold: float
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int
    system_prompt: str
    max_query_tokens: int
    cache_policy: str
    positions: str
    window_frames: int
    text_window_tokens: int
    evict_frames: int
    decisions_only: bool
    mode: str
    chunk_s: float
    fps: float
    max_tokens_per_chunk: int
    commentary_query: str
    repetition_penalty: float
    vision_window_chunks: int
    text_rounds: int
    text_sink_tokens: int
    commentary_text_window_tokens: int
    commentary_positions: str
    previous_text: str
    commentary_max_query_tokens: int
    resize: str
    min_pixels: int
    max_pixels: int
    def __init__(self, threshold: _Optional[float] = ..., max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., system_prompt: _Optional[str] = ..., max_query_tokens: _Optional[int] = ..., cache_policy: _Optional[str] = ..., positions: _Optional[str] = ..., window_frames: _Optional[int] = ..., text_window_tokens: _Optional[int] = ..., evict_frames: _Optional[int] = ..., decisions_only: _Optional[bool] = ..., mode: _Optional[str] = ..., chunk_s: _Optional[float] = ..., fps: _Optional[float] = ..., max_tokens_per_chunk: _Optional[int] = ..., commentary_query: _Optional[str] = ..., repetition_penalty: _Optional[float] = ..., vision_window_chunks: _Optional[int] = ..., text_rounds: _Optional[int] = ..., text_sink_tokens: _Optional[int] = ..., commentary_text_window_tokens: _Optional[int] = ..., commentary_positions: _Optional[str] = ..., previous_text: _Optional[str] = ..., commentary_max_query_tokens: _Optional[int] = ..., resize: _Optional[str] = ..., min_pixels: _Optional[int] = ..., max_pixels: _Optional[int] = ...) -> None: ...

class OpenRequest(_message.Message):
    __slots__ = ("session_id", "gateway_id", "settings", "restore")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_ID_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    RESTORE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    gateway_id: str
    settings: SessionSettings
    restore: Restore
    def __init__(self, session_id: _Optional[str] = ..., gateway_id: _Optional[str] = ..., settings: _Optional[_Union[SessionSettings, _Mapping]] = ..., restore: _Optional[_Union[Restore, _Mapping]] = ...) -> None: ...

class Restore(_message.Message):
    __slots__ = ("frame_ids", "timestamps", "features", "awaiting_reply", "awaited_timestamp", "awaited_query")
    FRAME_IDS_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMPS_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    AWAITING_REPLY_FIELD_NUMBER: _ClassVar[int]
    AWAITED_TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    AWAITED_QUERY_FIELD_NUMBER: _ClassVar[int]
    frame_ids: _containers.RepeatedScalarFieldContainer[int]
    timestamps: _containers.RepeatedScalarFieldContainer[float]
    features: _tensor_pb2.Tensor
    awaiting_reply: bool
    awaited_timestamp: float
    awaited_query: str
    def __init__(self, frame_ids: _Optional[_Iterable[int]] = ..., timestamps: _Optional[_Iterable[float]] = ..., features: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., awaiting_reply: _Optional[bool] = ..., awaited_timestamp: _Optional[float] = ..., awaited_query: _Optional[str] = ...) -> None: ...

class OpenResponse(_message.Message):
    __slots__ = ("replica_id", "epoch", "limits", "restored_turns")
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    RESTORED_TURNS_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    epoch: int
    limits: _live_stream_pb2.Limits
    restored_turns: int
    def __init__(self, replica_id: _Optional[str] = ..., epoch: _Optional[int] = ..., limits: _Optional[_Union[_live_stream_pb2.Limits, _Mapping]] = ..., restored_turns: _Optional[int] = ...) -> None: ...

class EventsRequest(_message.Message):
    __slots__ = ("gateway_id",)
    GATEWAY_ID_FIELD_NUMBER: _ClassVar[int]
    gateway_id: str
    def __init__(self, gateway_id: _Optional[str] = ...) -> None: ...

class PushAck(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CloseSession(_message.Message):
    __slots__ = ("session_id", "epoch", "drain")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    DRAIN_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    epoch: int
    drain: bool
    def __init__(self, session_id: _Optional[str] = ..., epoch: _Optional[int] = ..., drain: _Optional[bool] = ...) -> None: ...
