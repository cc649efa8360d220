"""Evaluation on constructed cases: a scripted "model" whose argmax is chosen per position, so every metric
has a hand-computed value; and the free-running pass scored against event times."""

from __future__ import annotations

import math

import pytest
import torch

from liveserve.data.dialogue import dialogue_from_events
from liveserve.data.labels import PROACTIVE, QUERY, TRAILING, build_example
from liveserve.data.synthetic import write_dataset
from liveserve.train import evaluate as ev
from liveserve.train.trainer import Sample

# fps 1: frame 0 + instruction, events on frames 3 and 7, trailing frames 8-9.
DIALOGUE = dialogue_from_events([(2.5, "A red square appears."), (6.5, "The red square turns blue.")], fps=1.0,
                                duration=10.0, instruction="Please narrate the video in real time.", video="v.mp4")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only add spin-wait overhead on a busy machine
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def scripted(monkeypatch, tiny_model):
    """Make the forward an oracle for reply tokens and fire exactly at the frames in `fire_at`."""
    fire_at: set[int] = set()
    t = tiny_model.template
    vocab = tiny_model.lm.config.vocab_size + 1

    def logits_at(_model, ids, positions):
        out = torch.zeros(len(positions), vocab)
        for row, p in enumerate(positions.tolist()):
            if ids[p] == t.v_id:  # a decision: which frame is this?
                frame = int((ids[:p + 1] == t.v_id).sum()) // t.frame_num_tokens - 1
                out[row, t.respond_id if frame in fire_at else t.interval_id] = 30.0
            else:  # a reply token: the teacher-forced next id
                out[row, ids[p + 1]] = 30.0
        return out

    monkeypatch.setattr(ev, "input_embeddings", lambda _m, ids, _rows, _f: ids.clone())
    monkeypatch.setattr(ev, "hidden_states", lambda _m, x: x)
    monkeypatch.setattr(ev, "logits_at", logits_at)
    return fire_at


def sample(model) -> Sample:
    return Sample("v.mp4", build_example(DIALOGUE, model.template, model.system_prompt), torch.zeros(10, 10, 32))


def test_turn_layout(tiny_model):
    ex = sample(tiny_model).example
    assert [(s.trigger, s.decision_frames) for s in ex.turns] == [
        (QUERY, ()), (PROACTIVE, (1, 2, 3)), (PROACTIVE, (4, 5, 6, 7)), (TRAILING, (8, 9))]


def test_on_time_model_scores_perfectly(tiny_model, scripted):
    scripted.update({3, 7})
    turns = ev.score_dialogue(tiny_model, sample(tiny_model))
    assert [t.diff for t in turns] == [None, 0, 0, 0]
    assert all(t.fluency == 1.0 for t in turns)
    assert all(t.correct_prefix == len(t.nlls) for t in turns)
    assert all(math.exp(sum(t.nlls) / len(t.nlls)) < 1.0001 for t in turns if t.nlls)


def test_late_and_early_turns(tiny_model, scripted):
    scripted.update({4, 8})  # one frame late for both events
    s = sample(tiny_model)
    turns = ev.score_dialogue(tiny_model, s)
    l1, l2 = (len(span.lm_positions) for span in s.example.turns[1:3])
    # Turn 1 never fires; frames 4-5 are appended (min(4 next, 3 - 1)) and frame 4 fires: 1 frame late.
    # Turn 2 fires at its first frame (4): 3 frames early. The trailing turn fires at frame 8: 1 early.
    assert [t.diff for t in turns] == [None, -1, 3, 1]
    assert [t.fluency for t in turns] == [1.0, (3 - 1) / (3 + l1), (4 - 3) / (4 + l2), (2 - 1) / 2]


def test_never_firing_turn_is_late_by_the_appended_frames(tiny_model, scripted):
    turns = ev.score_dialogue(tiny_model, sample(tiny_model))
    assert [t.diff for t in turns] == [None, -2, -2, 0]  # min(4 next, 3 - 1) and min(2 next, 4 - 1) frames


def test_evaluate_aggregates_per_turn_then_per_video(tiny_model, scripted, tmp_path):
    scripted.update({4, 8})
    s = sample(tiny_model)
    (tmp_path / "dialogues.json").write_text("[]")
    from liveserve.data.dialogue import save_dialogues

    save_dialogues(tmp_path / "dialogues.json", [DIALOGUE])
    out = ev.evaluate(tiny_model, tmp_path, stream=False, samples=[s])
    assert out["time_diff_s"] == pytest.approx((1 + 3 + 1) / 3)
    assert out["lm_ppl"] == pytest.approx(1.0, abs=1e-3) and out["lm_correctness"] == 1.0
    turns = ev.score_dialogue(tiny_model, s)
    assert out["fluency"] == pytest.approx(sum(t.fluency for t in turns) / 4)


def test_summarize_stream_pools_counts_over_videos():
    a = ev.StreamResult((1.2, 5.0), ("A red square appears.", "wrong"), (1.0, 4.6), ("A red square appears.", "x"))
    b = ev.StreamResult((), (), (3.0,), ("y",))
    out = ev.summarize_stream([a, b])
    assert (out["matched"], out["responses"], out["events"]) == (2, 2, 3)
    assert out["precision"] == 1.0 and out["recall"] == pytest.approx(2 / 3)
    assert out["within_1s"] == pytest.approx(2 / 3) and out["text_accuracy"] == 0.5
    assert out["mean_lag_s"] == pytest.approx((0.2 + 0.4) / 2)
    assert out["by_kind"]["appears"] == {"matched": 1, "text_accuracy": 1.0}  # "x" is of no kind


def test_narration_scores_per_kind_colour_and_shape():
    out = ev.narration_scores([
        ("A red square appears.", "A red square appears."),
        ("A blue square appears.", "A red square appears."),  # wrong colour
        ("The red circle turns green.", "The red circle turns blue."),  # the new colour is wrong
        ("The red square leaves.", "The red circle leaves."),  # wrong shape
        ("The red circle moves up.", "The red circle moves left."),  # colour and shape right, direction wrong
    ])
    assert out["colour_accuracy"] == pytest.approx(3 / 5) and out["shape_accuracy"] == pytest.approx(4 / 5)
    assert out["by_kind"] == {"appears": {"matched": 2, "text_accuracy": 0.5},
                              "moves": {"matched": 1, "text_accuracy": 0.0},
                              "turns": {"matched": 1, "text_accuracy": 0.0},
                              "leaves": {"matched": 1, "text_accuracy": 0.0}}
    empty = ev.narration_scores([])
    assert empty["colour_accuracy"] == empty["shape_accuracy"] == 0.0
    assert all(v == {"matched": 0, "text_accuracy": 0.0} for v in empty["by_kind"].values())


def test_summary_line():
    teacher = {"lm_ppl": 1.234, "time_diff_s": 0.5, "fluency": 0.8, "lm_correctness": 0.7}
    assert ev.summary_line(teacher) == "LM-PPL 1.23, TimeDiff 0.500 s, fluency 0.800, LM-correctness 0.700"
    streamed = ev.summarize_stream([ev.StreamResult((1.2,), ("The red circle turns green.",), (1.0,),
                                                    ("The red circle turns blue.",))])
    line = ev.summary_line({**teacher, **streamed})
    assert line.startswith("text accuracy 0.000 (appears 0.000, moves 0.000, turns 0.000, leaves 0.000), "
                           "colour 0.000, shape 1.000; precision 1.000, recall 1.000, within_1s 1.000; LM-PPL 1.23")


def test_streaming_pass_runs_sessions_on_real_features(tiny_model, tmp_path):
    data = write_dataset(tmp_path / "d", num_videos=1, seed=9)
    out = ev.evaluate(tiny_model, data, max_new_tokens=2)
    assert out["videos"] == 1 and out["events"] > 0
    assert out["responses"] >= out["matched"] and 0.0 <= out["precision"] <= 1.0
    assert {"lm_ppl", "time_diff_s", "fluency", "recall", "within_1s", "text_accuracy", "colour_accuracy",
            "shape_accuracy", "by_kind"} <= set(out)
    assert sum(v["matched"] for v in out["by_kind"].values()) <= out["matched"]
