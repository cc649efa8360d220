"""The streaming-dialogue format: one video's conversation, frame by frame.

A dialogue is a sequence of turns over a video sampled at `fps` (frame i is at time i / fps):

- StreamTurn(num_frames, learn): the next `num_frames` frames. Every frame carries one decision: stay
  silent, or respond right after it. `learn=k` (an int) learns only the first k decisions of the turn.
- TextTurn(role, content, time, learn): a user query or an assistant reply. An assistant turn right after a
  stream turn is a proactive reply (the last frame's decision fired); right after a user turn it answers it.

`events` are the annotated moments the replies are about; evaluators score response times against them.
A Dialogue validates itself on construction and raises DialogueError naming the offending turn and field.

JSON form (one object per dialogue; `save_dialogues` writes a list of them):

    {"video": "videos/a.mp4", "fps": 2.0, "duration": 12.0,
     "turns": [{"role": "user", "content": "...", "time": 0.0, "learn": true},
               {"role": "stream", "num_frames": 5, "learn": true}, ...],
     "events": [{"time": 2.3, "text": "..."}]}
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

ROLES = ("user", "assistant")
DEFAULT_ACKNOWLEDGEMENT = "Okay."
# Tolerance for comparing float times with frame times i / fps (0.1 * 3 * 10 != 3 exactly).
TIME_EPS = 1e-6


class DialogueError(ValueError):
    """A dialogue breaks the format. `turn` and `field` say where (None when not about one turn / field)."""

    def __init__(self, message: str, *, turn: int | None = None, field: str | None = None) -> None:
        self.detail, self.turn, self.field = message, turn, field
        where = ", ".join(p for p in (None if turn is None else f"turn {turn}", field) if p)
        super().__init__(f"{where}: {message}" if where else message)

    def at_turn(self, turn: int) -> DialogueError:
        return DialogueError(self.detail, turn=turn, field=self.field)


def num_video_frames(duration: float, fps: float) -> int:
    """Frames a clip of `duration` seconds has at `fps`: those at i / fps < duration (as liveserve.video)."""
    return max(0, math.ceil(duration * fps - TIME_EPS))


def frame_index_at(time: float, fps: float) -> int:
    """The first frame at or after `time`: the frame where something that happens at `time` is first visible."""
    return max(0, math.ceil(time * fps - TIME_EPS))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True, slots=True)
class Event:
    time: float
    text: str

    def __post_init__(self) -> None:
        if not _is_number(self.time) or self.time < 0:
            raise DialogueError(f"must be a finite number >= 0, got {self.time!r}", field="time")
        if not isinstance(self.text, str) or not self.text.strip():
            raise DialogueError(f"must be a non-empty string, got {self.text!r}", field="text")


@dataclass(frozen=True, slots=True)
class StreamTurn:
    num_frames: int
    learn: bool | int = True

    def __post_init__(self) -> None:
        if not _is_int(self.num_frames) or self.num_frames < 1:
            raise DialogueError(f"must be an integer >= 1, got {self.num_frames!r}", field="num_frames")
        if isinstance(self.learn, bool):
            return
        if not _is_int(self.learn) or not 0 <= self.learn <= self.num_frames:
            raise DialogueError(f"must be a bool or an integer in [0, num_frames={self.num_frames}], "
                                f"got {self.learn!r}", field="learn")

    def learns(self, k: int) -> bool:
        """Whether the decision at this turn's k-th frame (0-based) is learned."""
        return self.learn if isinstance(self.learn, bool) else k < self.learn


@dataclass(frozen=True, slots=True)
class TextTurn:
    role: Literal["user", "assistant"]
    content: str
    time: float
    learn: bool = True  # user turns are never labelled; their flag is kept but ignored

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise DialogueError(f"must be one of {ROLES} (or 'stream' in JSON), got {self.role!r}", field="role")
        if not isinstance(self.content, str) or not self.content.strip():
            raise DialogueError(f"must be a non-empty string, got {self.content!r}", field="content")
        if not _is_number(self.time) or self.time < 0:
            raise DialogueError(f"must be a finite number >= 0, got {self.time!r}", field="time")
        if not isinstance(self.learn, bool):
            raise DialogueError(f"must be a bool, got {self.learn!r}", field="learn")


Turn = StreamTurn | TextTurn


@dataclass(frozen=True, slots=True)
class Dialogue:
    video: str
    fps: float
    duration: float
    turns: tuple[Turn, ...]
    events: tuple[Event, ...] = ()

    def __post_init__(self) -> None:
        # Accept lists for convenience; store tuples so a dialogue stays immutable.
        object.__setattr__(self, "turns", tuple(self.turns))
        object.__setattr__(self, "events", tuple(self.events))
        if not isinstance(self.video, str):
            raise DialogueError(f"must be a string, got {self.video!r}", field="video")
        for name in ("fps", "duration"):
            value = getattr(self, name)
            if not _is_number(value) or value <= 0:
                raise DialogueError(f"must be a finite number > 0, got {value!r}", field=name)
        self._check_events()
        self._check_turns()

    @property
    def num_frames(self) -> int:
        """Frames covered by the stream turns."""
        return sum(t.num_frames for t in self.turns if isinstance(t, StreamTurn))

    @property
    def video_frames(self) -> int:
        """Frames the video has at `fps`."""
        return num_video_frames(self.duration, self.fps)

    def _check_events(self) -> None:
        previous = 0.0
        for j, event in enumerate(self.events):
            if not isinstance(event, Event):
                raise DialogueError(f"must be an Event, got {type(event).__name__}", field=f"events[{j}]")
            if event.time > self.duration + TIME_EPS:
                raise DialogueError(f"{event.time:.3f} s is after the end of the video ({self.duration:.3f} s)",
                                    field=f"events[{j}].time")
            if event.time < previous:
                raise DialogueError(f"{event.time:.3f} s is before the previous event's {previous:.3f} s; "
                                    "events must be in time order", field=f"events[{j}].time")
            previous = event.time

    def _check_turns(self) -> None:
        total_frames = self.video_frames
        frames_seen = 0  # frames covered by the stream turns so far
        later_frames = [False] * len(self.turns)  # does any stream turn come after turn i?
        for i in range(len(self.turns) - 2, -1, -1):
            later_frames[i] = later_frames[i + 1] or isinstance(self.turns[i + 1], StreamTurn)
        previous_text: tuple[int, float] | None = None
        for i, turn in enumerate(self.turns):
            if isinstance(turn, StreamTurn):
                frames_seen += turn.num_frames
                if frames_seen > total_frames:
                    raise DialogueError(
                        f"the stream turns reach frame {frames_seen - 1}, but the video has only {total_frames} "
                        f"frames at {self.fps:g} fps (duration {self.duration:g} s)", turn=i, field="num_frames")
                continue
            if not isinstance(turn, TextTurn):
                raise DialogueError(f"must be a StreamTurn or a TextTurn, got {type(turn).__name__}", turn=i)
            before = self.turns[i - 1] if i else None
            if turn.role == "assistant" and not (
                    isinstance(before, StreamTurn) or (isinstance(before, TextTurn) and before.role == "user")):
                what = "it is the first turn" if before is None else "it follows an assistant turn"
                raise DialogueError(f"an assistant turn must follow a stream turn or a user turn, but {what}",
                                    turn=i, field="role")
            self._check_time(i, turn, frames_seen, later_frames[i], previous_text)
            previous_text = (i, turn.time)

    def _check_time(self, i: int, turn: TextTurn, frames_seen: int, frames_follow: bool,
                    previous_text: tuple[int, float] | None) -> None:
        t = turn.time
        if previous_text is not None and t < previous_text[1] - TIME_EPS:
            raise DialogueError(f"{t:.3f} s is before turn {previous_text[0]}'s {previous_text[1]:.3f} s; "
                                "times must not go backwards", turn=i, field="time")
        if t > self.duration + TIME_EPS:
            raise DialogueError(f"{t:.3f} s is after the end of the video ({self.duration:.3f} s)", turn=i,
                                field="time")
        if frames_seen and t < (frames_seen - 1) / self.fps - TIME_EPS:
            raise DialogueError(f"{t:.3f} s is before frame {frames_seen - 1} ({(frames_seen - 1) / self.fps:.3f} s),"
                                " which comes earlier in the dialogue", turn=i, field="time")
        # A session answers a queued query right after the last frame at or before its time, so a user turn
        # must come before the next frame's time. A query that opens the dialogue may share frame 0's time
        # (it is delivered before the first frame).
        if turn.role == "user" and frames_follow:
            next_time = frames_seen / self.fps
            if t > next_time + TIME_EPS or (frames_seen and t > next_time - TIME_EPS):
                raise DialogueError(f"{t:.3f} s is not before frame {frames_seen} ({next_time:.3f} s), which "
                                    "follows it; a session answers a query after every frame at or before its time",
                                    turn=i, field="time")


# ---- JSON --------------------------------------------------------------------------------------------------------

_TOP_KEYS = {"video", "fps", "duration", "turns", "events"}
_STREAM_KEYS = {"role", "num_frames", "learn"}
_TEXT_KEYS = {"role", "content", "time", "learn"}


def _turn_to_json(turn: Turn) -> dict:
    if isinstance(turn, StreamTurn):
        return {"role": "stream", "num_frames": turn.num_frames, "learn": turn.learn}
    return {"role": turn.role, "content": turn.content, "time": turn.time, "learn": turn.learn}


def dialogue_to_json(dialogue: Dialogue) -> dict:
    return {"video": dialogue.video, "fps": dialogue.fps, "duration": dialogue.duration,
            "turns": [_turn_to_json(t) for t in dialogue.turns],
            "events": [{"time": e.time, "text": e.text} for e in dialogue.events]}


def _check_keys(obj, allowed: set[str], required: set[str], what: str, turn: int | None = None) -> None:
    if not isinstance(obj, dict):
        raise DialogueError(f"{what} must be a JSON object, got {type(obj).__name__}", turn=turn)
    if unknown := sorted(set(obj) - allowed):
        raise DialogueError(f"{what} has unknown keys {unknown}; allowed: {sorted(allowed)}", turn=turn)
    if missing := sorted(required - set(obj)):
        raise DialogueError(f"{what} is missing keys {missing}", turn=turn)


def _turn_from_json(obj, i: int) -> Turn:
    if not isinstance(obj, dict) or "role" not in obj:
        raise DialogueError("a turn must be a JSON object with a 'role'", turn=i)
    try:
        if obj["role"] == "stream":
            _check_keys(obj, _STREAM_KEYS, {"role", "num_frames"}, "a stream turn", i)
            return StreamTurn(obj["num_frames"], obj.get("learn", True))
        _check_keys(obj, _TEXT_KEYS, {"role", "content", "time"}, "a text turn", i)
        return TextTurn(obj["role"], obj["content"], obj["time"], obj.get("learn", True))
    except DialogueError as exc:
        raise exc.at_turn(i) from None


def dialogue_from_json(obj) -> Dialogue:
    _check_keys(obj, _TOP_KEYS, _TOP_KEYS - {"events"}, "a dialogue")
    if not isinstance(obj["turns"], list):
        raise DialogueError(f"must be a list, got {type(obj['turns']).__name__}", field="turns")
    events = obj.get("events", [])
    if not isinstance(events, list):
        raise DialogueError(f"must be a list, got {type(events).__name__}", field="events")
    parsed_events = []
    for j, e in enumerate(events):
        _check_keys(e, {"time", "text"}, {"time", "text"}, f"events[{j}]")
        try:
            parsed_events.append(Event(e["time"], e["text"]))
        except DialogueError as exc:
            raise DialogueError(exc.detail, field=f"events[{j}].{exc.field}") from None
    turns = tuple(_turn_from_json(t, i) for i, t in enumerate(obj["turns"]))
    return Dialogue(obj["video"], obj["fps"], obj["duration"], turns, tuple(parsed_events))


def save_dialogues(path: str | Path, dialogues: Iterable[Dialogue]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([dialogue_to_json(d) for d in dialogues], indent=1) + "\n")
    return path


def load_dialogues(path: str | Path) -> list[Dialogue]:
    data = json.loads(Path(path).read_text())
    if not isinstance(data, list):
        raise DialogueError(f"{path}: expected a JSON list of dialogues, got {type(data).__name__}")
    out = []
    for k, obj in enumerate(data):
        try:
            out.append(dialogue_from_json(obj))
        except DialogueError as exc:
            raise DialogueError(f"{path}: dialogue {k}: {exc}") from None
    return out


# ---- narration dialogues -----------------------------------------------------------------------------------------

def dialogue_from_events(events: Sequence[Event | tuple[float, str]], fps: float, duration: float, instruction: str,
                         *, video: str = "", acknowledgement: str = DEFAULT_ACKNOWLEDGEMENT) -> Dialogue:
    """The narration dialogue for `events`, in the order a session serves it: frame 0 (an unlearned 1-frame
    stream turn), the user's instruction at time 0 answered right after it with a short acknowledgement, then
    stream turns over the remaining frames, with each event narrated right after the first frame at or after
    its time (frame ceil(t * fps), clamped to [1, last frame]: frame 0's decision is taken by the instruction).

    Events are taken in time order (stable for equal times). When several land on the same frame, the first
    is kept and the rest are dropped, from the turns and from the returned dialogue's `events` alike, so
    the events always match the replies one to one (a 1-frame clip keeps none). Assistant turns carry their
    frame's time.
    """
    parsed = sorted((e if isinstance(e, Event) else Event(*e) for e in events), key=lambda e: e.time)
    n = num_video_frames(duration, fps)
    if n < 1:
        raise DialogueError(f"a {duration!r} s clip at {fps!r} fps has no frames")
    kept: list[tuple[int, Event]] = []
    for j, event in enumerate(parsed):
        if event.time > duration + TIME_EPS:
            raise DialogueError(f"{event.time:.3f} s is after the end of the video ({duration:.3f} s)",
                                field=f"events[{j}].time")
        frame = min(max(frame_index_at(event.time, fps), 1), n - 1)
        if frame >= 1 and (not kept or frame != kept[-1][0]):
            kept.append((frame, event))
    # The engine decides frame 0 before answering a query pushed with it ("]\nUser: q\nAssistant:"), so
    # the instruction follows frame 0; nothing in the video predicts it, hence learn=False.
    turns: list[Turn] = [StreamTurn(1, learn=False), TextTurn("user", instruction, 0.0),
                         TextTurn("assistant", acknowledgement, 0.0)]
    next_frame = 1
    for frame, event in kept:
        turns.append(StreamTurn(frame + 1 - next_frame))
        turns.append(TextTurn("assistant", event.text, frame / fps))
        next_frame = frame + 1
    if next_frame < n:
        turns.append(StreamTurn(n - next_frame))
    return Dialogue(video, fps, duration, tuple(turns), tuple(e for _, e in kept))
