"""The synthetic dataset: determinism, event timing, visibility of every event, and the files it writes."""

from __future__ import annotations

import math
import re

import av
import numpy as np
import pytest

from liveserve.data.dialogue import StreamTurn, TextTurn, frame_index_at, load_dialogues
from liveserve.data.synthetic import (COLOURS, INSTRUCTION, SHAPES, Narration, generate, main, parse_narration,
                                      render_video, synthesize, write_dataset)
from liveserve.video import iter_video_frames, probe_video

FPS = 2.0
NARRATION = re.compile(r"^(?:(?:A|An) (\w+) (\w+) appears|The (\w+) (\w+) (?:moves (left|right|up|down)|turns (\w+)|"
                       r"leaves))\.$")


@pytest.fixture(scope="module")
def videos():
    return generate(seed=11, num_videos=12, fps=FPS)


def test_same_seed_same_data_and_videos_independent_of_count(videos):
    again = generate(seed=11, num_videos=3, fps=FPS)
    for a, b in zip(videos[:3], again):
        assert a.name == b.name and a.dialogue == b.dialogue and a.spec == b.spec
        assert np.array_equal(a.frames, b.frames)
    other = generate(seed=12, num_videos=1, fps=FPS)[0]
    assert other.dialogue != videos[0].dialogue and other.spec.events != videos[0].spec.events


def test_clip_shape_duration_and_event_count(videos):
    for v in videos:
        assert v.frames.dtype == np.uint8 and v.frames.shape[1:] == (128, 128, 3)
        assert len(v.frames) == math.ceil(v.spec.duration * FPS) == v.dialogue.num_frames
        assert 12 <= v.spec.duration <= 20
        assert 3 <= len(v.events) <= 8
    assert len({len(v.events) for v in videos}) > 1 and len({v.spec.duration for v in videos}) > 1


def test_events_are_apart_on_distinct_frames_and_narrated(videos):
    for v in videos:
        times = [e.time for e in v.events]
        assert all(b - a >= 2.0 for a, b in zip(times, times[1:])), times
        frames = [frame_index_at(t, FPS) for t in times]
        assert len(set(frames)) == len(frames) and frames[-1] < len(v.frames)
        for e in v.events:
            m = NARRATION.match(e.text)
            assert m, e.text
            colour, shape = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
            assert colour in COLOURS and shape in SHAPES
        # The dialogue narrates each event right after its frame, after frame 0, the instruction and
        # its acknowledgement (the serving order).
        turns = v.dialogue.turns
        assert turns[0] == StreamTurn(1, learn=False) and turns[1] == TextTurn("user", INSTRUCTION, 0.0)
        assert turns[2].role == "assistant"
        replies = [(i, t) for i, t in enumerate(turns) if isinstance(t, TextTurn) and t.role == "assistant"][1:]
        assert [t.content for _, t in replies] == [e.text for e in v.events]
        covered = [sum(t.num_frames for t in turns[:i] if isinstance(t, StreamTurn)) - 1 for i, _ in replies]
        assert covered == frames
        assert v.dialogue.events == v.events


@pytest.mark.parametrize("text, parts", [
    ("An orange triangle appears.", Narration("appears", ("orange",), "triangle")),
    ("The red circle moves left.", Narration("moves", ("red",), "circle")),
    ("The red circle turns blue.", Narration("turns", ("red", "blue"), "circle")),
    ("The white square leaves.", Narration("leaves", ("white",), "square")),
    ("the blue blue frame", Narration(None, ("blue", "blue"), None)),  # a garbled reply: what it names
])
def test_parse_narration(text, parts):
    assert parse_narration(text) == parts


def test_every_event_sentence_parses_to_its_kind_colours_and_shape(videos):
    for v in videos:
        for e in v.events:
            parts = parse_narration(e.text)
            assert parts.kind is not None and parts.shape is not None, e.text
            assert len(parts.colours) == (2 if parts.kind == "turns" else 1), e.text


def _centre_pixel(track, t: float) -> tuple[int, int]:
    x, y = track.centres(np.array([t]))[0]
    return int(y), int(x)


def _event_track(spec, event):
    """The track an event is about, and what happens to it."""
    for tr in spec.tracks:
        if tr.appear == event.time:
            return tr, "appear"
        if tr.leave == event.time:
            return tr, "leave"
        if any(t == event.time for t, _ in tr.colours[1:]):
            return tr, "colour"
        if any(m.start == event.time for m in tr.moves):
            return tr, "move"
    raise AssertionError(f"no track changes at {event}")


def test_every_event_is_visible_at_its_frame(videos):
    kinds = set()
    for v in videos:
        bg = np.array(v.spec.background)
        for event in v.events:
            k = frame_index_at(event.time, FPS)
            now, before = k / FPS, (k - 1) / FPS
            assert before < event.time < now  # strictly between frames: frame k is the first to show it
            track, kind = _event_track(v.spec, event)
            kinds.add(kind)
            names = track.colour_names(np.array([before, now]))
            rgb_before, rgb_now = (np.array(COLOURS[c]) for c in names)
            if kind == "appear":
                p = _centre_pixel(track, now)
                assert np.array_equal(v.frames[k][p], rgb_now) and np.array_equal(v.frames[k - 1][p], bg)
                assert event.text.endswith(f"{names[1]} {track.shape} appears.")
            elif kind == "leave":
                p = _centre_pixel(track, before)
                assert np.array_equal(v.frames[k - 1][p], rgb_before) and np.array_equal(v.frames[k][p], bg)
            elif kind == "colour":
                assert names[0] != names[1] and event.text == f"The {names[0]} {track.shape} turns {names[1]}."
                assert np.array_equal(v.frames[k - 1][_centre_pixel(track, before)], rgb_before)
                assert np.array_equal(v.frames[k][_centre_pixel(track, now)], rgb_now)
            else:  # a move has visibly started at frame k and goes on
                c = track.centres(np.array([before, now, now + 1 / FPS]))
                assert np.array_equal(c[0], track.centres(np.array([event.time]))[0])
                assert np.linalg.norm(c[1] - c[0]) > 2 and np.linalg.norm(c[2] - c[1]) > 5
                assert not np.array_equal(v.frames[k], v.frames[k - 1])
                direction = event.text.split()[-1].rstrip(".")
                dx, dy = c[2] - c[0]
                assert direction == (("right" if dx > 0 else "left") if abs(dx) > abs(dy)
                                     else ("down" if dy > 0 else "up"))
    assert kinds == {"appear", "leave", "colour", "move"}


def test_render_video_at_other_fps(videos):
    spec = videos[0].spec
    fast = render_video(spec, 4.0)
    assert len(fast) == math.ceil(spec.duration * 4) and np.array_equal(fast[::2], videos[0].frames)


def test_write_dataset_reads_back(tmp_path):
    seen = []
    out = write_dataset(tmp_path / "ds", num_videos=2, seed=5, progress=lambda i, n, v: seen.append((i, n, v.name)))
    expected = generate(5, 2)
    assert seen == [(1, 2, expected[0].name), (2, 2, expected[1].name)]
    dialogues = load_dialogues(out / "dialogues.json")
    assert dialogues == [v.dialogue for v in expected]
    for v, d in zip(expected, dialogues):
        path = out / d.video
        assert path.name == f"{v.name}.mp4" and probe_video(path).num_frames_at(FPS) == len(v.frames)
    v, path = expected[0], out / dialogues[0].video  # decoding is slow-ish: check one clip frame by frame
    with av.open(str(path)) as container:
        times = [float(f.time) for f in container.decode(video=0)]
    assert times == pytest.approx([i / FPS for i in range(len(v.frames))])  # the file's own clock is the stream's
    decoded = np.stack([f.pixels.permute(1, 2, 0).numpy() for f in iter_video_frames(path, fps=FPS, size=128)])
    assert decoded.shape == v.frames.shape
    decoded, rendered = decoded.astype(np.int16), v.frames.astype(np.int16)
    same = np.abs(decoded - rendered).mean(axis=(1, 2, 3))
    previous = np.abs(decoded[1:] - rendered[:-1]).mean(axis=(1, 2, 3))  # decoded i vs rendered i - 1
    assert (same < 3).all()  # lossy, but close
    changed = [i for i in range(1, len(rendered)) if not np.array_equal(rendered[i], rendered[i - 1])]
    assert changed and all(same[i] < previous[i - 1] for i in changed)  # frame i of the file is stream frame i


def test_cli(tmp_path, capsys):
    main(["--out", str(tmp_path / "cli"), "--videos", "2", "--seed", "3"])
    out = capsys.readouterr().out
    assert "[1/2] synth_s3_00000" in out and "[2/2] synth_s3_00001" in out
    assert len(load_dialogues(tmp_path / "cli" / "dialogues.json")) == 2


def test_bad_arguments():
    with pytest.raises(ValueError, match="even"):
        synthesize(0, 0, size=(127, 128))
    with pytest.raises(ValueError, match="fps"):
        synthesize(0, 0, fps=0.0)
