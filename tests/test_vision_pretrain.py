"""Vision pretraining: frame labels follow the annotation; training changes the tower only, deterministically."""

from __future__ import annotations

import json

import pytest
import torch

from liveserve.data.dialogue import Dialogue, Event, StreamTurn, load_dialogues
from liveserve.data.synthetic import write_dataset
from liveserve.model.loading import load_model
from liveserve.train.vision_pretrain import LABELS, PRETRAIN_LOG, VisionPretrainConfig, frame_labels, main, pretrain_vision


def _in_view(row: torch.Tensor) -> set[str]:
    return {name for name, on in zip(LABELS, row.tolist()) if on}


def test_frame_labels_follow_the_events():
    events = (Event(0.2, "A red square appears."), Event(1.3, "A blue circle appears."),
              Event(2.0, "The red square turns green."), Event(2.6, "The blue circle moves left."),
              Event(3.1, "The blue circle leaves."))
    dialogue = Dialogue("v.mp4", fps=2.0, duration=4.0, turns=(StreamTurn(8),), events=events)
    rows = [_in_view(r) for r in frame_labels(dialogue)]
    assert rows == [set(), {"red", "square"}, {"red", "square"}, {"red", "square", "blue", "circle"},
                    {"green", "square", "blue", "circle"}, {"green", "square", "blue", "circle"},
                    {"green", "square", "blue", "circle"}, {"green", "square"}]


def test_frame_labels_reject_a_sentence_that_is_no_narration():
    dialogue = Dialogue("v.mp4", fps=2.0, duration=2.0, turns=(StreamTurn(4),), events=(Event(0.2, "Hello."),))
    with pytest.raises(ValueError, match="not a synthetic narration"):
        frame_labels(dialogue)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("synth"), num_videos=2, seed=5)


def test_labels_of_a_synthetic_clip_match_its_frames(dataset):
    dialogue = load_dialogues(dataset / "dialogues.json")[0]
    labels = frame_labels(dialogue)
    assert labels.shape == (dialogue.num_frames, len(LABELS))
    shapes, colours = labels[:, :3].sum(1), labels[:, 3:].sum(1)
    # Each shape in view has one colour (two shapes may share one); at most two shapes are in view.
    assert torch.equal(shapes > 0, colours > 0) and (colours <= shapes).all() and shapes.max() <= 2
    assert shapes.max() >= 1


def test_pretraining_changes_the_tower_only_and_is_deterministic(tiny_dir, dataset, tmp_path):
    torch.set_num_threads(1)
    base = load_model(tiny_dir, device="cpu", dtype=torch.float32)
    runs = [pretrain_vision(VisionPretrainConfig(str(dataset), str(tiny_dir), str(tmp_path / name), steps=3, batch=4,
                                                 log_every=1), log=lambda _: None) for name in ("a", "b")]
    a, b = (load_model(r, device="cpu", dtype=torch.float32) for r in runs)
    for k, v in a.vision.tower.state_dict().items():
        torch.testing.assert_close(b.vision.tower.state_dict()[k], v, rtol=0, atol=0)
    assert any(not torch.equal(v, base.vision.tower.state_dict()[k]) for k, v in a.vision.tower.state_dict().items())
    for k, v in base.lm.state_dict().items():
        torch.testing.assert_close(a.lm.state_dict()[k], v, rtol=0, atol=0)
    for k, v in base.connector.state_dict().items():
        torch.testing.assert_close(a.connector.state_dict()[k], v, rtol=0, atol=0)
    log = [json.loads(line) for line in (runs[0] / PRETRAIN_LOG).read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]


def test_bad_settings_get_a_clear_error(tmp_path, capsys):
    assert main(["--data", str(tmp_path), "--model", str(tmp_path), "--out", str(tmp_path / "o"), "--steps", "0"]) == 2
    assert "steps, batch and log_every must be >= 1" in capsys.readouterr().err
