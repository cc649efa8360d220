"""The streaming-dialogue format: validation, JSON round trips, and narration dialogues built from events."""

from __future__ import annotations

import json

import pytest

from liveserve.data.dialogue import (Dialogue, DialogueError, Event, StreamTurn, TextTurn, dialogue_from_events,
                                     dialogue_from_json, dialogue_to_json, frame_index_at, load_dialogues,
                                     num_video_frames, save_dialogues)

Q = "what is happening now?"


def mixed() -> Dialogue:
    """Every kind of turn: a first query, proactive replies, learn=k, a mid-stream query, a query after a reply."""
    return Dialogue("videos/a.mp4", 2.0, 10.0, (
        TextTurn("user", "Please narrate the video in real time.", 0.0),
        TextTurn("assistant", "Okay.", 0.0),
        StreamTurn(3),
        TextTurn("assistant", "A red square appears.", 1.0),
        StreamTurn(4, learn=2),
        TextTurn("user", Q, 3.2),
        TextTurn("assistant", "It moves left.", 3.2, learn=False),
        TextTurn("user", "and now?", 3.3),
        TextTurn("assistant", "Still moving.", 3.3),
        StreamTurn(5, learn=False),
    ), (Event(0.8, "A red square appears."),))


def test_json_round_trip(tmp_path):
    d = mixed()
    obj = json.loads(json.dumps(dialogue_to_json(d)))
    assert obj["turns"][4] == {"role": "stream", "num_frames": 4, "learn": 2}
    assert obj["turns"][6] == {"role": "assistant", "content": "It moves left.", "time": 3.2, "learn": False}
    assert dialogue_from_json(obj) == d
    path = save_dialogues(tmp_path / "sub" / "d.json", [d, d])
    assert load_dialogues(path) == [d, d]
    assert d.num_frames == 12 and d.video_frames == 20


def test_learns():
    assert [StreamTurn(4, learn=2).learns(k) for k in range(4)] == [True, True, False, False]
    assert [StreamTurn(2).learns(k) for k in range(2)] == [True, True]
    assert [StreamTurn(2, learn=False).learns(k) for k in range(2)] == [False, False]
    assert not StreamTurn(2, learn=0).learns(0)


def _with_turns(*turns, fps: float = 2.0, duration: float = 10.0) -> Dialogue:
    return Dialogue("v.mp4", fps, duration, turns)


S, A, U = StreamTurn, (lambda c, t: TextTurn("assistant", c, t)), (lambda c, t: TextTurn("user", c, t))


@pytest.mark.parametrize("build, turn, field, match", [
    (lambda: _with_turns(U(Q, 0.0), A("ok", 0.0), A("again", 0.0)), 2, "role", "follows an assistant turn"),
    (lambda: _with_turns(A("hi", 0.0), S(2)), 0, "role", "first turn"),
    (lambda: _with_turns(S(2), A("a", 0.5), S(25)), 2, "num_frames", "has only 20 frames at 2 fps"),
    (lambda: _with_turns(S(4), A("a", 1.5), S(2), U(Q, 1.2), A("b", 1.2)), 3, "time", "times must not go backwards"),
    (lambda: _with_turns(S(4), A("a", 1.0), S(1)), 1, "time", r"before frame 3 \(1\.500 s\)"),
    (lambda: _with_turns(S(2), U(Q, 1.0), A("b", 1.0), S(1)), 1, "time", r"not before frame 2 \(1\.000 s\)"),
    (lambda: _with_turns(U(Q, 0.5), A("b", 0.5), S(1)), 0, "time", "not before frame 0"),
    (lambda: _with_turns(S(2), U(Q, 11.0), A("b", 11.0)), 1, "time", "after the end of the video"),
])
def test_sequence_errors_name_turn_and_field(build, turn, field, match):
    with pytest.raises(DialogueError, match=match) as info:
        build()
    assert (info.value.turn, info.value.field) == (turn, field)
    assert str(info.value).startswith(f"turn {turn}, {field}: ")


def test_valid_query_times():
    # At the start a query may share frame 0's time; later it must fall in [previous frame, next frame).
    _with_turns(U(Q, 0.0), A("ok", 0.0), S(3), U(Q, 1.499), A("b", 1.499), S(1))
    _with_turns(S(3), U(Q, 1.0), A("b", 1.2), S(1))  # assistant times are not bound by the next frame


def _json_with_turn(turn: dict) -> dict:
    return {"video": "v.mp4", "fps": 2.0, "duration": 10.0, "turns": [{"role": "stream", "num_frames": 2}, turn]}


@pytest.mark.parametrize("turn, field, match", [
    ({"role": "stream", "num_frames": -1}, "num_frames", "integer >= 1, got -1"),
    ({"role": "stream", "num_frames": 2.0}, "num_frames", "integer >= 1, got 2.0"),
    ({"role": "stream", "num_frames": 2, "learn": 3}, "learn", r"\[0, num_frames=2\], got 3"),
    ({"role": "system", "content": "x", "time": 1.0}, "role", "must be one of"),
    ({"role": "assistant", "content": "  ", "time": 1.0}, "content", "non-empty"),
    ({"role": "assistant", "content": "x", "time": -1}, "time", "finite number >= 0"),
    ({"role": "assistant", "content": "x", "time": True}, "time", "finite number >= 0"),
    ({"role": "assistant", "content": "x", "time": 1.0, "learn": 1}, "learn", "must be a bool"),
])
def test_json_field_errors_name_turn_and_field(turn, field, match):
    with pytest.raises(DialogueError, match=match) as info:
        dialogue_from_json(_json_with_turn(turn))
    assert (info.value.turn, info.value.field) == (1, field)


def test_json_shape_errors():
    with pytest.raises(DialogueError, match=r"turn 1: a stream turn has unknown keys \['frames'\]"):
        dialogue_from_json(_json_with_turn({"role": "stream", "num_frames": 1, "frames": 3}))
    with pytest.raises(DialogueError, match=r"a dialogue is missing keys \['fps'\]"):
        dialogue_from_json({"video": "v", "duration": 1.0, "turns": []})
    with pytest.raises(DialogueError, match="fps: must be a finite number > 0"):
        dialogue_from_json({"video": "v", "fps": 0, "duration": 1.0, "turns": []})
    bad_events = dict(_json_with_turn({"role": "stream", "num_frames": 1}), events=[{"time": 2, "text": "b"},
                                                                                   {"time": 1, "text": "a"}])
    with pytest.raises(DialogueError, match=r"events\[1\]\.time: 1\.000 s is before"):
        dialogue_from_json(bad_events)


def test_load_dialogues_names_the_dialogue(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([dialogue_to_json(mixed()), _json_with_turn({"role": "stream", "num_frames": 0})]))
    with pytest.raises(DialogueError, match=r"dialogue 1: turn 1, num_frames: must be an integer >= 1, got 0"):
        load_dialogues(path)


def test_frame_arithmetic():
    assert num_video_frames(12.0, 2.0) == 24 and num_video_frames(12.1, 2.0) == 25
    assert frame_index_at(0.1 * 3, 10.0) == 3  # 0.30000000000000004 * 10 must not round up to frame 4
    assert [frame_index_at(t, 2.0) for t in (0.0, 0.2, 0.5, 0.51)] == [0, 1, 1, 2]


def test_dialogue_from_events():
    events = [(1.2, "c"), (0.2, "a"), (1.0, "b"), (1.4, "c2 on the same frame as c"), (5.0, "e at the very end")]
    d = dialogue_from_events(events, fps=2.0, duration=5.0, instruction="Narrate.", video="v.mp4")
    assert d.turns == (
        StreamTurn(1, learn=False), TextTurn("user", "Narrate.", 0.0), TextTurn("assistant", "Okay.", 0.0),
        StreamTurn(1), TextTurn("assistant", "a", 0.5),  # 0.2 s -> frame ceil(0.4) = 1
        StreamTurn(1), TextTurn("assistant", "b", 1.0),  # exactly on frame 2
        StreamTurn(1), TextTurn("assistant", "c", 1.5),  # 1.2 s -> frame 3; 1.4 s also frame 3: dropped
        StreamTurn(6), TextTurn("assistant", "e at the very end", 4.5),  # 5.0 s -> frame 10, clamped to 9
    )
    assert [e.text for e in d.events] == ["a", "b", "c", "e at the very end"]
    assert d.num_frames == d.video_frames == 10


def test_dialogue_from_events_ends_with_silent_frames_and_rejects_late_events():
    d = dialogue_from_events([Event(0.0, "now")], fps=1.0, duration=4.0, instruction="Go.")
    # Frame 0's decision belongs to the instruction, so an event at 0 s is narrated after frame 1.
    assert d.turns[3:] == (StreamTurn(1), TextTurn("assistant", "now", 1.0), StreamTurn(2))
    one = dialogue_from_events([Event(0.2, "x")], fps=1.0, duration=1.0, instruction="Go.")
    assert one.turns == (StreamTurn(1, learn=False), TextTurn("user", "Go.", 0.0), TextTurn("assistant", "Okay.", 0.0))
    assert one.events == ()
    with pytest.raises(DialogueError, match=r"events\[0\]\.time: 4\.500 s is after the end"):
        dialogue_from_events([(4.5, "late")], fps=1.0, duration=4.0, instruction="Go.")
