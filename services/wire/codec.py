"""The seams' dataclasses (contracts.py) <-> the internal protobuf contracts (liveserve.internal.v2).

Only the Ray transport uses this: in one process the dataclasses are handed over as they are. An internal
message has the name and the fields of its dataclass, and a oneof case is its message's name in
snake_case, so most conversions are derived from the dataclass's fields (`_fill`, `_read`); a test checks
that every such pair still mirrors. Written by hand: what is shaped differently on the wire (a session's
settings, its placement, a Restore, SyncFrames, EncodeResult) and the packing of frame features, which
travel outside their messages as one tensor per push in the model's dtype (tensors.pack).
"""

from __future__ import annotations

import dataclasses
import re
import typing
from functools import cache

from liveserve.api.v1 import live_stream_pb2 as pb
from liveserve.config import CacheConfig, CommentaryConfig, SessionConfig
from liveserve.engine.inputs import AwaitedReply
from liveserve.internal.v2 import decision_pb2 as dpb
from liveserve.internal.v2 import perception_pb2 as ppb
from liveserve.internal.v2 import reaction_pb2 as rpb
from liveserve.internal.v2 import session_pb2 as spb
from liveserve.services.wire import contracts as c
from liveserve.services.wire import tensors

ACTIONS = {c.Action.SILENT: pb.ACTION_SILENT, c.Action.RESPOND: pb.ACTION_RESPOND, c.Action.QUERY: pb.ACTION_QUERY,
           c.Action.SUPPRESSED: pb.ACTION_SUPPRESSED}
TRIGGERS = {c.Trigger.PROACTIVE: pb.TRIGGER_PROACTIVE, c.Trigger.QUERY: pb.TRIGGER_QUERY,
            c.Trigger.COMMENTARY: pb.TRIGGER_COMMENTARY}
FINISH = {"eos": pb.FINISH_REASON_EOS, "length": pb.FINISH_REASON_LENGTH}


def _trace(carrier) -> c.Trace:
    return tuple(sorted(carrier.items()))


# ---- messages converted by their dataclass's fields -------------------------------------------------------

# Fields whose wire form differs from the dataclass's, by name: enums travel as the public API's enums.
_ENUMS = {"action": (ACTIONS, {v: k for k, v in ACTIONS.items()}),
          "trigger": (TRIGGERS, {v: k for k, v in TRIGGERS.items()}),
          "finish_reason": (FINISH, {v: k for k, v in FINISH.items()})}
TRACE_FIELD = "trace_context"  # a dataclass's `trace`, as a map
PACKED = "features"  # frame features: the push's next row of its one tensor, never in the message
# The oneofs of the internal protos and the contract unions they carry, a case per class.
ONEOFS = {dpb.DecisionCommand: c.DecisionCommand, dpb.DecisionEvent: c.DecisionEvent,
          rpb.ReactionCommand: c.ReactionCommand, rpb.ReactionEvent: c.ReactionEvent}
BY_HAND = {c.SyncFrames}  # oneof cases shaped differently on the wire (its frames: parallel lists + rows)


@cache
def case_name(cls: type) -> str:
    """The oneof case carrying `cls`: its name in snake_case (ResponseStarted -> response_started)."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", cls.__name__).lower()


def _cases(union) -> dict[str, type]:
    return {case_name(cls): cls for cls in typing.get_args(union)}


_DECISION_COMMANDS, _DECISION_EVENTS = _cases(c.DecisionCommand), _cases(c.DecisionEvent)
_REACTION_COMMANDS, _REACTION_EVENTS = _cases(c.ReactionCommand), _cases(c.ReactionEvent)


_PLAIN, _TRACE, _ENUM, _REPEATED = range(4)


@cache
def _plan(cls: type, message_type) -> tuple[tuple[str, int, dict, dict], ...]:
    """How each of `cls`'s fields travels in `message_type` (worked out once per pair: this is per event)."""
    described = message_type.DESCRIPTOR.fields_by_name
    plan = []
    for field in dataclasses.fields(cls):
        name = field.name
        if name == PACKED:
            continue
        if name == "trace":
            plan.append((name, _TRACE, {}, {}))
        elif name in _ENUMS:
            plan.append((name, _ENUM, *_ENUMS[name]))
        else:
            plan.append((name, _REPEATED if described[name].is_repeated else _PLAIN, {}, {}))
    return tuple(plan)


def _fill(message, value) -> None:
    """Write `value`'s fields into `message`, its internal message (present even when all are defaults)."""
    wire = {}
    for name, how, to_wire, _ in _plan(type(value), type(message)):
        item = getattr(value, name)
        if how == _TRACE:
            wire[TRACE_FIELD] = dict(item)
        elif how == _ENUM:
            wire[name] = to_wire[item]
        else:
            wire[name] = item
    message.CopyFrom(type(message)(**wire))  # built in one call: faster than setting field by field


def _read(cls: type, message, **given):
    """The `cls` that `message` carries; `given`: what travels outside it (its features)."""
    values = dict(given)
    for name, how, _, from_wire in _plan(cls, type(message)):
        item = getattr(message, name if how != _TRACE else TRACE_FIELD)
        if how == _PLAIN:
            values[name] = item
        elif how == _REPEATED:
            values[name] = tuple(item)
        elif how == _ENUM:
            values[name] = from_wire[item]
        else:
            values[name] = _trace(item)
    return cls(**values)


def _put(entry, value) -> None:
    """`value` as its case of the oneof `entry`."""
    _fill(getattr(entry, case_name(type(value))), value)


# ---- sessions --------------------------------------------------------------------------------------------

# CommentaryConfig's field -> its SessionSettings field (every field: test_codec checks). Those after the
# first four are optional on the wire: a gateway from before them sends none, and the replica's default holds
# (a None, the model's own pixel bounds, is sent as no value).
_COMMENTARY_WIRE = {"chunk_s": "chunk_s", "fps": "fps", "max_tokens_per_chunk": "max_tokens_per_chunk",
                    "query": "commentary_query", "repetition_penalty": "repetition_penalty",
                    "vision_window_chunks": "vision_window_chunks", "text_rounds": "text_rounds",
                    "text_sink_tokens": "text_sink_tokens", "text_window_tokens": "commentary_text_window_tokens",
                    "positions": "commentary_positions", "previous_text": "previous_text",
                    "max_query_tokens": "commentary_max_query_tokens", "resize": "resize",
                    "min_pixels": "min_pixels", "max_pixels": "max_pixels"}
_COMMENTARY_ALWAYS = ("chunk_s", "fps", "max_tokens_per_chunk", "commentary_query")


def settings_to_proto(config: SessionConfig) -> spb.SessionSettings:
    cache = config.cache
    return spb.SessionSettings(
        threshold=config.threshold, max_new_tokens=config.max_new_tokens, temperature=config.temperature,
        top_p=config.top_p, seed=config.seed, system_prompt=config.system_prompt or "",
        max_query_tokens=config.max_query_tokens, cache_policy=cache.policy, positions=cache.positions,
        window_frames=cache.window_frames, text_window_tokens=cache.text_window_tokens,
        evict_frames=cache.evict_frames, decisions_only=config.replies == "none", mode=config.mode,
        **{wire: value for name, wire in _COMMENTARY_WIRE.items()
           if (value := getattr(config.commentary, name)) is not None})


def settings_from_proto(message: spb.SessionSettings) -> SessionConfig:
    """Validated again here (SessionConfig checks every field): a replica trusts no caller blindly."""
    cache = CacheConfig(policy=message.cache_policy, positions=message.positions, window_frames=message.window_frames,
                        text_window_tokens=message.text_window_tokens, evict_frames=message.evict_frames)
    commentary = CommentaryConfig(**{name: getattr(message, wire) for name, wire in _COMMENTARY_WIRE.items()
                                     if wire in _COMMENTARY_ALWAYS or message.HasField(wire)})
    return SessionConfig(threshold=message.threshold, max_new_tokens=message.max_new_tokens,
                         temperature=message.temperature, top_p=message.top_p, seed=message.seed,
                         system_prompt=message.system_prompt or None, max_query_tokens=message.max_query_tokens,
                         cache=cache, replies="none" if message.decisions_only else "inline", mode=message.mode,
                         commentary=commentary)


def open_to_proto(request: c.OpenSession) -> spb.OpenRequest:
    message = spb.OpenRequest(session_id=request.session_id, gateway_id=request.gateway_id,
                              settings=settings_to_proto(request.config))
    if (restore := request.restore) is not None:
        message.restore.frame_ids.extend(frame.frame_id for frame in restore.frames)
        message.restore.timestamps.extend(frame.timestamp for frame in restore.frames)
        if restore.frames:
            message.restore.features.CopyFrom(tensors.pack([frame.features for frame in restore.frames]))
        if restore.awaited is not None:
            message.restore.awaiting_reply = True
            message.restore.awaited_timestamp = restore.awaited.timestamp
            message.restore.awaited_query = restore.awaited.query or ""
    return message


def open_from_proto(message: spb.OpenRequest) -> c.OpenSession:
    restore = None
    if message.HasField("restore"):
        r = message.restore
        if len(r.frame_ids) != len(r.timestamps):
            raise ValueError("a restore's frame_ids and timestamps differ in length")
        rows = tensors.unpack(r.features, len(r.frame_ids)) if r.frame_ids else []
        frames = tuple(c.FrameFeatures(message.session_id, 0, frame_id, timestamp, row)
                       for frame_id, timestamp, row in zip(r.frame_ids, r.timestamps, rows))
        awaited = AwaitedReply(r.awaited_timestamp, r.awaited_query or None) if r.awaiting_reply else None
        restore = c.Restore(frames, awaited)
    return c.OpenSession(message.session_id, message.gateway_id, settings_from_proto(message.settings), restore)


def limits_to_proto(limits: c.Limits) -> pb.Limits:
    message = pb.Limits()
    _fill(message, limits)
    return message


def placed_to_proto(placed: c.SessionPlaced) -> spb.OpenResponse:
    return spb.OpenResponse(replica_id=placed.replica, epoch=placed.epoch, limits=limits_to_proto(placed.limits),
                            restored_turns=placed.restored_turns)


def placed_from_proto(session_id: str, message: spb.OpenResponse) -> c.SessionPlaced:
    return c.SessionPlaced(session_id, message.replica_id, message.epoch, _read(c.Limits, message.limits),
                           message.restored_turns)


# ---- Perception --------------------------------------------------------------------------------------------

def encode_request_to_proto(request: c.EncodeRequest) -> ppb.EncodeRequest:
    message = ppb.EncodeRequest()
    for frame in request.frames:
        _fill(message.frames.add(), frame)
    return message


def encode_request_from_proto(message: ppb.EncodeRequest) -> c.EncodeRequest:
    return c.EncodeRequest(tuple(_read(c.FrameImage, frame) for frame in message.frames))


def encode_result_to_proto(result: c.EncodeResult) -> ppb.EncodeResponse:
    message = ppb.EncodeResponse(errors=list(result.errors), encode_s=result.encode_s)
    packed = tensors.pack([row for row in result.features if row is not None])
    if packed is not None:
        message.features.CopyFrom(packed)
    return message


def encode_result_from_proto(message: ppb.EncodeResponse) -> c.EncodeResult:
    rows = iter(tensors.unpack(message.features, sum(1 for error in message.errors if not error)))
    return c.EncodeResult(tuple(None if error else next(rows) for error in message.errors), tuple(message.errors),
                          message.encode_s)


# ---- pushes: commands in order, their frames' features in one tensor ---------------------------------------

def decision_push_to_proto(push: c.DecisionPush) -> dpb.DecisionPush:
    return _push_to_proto(dpb.DecisionPush(gateway_id=push.gateway_id), push.commands)


def reaction_push_to_proto(push: c.ReactionPush) -> rpb.ReactionPush:
    return _push_to_proto(rpb.ReactionPush(gateway_id=push.gateway_id), push.commands)


def _push_to_proto(message, commands):
    rows = []
    for command in commands:
        entry = message.commands.add()
        if isinstance(command, c.SyncFrames):
            entry.sync_frames.CopyFrom(rpb.SyncFrames(session_id=command.session_id, first=command.first,
                                                      frame_ids=[f.frame_id for f in command.frames],
                                                      timestamps=[f.timestamp for f in command.frames]))
            rows += [f.features for f in command.frames]
            continue
        _put(entry, command)
        if isinstance(command, c.FrameFeatures):
            rows.append(command.features)
    if rows:
        message.features.CopyFrom(tensors.pack(rows))
    return message


def decision_push_from_proto(message: dpb.DecisionPush) -> c.DecisionPush:
    return c.DecisionPush(message.gateway_id, _commands_from_proto(message, _DECISION_COMMANDS, "Decision"))


def reaction_push_from_proto(message: rpb.ReactionPush) -> c.ReactionPush:
    return c.ReactionPush(message.gateway_id, _commands_from_proto(message, _REACTION_COMMANDS, "Reaction"))


def _commands_from_proto(message, cases: dict[str, type], service: str) -> tuple:
    kinds = [entry.WhichOneof("kind") for entry in message.commands]
    count = sum(1 if kind == "frame_features" else len(entry.sync_frames.frame_ids) if kind == "sync_frames" else 0
                for kind, entry in zip(kinds, message.commands))
    rows = iter(tensors.unpack(message.features, count))
    commands = []
    for kind, entry in zip(kinds, message.commands):
        cls = cases.get(kind)
        if cls is None:
            raise ValueError(f"an empty command in a {service} push")
        if cls is c.SyncFrames:
            s = entry.sync_frames
            if len(s.frame_ids) != len(s.timestamps):
                raise ValueError("a sync's frame_ids and timestamps differ in length")
            frames = tuple(c.FrameFeatures(s.session_id, 0, frame_id, timestamp, next(rows))
                           for frame_id, timestamp in zip(s.frame_ids, s.timestamps))
            commands.append(c.SyncFrames(s.session_id, s.first, frames))
        elif cls is c.FrameFeatures:
            commands.append(_read(cls, entry.frame_features, features=next(rows)))
        else:
            commands.append(_read(cls, getattr(entry, kind)))
    return tuple(commands)


# ---- events (a commentary session's Decision streams its replies as Reaction does) -------------------------

def decision_events_to_proto(batch: c.EventBatch) -> dpb.DecisionEvents:
    return _events_to_proto(dpb.DecisionEvents(), batch)


def reaction_events_to_proto(batch: c.EventBatch) -> rpb.ReactionEvents:
    return _events_to_proto(rpb.ReactionEvents(), batch)


def _events_to_proto(message, batch: c.EventBatch):
    for event in batch.events:
        _put(message.events.add(), event)
    return message


def decision_events_from_proto(message: dpb.DecisionEvents) -> c.EventBatch:
    return _events_from_proto(message, _DECISION_EVENTS)


def reaction_events_from_proto(message: rpb.ReactionEvents) -> c.EventBatch:
    return _events_from_proto(message, _REACTION_EVENTS)


def _events_from_proto(message, cases: dict[str, type]) -> c.EventBatch:
    """An event of a case this gateway does not know (a newer replica's) is skipped."""
    events = []
    for entry in message.events:
        kind = entry.WhichOneof("kind")
        if kind in cases:
            events.append(_read(cases[kind], getattr(entry, kind)))
    return c.EventBatch(tuple(events))
