"""The seams' dataclasses (contracts.py) <-> the internal protobuf contracts (liveserve.internal.v2).

Only the Ray transport uses this: in one process the dataclasses are handed over as they are. Frame
features of one message are packed into one tensor in the model's dtype (tensors.pack).
"""

from __future__ import annotations

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
_ACTION_OF = {v: k for k, v in ACTIONS.items()}
_TRIGGER_OF = {v: k for k, v in TRIGGERS.items()}
_FINISH_OF = {v: k for k, v in FINISH.items()}


def _trace(carrier) -> c.Trace:
    return tuple(sorted(carrier.items()))


# ---- sessions ----------------------------------------------------------------------------------------------

def settings_to_proto(config: SessionConfig) -> spb.SessionSettings:
    cache = config.cache
    return spb.SessionSettings(
        threshold=config.threshold, max_new_tokens=config.max_new_tokens, temperature=config.temperature,
        top_p=config.top_p, seed=config.seed, system_prompt=config.system_prompt or "",
        max_query_tokens=config.max_query_tokens, cache_policy=cache.policy, positions=cache.positions,
        window_frames=cache.window_frames, text_window_tokens=cache.text_window_tokens,
        evict_frames=cache.evict_frames, decisions_only=config.replies == "none", mode=config.mode,
        chunk_s=config.commentary.chunk_s, fps=config.commentary.fps,
        max_tokens_per_chunk=config.commentary.max_tokens_per_chunk, commentary_query=config.commentary.query)


def settings_from_proto(message: spb.SessionSettings) -> SessionConfig:
    """Validated again here (SessionConfig checks every field): a replica trusts no caller blindly."""
    cache = CacheConfig(policy=message.cache_policy, positions=message.positions, window_frames=message.window_frames,
                        text_window_tokens=message.text_window_tokens, evict_frames=message.evict_frames)
    commentary = CommentaryConfig(chunk_s=message.chunk_s, fps=message.fps,
                                  max_tokens_per_chunk=message.max_tokens_per_chunk, query=message.commentary_query)
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
    return pb.Limits(max_query_tokens=limits.max_query_tokens, max_new_tokens=limits.max_new_tokens,
                     max_lag_s=limits.max_lag_s, tokens_per_frame=limits.tokens_per_frame)


def placed_to_proto(placed: c.SessionPlaced) -> spb.OpenResponse:
    return spb.OpenResponse(replica_id=placed.replica, epoch=placed.epoch, limits=limits_to_proto(placed.limits),
                            restored_turns=placed.restored_turns)


def placed_from_proto(session_id: str, message: spb.OpenResponse) -> c.SessionPlaced:
    limits = message.limits
    return c.SessionPlaced(session_id, message.replica_id, message.epoch,
                           c.Limits(limits.max_query_tokens, limits.max_new_tokens, limits.max_lag_s,
                                    limits.tokens_per_frame), message.restored_turns)


def _close_to_proto(close: c.CloseSession) -> spb.CloseSession:
    return spb.CloseSession(session_id=close.session_id, epoch=close.epoch, drain=close.drain)


def _close_from_proto(message: spb.CloseSession) -> c.CloseSession:
    return c.CloseSession(message.session_id, message.epoch, message.drain)


# ---- Perception --------------------------------------------------------------------------------------------

def encode_request_to_proto(request: c.EncodeRequest) -> ppb.EncodeRequest:
    return ppb.EncodeRequest(frames=[ppb.FrameImage(session_id=f.session_id, frame_id=f.frame_id, timestamp=f.timestamp,
                                                    image=f.image, trace_context=dict(f.trace)) for f in request.frames])


def encode_request_from_proto(message: ppb.EncodeRequest) -> c.EncodeRequest:
    return c.EncodeRequest(tuple(c.FrameImage(f.session_id, f.frame_id, f.timestamp, f.image, _trace(f.trace_context))
                                 for f in message.frames))


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


# ---- Decision ------------------------------------------------------------------------------------------------

def decision_push_to_proto(push: c.DecisionPush) -> dpb.DecisionPush:
    message, rows = dpb.DecisionPush(gateway_id=push.gateway_id), []
    for command in push.commands:
        entry = message.commands.add()
        if isinstance(command, c.FrameFeatures):
            entry.frame.CopyFrom(_frame_to_proto(command))
            rows.append(command.features)
        elif isinstance(command, c.QueryText):
            entry.query.CopyFrom(dpb.QueryText(session_id=command.session_id, epoch=command.epoch,
                                               timestamp=command.timestamp, text=command.text,
                                               trace_context=dict(command.trace)))
        elif isinstance(command, c.ReplyText):
            entry.reply.CopyFrom(dpb.ReplyText(session_id=command.session_id, epoch=command.epoch, text=command.text,
                                               token_ids=command.token_ids))
        else:
            entry.close.CopyFrom(_close_to_proto(command))
    if rows:
        message.features.CopyFrom(tensors.pack(rows))
    return message


def decision_push_from_proto(message: dpb.DecisionPush) -> c.DecisionPush:
    frames = sum(1 for entry in message.commands if entry.WhichOneof("kind") == "frame")
    rows = iter(tensors.unpack(message.features, frames))
    commands: list[c.DecisionCommand] = []
    for entry in message.commands:
        kind = entry.WhichOneof("kind")
        if kind == "frame":
            commands.append(_frame_from_proto(entry.frame, next(rows)))
        elif kind == "query":
            q = entry.query
            commands.append(c.QueryText(q.session_id, q.epoch, q.timestamp, q.text, _trace(q.trace_context)))
        elif kind == "reply":
            r = entry.reply
            commands.append(c.ReplyText(r.session_id, r.epoch, r.text, tuple(r.token_ids)))
        elif kind == "close":
            commands.append(_close_from_proto(entry.close))
        else:
            raise ValueError("an empty command in a Decision push")
    return c.DecisionPush(message.gateway_id, tuple(commands))


def _frame_to_proto(frame: c.FrameFeatures) -> dpb.FrameFeatures:
    return dpb.FrameFeatures(session_id=frame.session_id, epoch=frame.epoch, frame_id=frame.frame_id,
                             timestamp=frame.timestamp, trace_context=dict(frame.trace))


def _frame_from_proto(message: dpb.FrameFeatures, features) -> c.FrameFeatures:
    return c.FrameFeatures(message.session_id, message.epoch, message.frame_id, message.timestamp, features,
                           _trace(message.trace_context))


def decision_events_to_proto(batch: c.EventBatch) -> dpb.DecisionEvents:
    message = dpb.DecisionEvents()
    for event in batch.events:
        entry = message.events.add()
        if isinstance(event, c.Decided):
            entry.decided.CopyFrom(dpb.Decided(
                session_id=event.session_id, frame_id=event.frame_id, timestamp=event.timestamp,
                p_silent=event.p_silent, fired=event.fired, action=ACTIONS[event.action], trace_context=dict(event.trace)))
        elif isinstance(event, c.Dropped):
            entry.dropped.CopyFrom(dpb.Dropped(session_id=event.session_id, frame_ids=event.frame_ids,
                                               timestamps=event.timestamps, reason=event.reason))
        elif isinstance(event, c.ReplyWanted):
            entry.reply_wanted.CopyFrom(dpb.ReplyWanted(
                session_id=event.session_id, trigger=TRIGGERS[event.trigger], timestamp=event.timestamp,
                query=event.query, frame_id=event.frame_id, trace_context=dict(event.trace)))
        elif isinstance(event, c.Refused):
            entry.refused.CopyFrom(dpb.Refused(session_id=event.session_id, input=event.input,
                                               frame_id=event.frame_id, message=event.message))
        elif isinstance(event, c.ReplyStarted):
            entry.said_started.CopyFrom(_started_to_proto(event))
        elif isinstance(event, c.ReplyDelta):
            entry.said_delta.CopyFrom(_delta_to_proto(event))
        elif isinstance(event, c.ReplyDone):
            entry.said_done.CopyFrom(_done_to_proto(event))
        else:
            entry.ended.CopyFrom(dpb.SessionEnded(
                session_id=event.session_id, frames_decided=event.frames_decided, frames_dropped=event.frames_dropped,
                responses=event.responses, frames_replayed=event.frames_replayed, code=event.code,
                message=event.message))
    return message


def decision_events_from_proto(message: dpb.DecisionEvents) -> c.EventBatch:
    events: list[c.DecisionEvent] = []
    for entry in message.events:
        kind = entry.WhichOneof("kind")
        if kind == "decided":
            d = entry.decided
            events.append(c.Decided(d.session_id, d.frame_id, d.timestamp, d.p_silent, d.fired, _ACTION_OF[d.action],
                                    _trace(d.trace_context)))
        elif kind == "dropped":
            d = entry.dropped
            events.append(c.Dropped(d.session_id, tuple(d.frame_ids), tuple(d.timestamps), d.reason))
        elif kind == "reply_wanted":
            r = entry.reply_wanted
            events.append(c.ReplyWanted(r.session_id, _TRIGGER_OF[r.trigger], r.timestamp, r.query, r.frame_id,
                                        _trace(r.trace_context)))
        elif kind == "refused":
            r = entry.refused
            events.append(c.Refused(r.session_id, r.input, r.frame_id, r.message))
        elif kind == "ended":
            e = entry.ended
            events.append(c.SessionEnded(e.session_id, e.frames_decided, e.frames_dropped, e.responses,
                                         e.frames_replayed, e.code, e.message))
        elif kind == "said_started":
            events.append(_started_from_proto(entry.said_started))
        elif kind == "said_delta":
            events.append(_delta_from_proto(entry.said_delta))
        elif kind == "said_done":
            events.append(_done_from_proto(entry.said_done))
    return c.EventBatch(tuple(events))


# ---- Reaction ------------------------------------------------------------------------------------------------

def reaction_push_to_proto(push: c.ReactionPush) -> rpb.ReactionPush:
    message, rows = rpb.ReactionPush(gateway_id=push.gateway_id), []
    for command in push.commands:
        entry = message.commands.add()
        if isinstance(command, c.SyncFrames):
            entry.sync.CopyFrom(rpb.SyncFrames(session_id=command.session_id, first=command.first,
                                               frame_ids=[f.frame_id for f in command.frames],
                                               timestamps=[f.timestamp for f in command.frames]))
            rows += [f.features for f in command.frames]
        elif isinstance(command, c.Respond):
            entry.respond.CopyFrom(rpb.Respond(session_id=command.session_id, trigger=TRIGGERS[command.trigger],
                                               timestamp=command.timestamp, query=command.query,
                                               trace_context=dict(command.trace)))
        else:
            entry.close.CopyFrom(_close_to_proto(command))
    if rows:
        message.features.CopyFrom(tensors.pack(rows))
    return message


def reaction_push_from_proto(message: rpb.ReactionPush) -> c.ReactionPush:
    count = sum(len(entry.sync.frame_ids) for entry in message.commands if entry.WhichOneof("kind") == "sync")
    rows = iter(tensors.unpack(message.features, count))
    commands: list[c.ReactionCommand] = []
    for entry in message.commands:
        kind = entry.WhichOneof("kind")
        if kind == "sync":
            s = entry.sync
            if len(s.frame_ids) != len(s.timestamps):
                raise ValueError("a sync's frame_ids and timestamps differ in length")
            frames = tuple(c.FrameFeatures(s.session_id, 0, frame_id, timestamp, next(rows))
                           for frame_id, timestamp in zip(s.frame_ids, s.timestamps))
            commands.append(c.SyncFrames(s.session_id, s.first, frames))
        elif kind == "respond":
            r = entry.respond
            commands.append(c.Respond(r.session_id, _TRIGGER_OF[r.trigger], r.timestamp, r.query, _trace(r.trace_context)))
        elif kind == "close":
            commands.append(_close_from_proto(entry.close))
        else:
            raise ValueError("an empty command in a Reaction push")
    return c.ReactionPush(message.gateway_id, tuple(commands))


def reaction_events_to_proto(batch: c.EventBatch) -> rpb.ReactionEvents:
    message = rpb.ReactionEvents()
    for event in batch.events:
        entry = message.events.add()
        if isinstance(event, c.ReplyStarted):
            entry.started.CopyFrom(_started_to_proto(event))
        elif isinstance(event, c.ReplyDelta):
            entry.delta.CopyFrom(_delta_to_proto(event))
        elif isinstance(event, c.ReplyDone):
            entry.done.CopyFrom(_done_to_proto(event))
        else:
            entry.failed.CopyFrom(rpb.ReplyFailed(session_id=event.session_id, message=event.message))
    return message


def reaction_events_from_proto(message: rpb.ReactionEvents) -> c.EventBatch:
    events: list[c.ReactionEvent] = []
    for entry in message.events:
        kind = entry.WhichOneof("kind")
        if kind == "started":
            events.append(_started_from_proto(entry.started))
        elif kind == "delta":
            events.append(_delta_from_proto(entry.delta))
        elif kind == "done":
            events.append(_done_from_proto(entry.done))
        elif kind == "failed":
            events.append(c.ReplyFailed(entry.failed.session_id, entry.failed.message))
    return c.EventBatch(tuple(events))


# ---- replies (from Reaction, or from a commentary session's Decision) -----------------------------------------

def _started_to_proto(event: c.ReplyStarted) -> rpb.ReplyStarted:
    return rpb.ReplyStarted(session_id=event.session_id, timestamp=event.timestamp, trigger=TRIGGERS[event.trigger],
                            query=event.query)


def _started_from_proto(s: rpb.ReplyStarted) -> c.ReplyStarted:
    return c.ReplyStarted(s.session_id, s.timestamp, _TRIGGER_OF[s.trigger], s.query)


def _delta_to_proto(event: c.ReplyDelta) -> rpb.ReplyDelta:
    return rpb.ReplyDelta(session_id=event.session_id, text=event.text, num_tokens=event.num_tokens)


def _delta_from_proto(d: rpb.ReplyDelta) -> c.ReplyDelta:
    return c.ReplyDelta(d.session_id, d.text, d.num_tokens)


def _done_to_proto(event: c.ReplyDone) -> rpb.ReplyDone:
    return rpb.ReplyDone(session_id=event.session_id, text=event.text, num_tokens=event.num_tokens,
                         finish_reason=FINISH[event.finish_reason], ttft_s=event.ttft_s, duration_s=event.duration_s,
                         token_ids=event.token_ids)


def _done_from_proto(d: rpb.ReplyDone) -> c.ReplyDone:
    return c.ReplyDone(d.session_id, d.text, d.num_tokens, _FINISH_OF[d.finish_reason], d.ttft_s, d.duration_s,
                       tuple(d.token_ids))
