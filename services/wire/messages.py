"""The public protobuf messages and the engine's dataclasses: a session's settings from its Open, and
server messages back into engine events for clients that reuse the engine's printers."""

from __future__ import annotations

from liveserve.api.v1 import live_stream_pb2 as pb
from liveserve.config import DECODINGS, CacheConfig, CommentaryConfig, SessionConfig
from liveserve.engine.events import Event, FrameDecision, ResponseDelta, ResponseDone, ResponseStarted

_ACTION_NAMES = {pb.ACTION_SILENT: "silent", pb.ACTION_RESPOND: "respond", pb.ACTION_QUERY: "query",
                 pb.ACTION_SUPPRESSED: "suppressed"}
_TRIGGER_NAMES = {pb.TRIGGER_PROACTIVE: "proactive", pb.TRIGGER_QUERY: "query", pb.TRIGGER_COMMENTARY: "commentary"}
_FINISH_NAMES = {pb.FINISH_REASON_EOS: "eos", pb.FINISH_REASON_LENGTH: "length"}


def session_config(open_: pb.Open, defaults: SessionConfig, modes: tuple[str, ...] = ("live",)) -> SessionConfig:
    """The session's settings: the client's choices over the server's defaults (`defaults.mode` is the
    model's own; `modes` those its family has). Raises ValueError with a specific message for out-of-range
    values (SessionConfig validates every field) or a mode the model does not have."""
    mode = open_.mode or defaults.mode
    if mode not in modes:
        raise ValueError(f"mode {mode!r}: this model runs {' or '.join(map(repr, modes))}")
    if mode == "commentary" and open_.decisions_only:
        raise ValueError("decisions_only is for live mode; a commentary session says something or nothing each chunk")
    chunk, options = defaults.commentary, open_.commentary
    temperature, top_p, penalty, seed = _decoding(options, defaults) if mode == "commentary" else (
        defaults.temperature, defaults.top_p, chunk.repetition_penalty, defaults.seed)
    commentary = CommentaryConfig(chunk_s=options.chunk_s or chunk.chunk_s, fps=open_.fps or chunk.fps,
                                  max_tokens_per_chunk=options.max_tokens_per_chunk or chunk.max_tokens_per_chunk,
                                  query=options.query or chunk.query, repetition_penalty=penalty,
                                  resize=options.resize or chunk.resize, min_pixels=chunk.min_pixels,
                                  max_pixels=chunk.max_pixels)
    cache = defaults.cache
    options = open_.cache
    cache = CacheConfig(policy=options.policy or cache.policy, positions=cache.positions,
                        window_frames=options.window_frames or cache.window_frames,
                        text_window_tokens=options.text_window_tokens or cache.text_window_tokens,
                        evict_frames=min(cache.evict_frames, options.window_frames or cache.window_frames))
    return SessionConfig(
        threshold=open_.threshold if open_.HasField("threshold") else defaults.threshold,
        max_new_tokens=open_.max_new_tokens or defaults.max_new_tokens,
        temperature=temperature, top_p=top_p, seed=seed,
        system_prompt=open_.system_prompt or defaults.system_prompt,
        max_query_tokens=defaults.max_query_tokens, cache=cache,
        replies="none" if open_.decisions_only else defaults.replies, mode=mode, commentary=commentary)


def _decoding(options: pb.CommentaryOptions, defaults: SessionConfig) -> tuple[float, float, float, int]:
    """A commentary session's (temperature, top_p, repetition penalty, seed): the Open's preset (or the
    server's defaults), then each field the Open sets."""
    if options.decoding and options.decoding not in DECODINGS:
        raise ValueError(f"decoding {options.decoding!r}: one of {', '.join(map(repr, DECODINGS))}")
    preset = DECODINGS.get(options.decoding)
    temperature, top_p, penalty = ((preset.temperature, preset.top_p, preset.repetition_penalty) if preset else
                                   (defaults.temperature, defaults.top_p, defaults.commentary.repetition_penalty))
    return (options.temperature if options.HasField("temperature") else temperature,
            options.top_p if options.HasField("top_p") else top_p,
            options.repetition_penalty if options.HasField("repetition_penalty") else penalty,
            options.seed if options.HasField("seed") else defaults.seed)


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
