"""Transcripts: a session's record in Redis (registry.py) as the public Transcript message, and that
message as JSON or WebVTT (`liveserve transcript`).

The WebVTT output follows the live-commentary subtitle style: one cue per reply, from the stream time
of its trigger to the next reply (at most `cue_s` later); queries are cues of their own, spoken by
"User" (a `<v User>` voice span, cue ids q1, q2, ...) while replies are spoken by "Assistant" (r1, r2, ...).
"""

from __future__ import annotations

import re

from liveserve.api.v1 import live_stream_pb2 as pb
from liveserve.services.state.registry import SessionRecord

ROLES = {"user": pb.ROLE_USER, "assistant": pb.ROLE_ASSISTANT}
ROLE_NAMES = {value: name for name, value in ROLES.items()}
SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")  # what the Gateway hands out (hex), with room for others
DEFAULT_CUE_S = 5.0


def transcript_from_record(record: SessionRecord) -> pb.Transcript:
    config = record.config
    transcript = pb.Transcript(
        session_id=record.session_id, state=record.state, created=record.created,
        threshold=config.get("threshold") or 0.0, max_new_tokens=config.get("max_new_tokens") or 0,
        cache_policy=config.get("cache_policy") or "", window_frames=config.get("window_frames") or 0,
        turns=[pb.Turn(timestamp=float(turn.get("t", 0.0)), role=ROLES.get(turn.get("role"), pb.ROLE_UNSPECIFIED),
                       text=str(turn.get("text", ""))) for turn in record.history])
    if record.last_timestamp is not None:
        transcript.last_timestamp = record.last_timestamp
    return transcript


def transcript_to_dict(transcript: pb.Transcript) -> dict:
    """The JSON form: stable key names, roles as words, times in seconds."""
    return {
        "session_id": transcript.session_id, "state": transcript.state, "created": transcript.created,
        "last_timestamp": transcript.last_timestamp if transcript.HasField("last_timestamp") else None,
        "settings": {"threshold": round(transcript.threshold, 6), "max_new_tokens": transcript.max_new_tokens,
                     "cache_policy": transcript.cache_policy, "window_frames": transcript.window_frames},
        "turns": [{"timestamp": turn.timestamp, "role": ROLE_NAMES.get(turn.role, "unspecified"), "text": turn.text}
                  for turn in transcript.turns],
    }


def to_webvtt(transcript: pb.Transcript, cue_s: float = DEFAULT_CUE_S) -> str:
    """WebVTT: each turn a cue from its stream time until the next turn of the same role, at most `cue_s`
    seconds (a query and its reply share a start time, so they overlap rather than vanish)."""
    if not cue_s > 0:
        raise ValueError(f"cue_s must be > 0, got {cue_s}")
    lines = ["WEBVTT", "", f"NOTE liveserve session {transcript.session_id} ({transcript.state})", ""]
    turns = sorted(transcript.turns, key=lambda turn: turn.timestamp)  # stable: a query stays before its reply
    counts = {pb.ROLE_USER: 0, pb.ROLE_ASSISTANT: 0, pb.ROLE_UNSPECIFIED: 0}
    for index, turn in enumerate(turns):
        start = max(0.0, turn.timestamp)
        following = next((later.timestamp for later in turns[index + 1:]
                          if later.role == turn.role and later.timestamp > start), None)
        end = min(start + cue_s, following) if following is not None else start + cue_s
        counts[turn.role] += 1
        prefix, voice = {pb.ROLE_USER: ("q", "User"), pb.ROLE_ASSISTANT: ("r", "Assistant")}.get(
            turn.role, ("t", "Unknown"))
        lines += [f"{prefix}{counts[turn.role]}", f"{_vtt_time(start)} --> {_vtt_time(end)}",
                  f"<v {voice}>{_vtt_text(turn.text)}", ""]
    return "\n".join(lines)


def _vtt_time(seconds: float) -> str:
    millis = round(seconds * 1000)
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    return f"{hours:02d}:{minutes:02d}:{millis // 1000:02d}.{millis % 1000:03d}"


def _vtt_text(text: str) -> str:
    """Cue text: markup characters escaped, and no blank line (which would end the cue)."""
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return "\n".join(line for line in text.strip().splitlines() if line.strip()) or " "
