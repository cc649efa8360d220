"""Conversions between the public protobuf messages and the engine's dataclasses."""

from __future__ import annotations

import time

import grpc

from liveserve.api.v1 import live_stream_pb2 as pb
from liveserve.config import CacheConfig, SessionConfig
from liveserve.engine.events import (Event, FrameDecision, FramesDropped, ResponseDelta, ResponseDone, ResponseStarted,
                                     SessionFailed)

_ACTIONS = {"silent": pb.ACTION_SILENT, "respond": pb.ACTION_RESPOND, "query": pb.ACTION_QUERY}
TRIGGERS = {"proactive": pb.TRIGGER_PROACTIVE, "query": pb.TRIGGER_QUERY}
_FINISH = {"eos": pb.FINISH_REASON_EOS, "length": pb.FINISH_REASON_LENGTH}
FAILURE_STATUS = {"cache_full": grpc.StatusCode.RESOURCE_EXHAUSTED, "internal": grpc.StatusCode.INTERNAL}


def session_config(open_: pb.Open, defaults: SessionConfig) -> SessionConfig:
    """The session's settings: the client's choices over the server's defaults. Raises ValueError with a
    specific message for out-of-range values (SessionConfig validates every field)."""
    cache = defaults.cache
    options = open_.cache
    cache = CacheConfig(policy=options.policy or cache.policy, positions=cache.positions,
                        window_frames=options.window_frames or cache.window_frames,
                        text_window_tokens=options.text_window_tokens or cache.text_window_tokens,
                        evict_frames=min(cache.evict_frames, options.window_frames or cache.window_frames))
    return SessionConfig(
        threshold=open_.threshold if open_.HasField("threshold") else defaults.threshold,
        max_new_tokens=open_.max_new_tokens or defaults.max_new_tokens,
        temperature=defaults.temperature, top_p=defaults.top_p, seed=defaults.seed,
        system_prompt=open_.system_prompt or defaults.system_prompt,
        max_query_tokens=defaults.max_query_tokens, cache=cache,
        replies="none" if open_.decisions_only else defaults.replies)


def to_message(event: Event) -> pb.ServerMessage:
    if isinstance(event, FrameDecision):
        return pb.ServerMessage(decision=pb.Decision(
            timestamp=event.timestamp, frame_index=event.frame_index, p_silent=event.p_silent, fired=event.fired,
            action=_ACTIONS[event.action], lag_s=event.lag_s))
    if isinstance(event, ResponseStarted):
        return pb.ServerMessage(response_started=pb.ResponseStarted(
            timestamp=event.timestamp, trigger=TRIGGERS[event.trigger], query=event.query or ""))
    if isinstance(event, ResponseDelta):
        now = time.time()
        return pb.ServerMessage(response_delta=pb.ResponseDelta(
            timestamp=event.timestamp, text=event.text, token_times=[now] * len(event.token_ids)))
    if isinstance(event, ResponseDone):
        return pb.ServerMessage(response_done=pb.ResponseDone(
            timestamp=event.timestamp, trigger=TRIGGERS[event.trigger], text=event.text, num_tokens=event.num_tokens,
            finish_reason=_FINISH[event.finish_reason], ttft_s=event.ttft_s, duration_s=event.duration_s))
    if isinstance(event, FramesDropped):
        return warning(pb.WARNING_CODE_FRAME_DROPPED, event.reason, event.timestamps)
    if isinstance(event, SessionFailed):
        return pb.ServerMessage(error=pb.Error(code=FAILURE_STATUS[event.code].value[0], message=event.message))
    raise TypeError(f"no message for {type(event).__name__}")


def warning(code: int, message: str, timestamps=()) -> pb.ServerMessage:
    return pb.ServerMessage(warning=pb.Warning(code=code, message=message, timestamps=list(timestamps)))


_ACTION_NAMES = {v: k for k, v in _ACTIONS.items()}
_TRIGGER_NAMES = {v: k for k, v in TRIGGERS.items()}
_FINISH_NAMES = {v: k for k, v in _FINISH.items()}


def from_message(message: pb.ServerMessage) -> Event | None:
    """The engine event a server message carries (clients reuse the engine's printers); None for
    messages that are not events (opened, warnings, errors, closed)."""
    kind = message.WhichOneof("kind")
    if kind == "decision":
        d = message.decision
        return FrameDecision(d.timestamp, d.frame_index, d.p_silent, d.fired, _ACTION_NAMES.get(d.action, "silent"),
                             -1, d.lag_s, 0)
    if kind == "response_started":
        r = message.response_started
        return ResponseStarted(r.timestamp, _TRIGGER_NAMES.get(r.trigger, "proactive"), r.query or None)
    if kind == "response_delta":
        r = message.response_delta
        return ResponseDelta(r.timestamp, r.text, ())
    if kind == "response_done":
        r = message.response_done
        return ResponseDone(r.timestamp, _TRIGGER_NAMES.get(r.trigger, "proactive"), None, r.text, r.num_tokens,
                            _FINISH_NAMES.get(r.finish_reason, "eos"), r.ttft_s, r.duration_s)
    return None
