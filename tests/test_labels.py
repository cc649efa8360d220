"""Inputs and labels for streaming dialogues: hand-built expectations, label invariants, and the exact token
sequence a Session feeds when its decisions and replies follow the dialogue."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from liveserve.config import SessionConfig
from liveserve.data.dialogue import Dialogue, StreamTurn, TextTurn
from liveserve.data.labels import (IGNORE, PROACTIVE, QUERY, TRAILING, LabelError, TurnSpan, build_example,
                                   example_turns)
from liveserve.data.synthetic import synthesize
from liveserve.engine.live.session import Session
from liveserve.model.template import DEFAULT_SYSTEM_PROMPT, StreamTemplate
from liveserve.model.tiny import build_tiny_tokenizer

V = 10
Q = "what is happening now?"


@pytest.fixture(scope="module")
def template() -> StreamTemplate:
    return StreamTemplate.from_tokenizer(build_tiny_tokenizer(), V)


def A(content: str, time: float, learn: bool = True) -> TextTurn:
    return TextTurn("assistant", content, time, learn)


def U(content: str, time: float) -> TextTurn:
    return TextTurn("user", content, time)


def mixed_dialogue() -> Dialogue:
    """Proactive reply, learn=k, a query mid-stream (unlearned reply), a query right after a reply, trailing frames."""
    return Dialogue("v.mp4", 1.0, 10.0, (
        StreamTurn(2),  # frames 0-1: silent, then fire
        A("red", 1.0),
        StreamTurn(3, learn=1),  # frames 2-4: only frame 2's decision is learned
        U(Q, 4.5),  # interrupts after frame 4 (4.0 s), before frame 5 (5.0 s)
        A("square", 4.5, learn=False),
        U("where", 4.6),
        A("red square", 4.6),
        StreamTurn(2),  # frames 5-6: silent to the end
    ))


class Seq:
    """A token sequence assembled from named pieces, each tokenized on its own."""

    def __init__(self, tok) -> None:
        self.tok, self.ids, self.spans = tok, [], {}

    def add(self, name: str, ids) -> None:
        ids = ids if isinstance(ids, list) else self.tok(ids, add_special_tokens=False)["input_ids"]
        self.spans[name] = (len(self.ids), len(self.ids) + len(ids))
        self.ids += ids

    def last(self, name: str) -> int:
        return self.spans[name][1] - 1


def test_hand_built_sequence_and_labels(template):
    tok = template.tokenizer
    comma, respond, eos, v = (tok(",", add_special_tokens=False)["input_ids"][0],
                              tok("]\n", add_special_tokens=False)["input_ids"][0], tok.eos_token_id,
                              tok.convert_tokens_to_ids("<v>"))
    s = Seq(tok)
    s.add("start", f"{tok.bos_token}{DEFAULT_SYSTEM_PROMPT}\n\n[")
    s.add("f0", [v] * V)
    s.add("c0", [comma])
    s.add("f1", [v] * V)
    s.add("reply_prompt", "]\nAssistant:")
    s.add("red", " red")
    s.add("eos1", [eos])
    s.add("open1", "\n[")
    s.add("f2", [v] * V)
    s.add("c2", [comma])
    s.add("f3", [v] * V)
    s.add("c3", [comma])
    s.add("f4", [v] * V)
    s.add("query", f"]\nUser: {Q}\nAssistant:")
    s.add("square", " square")
    s.add("eos2", [eos])
    s.add("query2", "\nUser: where\nAssistant:")
    s.add("red_square", " red square")
    s.add("eos3", [eos])
    s.add("open2", "\n[")
    s.add("f5", [v] * V)
    s.add("c5", [comma])
    s.add("f6", [v] * V)
    assert s.spans["reply_prompt"][0] == s.last("f1") + 1 and s.ids[s.last("f1") + 1] == respond

    labels = [IGNORE] * len(s.ids)
    for frame, target in [("f0", comma), ("f1", respond), ("f2", comma), ("f5", comma), ("f6", comma)]:
        labels[s.last(frame)] = target
    red_lm = list(range(s.last("reply_prompt"), s.last("red") + 1))  # predicting " red" then eos
    rs_lm = list(range(s.last("query2"), s.last("red_square") + 1))
    for positions, piece, end in [(red_lm, "red", "eos1"), (rs_lm, "red_square", "eos3")]:
        targets = s.ids[s.spans[piece][0]:s.spans[end][1]]
        assert len(targets) == len(positions)
        for p, target in zip(positions, targets):
            labels[p] = target

    ex = build_example(mixed_dialogue(), template)
    assert ex.input_ids.tolist() == s.ids
    assert ex.labels.tolist() == labels
    assert ex.num_frames == 7
    assert ex.frame_positions.tolist() == [list(range(*s.spans[f"f{i}"])) for i in range(7)]
    decisions = [s.last(f) for f in ("f0", "f1", "f2", "f5", "f6")]
    assert ex.decision_positions.tolist() == decisions
    assert ex.lm_positions.tolist() == red_lm + rs_lm
    assert ex.turns == (TurnSpan(PROACTIVE, 1, tuple(decisions[:2]), (0, 1), tuple(red_lm)),
                        TurnSpan(QUERY, 4, (decisions[2],), (2,), ()),
                        TurnSpan(QUERY, 6, (), (), tuple(rs_lm)),
                        TurnSpan(TRAILING, -1, tuple(decisions[3:]), (5, 6), ()))
    assert [(d.tolist(), lm.tolist()) for d, lm in example_turns(ex)] == [
        (decisions[:2], red_lm), ([decisions[2]], []), ([], rs_lm), (decisions[3:], [])]


def test_first_query_before_any_frame(template):
    tok = template.tokenizer
    d = Dialogue("v.mp4", 2.0, 3.0, (U("Narrate.", 0.0), A("Okay.", 0.0), StreamTurn(1)))
    ex = build_example(d, template, system_prompt="Be brief.")
    prompt = tok(f"{tok.bos_token}Be brief.\n\nUser: Narrate.\nAssistant:", add_special_tokens=False)["input_ids"]
    reply = tok(" Okay.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    opening = tok("\n[", add_special_tokens=False)["input_ids"]
    assert ex.input_ids.tolist() == prompt + reply + opening + [template.v_id] * V
    assert ex.lm_positions.tolist() == list(range(len(prompt) - 1, len(prompt) - 1 + len(reply)))
    assert ex.decision_positions.tolist() == [ex.input_ids.numel() - 1]
    assert ex.labels[-1].item() == template.interval_id  # the final frame stays silent


def test_narration_starts_with_frame_zero_then_the_instruction(template):
    """Serving order: frame 0 (unlabelled), then "]\\nUser: q\\nAssistant:" answers the instruction."""
    tok = template.tokenizer
    d = synthesize(3, 0).dialogue
    ex = build_example(d, template)
    start = tok(f"{tok.bos_token}{DEFAULT_SYSTEM_PROMPT}\n\n[", add_special_tokens=False)["input_ids"]
    query = tok(f"]\nUser: {d.turns[1].content}\nAssistant:", add_special_tokens=False)["input_ids"]
    ack = tok(" Okay.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    opening = tok("\n[", add_special_tokens=False)["input_ids"]
    head = start + [template.v_id] * V + query + ack + opening + [template.v_id] * V
    assert ex.input_ids[:len(head)].tolist() == head
    assert ex.frame_positions[0, -1].item() not in ex.decision_positions.tolist()  # frame 0: unlabelled
    assert ex.turns[0] == TurnSpan(QUERY, 2, (), (), tuple(range(len(start) + V + len(query) - 1,
                                                                  len(start) + V + len(query) - 1 + len(ack))))
    assert ex.turns[1].decision_frames[0] == 1


def assert_label_invariants(ex, template) -> None:
    ids, labels = ex.input_ids.tolist(), ex.labels.tolist()
    decisions, lm = set(ex.decision_positions.tolist()), set(ex.lm_positions.tolist())
    assert not decisions & lm
    assert {p for p, y in enumerate(labels) if y != IGNORE} == decisions | lm  # labels sit only there
    for p, y in enumerate(labels):
        if y != IGNORE and p + 1 < len(ids):
            assert y == ids[p + 1], p  # the target at p is the next input
    frame_slots = ex.frame_positions.tolist()
    last_slots = {row[-1] for row in frame_slots}
    assert all(row == list(range(row[0], row[0] + V)) for row in frame_slots)
    assert sum(i == template.v_id for i in ids) == ex.num_frames * V == ex.frame_positions.numel()
    assert decisions <= last_slots  # decisions are read at a frame's last <v> ...
    assert {labels[p] for p in decisions} <= {template.interval_id, template.respond_id}
    for p in lm:  # ... reply targets are reply tokens: never a <v>, "," or "]\n"
        assert ids[p + 1] not in (template.v_id, template.interval_id, template.respond_id)


def test_label_invariants_on_narration_and_mixed(template):
    for d in (synthesize(3, 0).dialogue, synthesize(3, 1).dialogue, mixed_dialogue()):
        ex = build_example(d, template)
        assert_label_invariants(ex, template)
        assert ex.num_frames == d.num_frames
        proactive = sum(1 for i, t in enumerate(d.turns) if i and isinstance(t, TextTurn)
                        and t.role == "assistant" and isinstance(d.turns[i - 1], StreamTurn))
        assert (ex.labels == template.respond_id).sum().item() == proactive
        eos_targets = (ex.labels == template.eos_id).sum().item()
        assert eos_targets == sum(1 for t in d.turns if isinstance(t, TextTurn) and t.role == "assistant" and t.learn)
        # Every decision and every reply is in exactly one evaluation turn.
        assert sorted(p for s in ex.turns for p in s.decision_positions) == ex.decision_positions.tolist()
        assert sorted(p for s in ex.turns for p in s.lm_positions) == ex.lm_positions.tolist()


def test_learn_flags(template):
    base = build_example(mixed_dialogue(), template)
    off = mixed_dialogue()
    off = dataclasses.replace(off, turns=tuple(dataclasses.replace(t, learn=False) for t in off.turns))
    ex = build_example(off, template)
    assert torch.equal(ex.input_ids, base.input_ids)  # learn flags change labels only
    assert (ex.labels == IGNORE).all() and ex.decision_positions.numel() == ex.lm_positions.numel() == 0
    all_learned = build_example(dataclasses.replace(mixed_dialogue(), turns=tuple(
        dataclasses.replace(t, learn=True) for t in mixed_dialogue().turns)), template)
    # learn=1 on frames 2-4 dropped frame 3's decision; frame 4 stays unlabelled (a user turn follows).
    extra = set(all_learned.decision_positions.tolist()) - set(base.decision_positions.tolist())
    assert extra == {all_learned.frame_positions[3, -1].item()}


def test_label_errors(template):
    with pytest.raises(LabelError, match="turn 2: a user turn must be followed by an assistant turn"):
        build_example(Dialogue("v", 1.0, 5.0, (StreamTurn(1), A("a", 0.0), U(Q, 0.5), StreamTurn(1))), template)
    with pytest.raises(LabelError, match="turn 1: a user turn must be followed"):
        build_example(Dialogue("v", 1.0, 5.0, (StreamTurn(1), U(Q, 0.5))), template)
    with pytest.raises(LabelError, match="turn 1: the reply text encodes to the frame placeholder"):
        build_example(Dialogue("v", 1.0, 5.0, (StreamTurn(1), A("look <v> here", 0.0))), template)
    with pytest.raises(LabelError, match="turn 0: the user query text encodes to the eos token"):
        build_example(Dialogue("v", 1.0, 5.0, (U(f"hi{template.tokenizer.eos_token}", 0.0), A("a", 0.0))), template)
    odd = dataclasses.replace(template, stream_reply_ids=(template.interval_id,) + template.stream_reply_ids)
    with pytest.raises(LabelError, match="does not start with the respond id"):
        build_example(mixed_dialogue(), odd)


# ---- against the engine ------------------------------------------------------------------------------------------

def scripted(model, script: list[int]):
    """A copy of `model` whose lm_head boosts script[i] at its i-th call (one logits row per forward)."""
    model = copy.deepcopy(model)
    script = list(script)

    def hook(_module, _inputs, output):
        boost = torch.zeros_like(output)
        boost[..., script.pop(0)] = 100.0  # IndexError: more forwards than scripted
        return output + boost

    model.lm.lm_head.register_forward_hook(hook)
    return model, script


def session_script(d: Dialogue, template: StreamTemplate) -> list[int]:
    """The argmax of every forward a session runs when it follows `d`: a decision per frame, reply tokens + eos."""
    script = []
    for i, turn in enumerate(d.turns):
        if isinstance(turn, StreamTurn):
            fires = i + 1 < len(d.turns) and isinstance(d.turns[i + 1], TextTurn) and d.turns[i + 1].role == "assistant"
            script += [template.interval_id] * (turn.num_frames - 1)
            script.append(template.respond_id if fires else template.interval_id)
        elif turn.role == "assistant":
            script += template.encode(" " + turn.content) + [template.eos_id]
    return script


def replay(model, d: Dialogue, *, live: bool, queries_first: bool = False) -> tuple[list[int], list[list[int]]]:
    """Feed `d`'s frames and queries to a scripted session. live=True processes after every input (a live
    feed); otherwise everything is queued first and processed in stream-time order. queries_first pushes a
    query before any frame at the same time (as `liveserve run` does). Returns the token ids fed (frame
    slots as <v>) and each frame's cache positions."""
    model, script = scripted(model, session_script(d, model.template))
    session = Session(model, SessionConfig())
    session.trace = []
    g = torch.Generator().manual_seed(0)
    pushes, frame = [], 0
    for turn in d.turns:
        if isinstance(turn, TextTurn) and turn.role == "user":
            pushes.append((turn.time, 0, turn.content))
        elif isinstance(turn, StreamTurn):
            for _ in range(turn.num_frames):
                pushes.append((frame / d.fps, 1, torch.randn(V, model.vision_hidden_size, generator=g)))
                frame += 1
    if queries_first:
        pushes.sort(key=lambda p: (p[0], p[1]))
    for timestamp, kind, payload in pushes:
        if kind == 0:
            session.push_query(timestamp, payload)
        else:
            session.push_frame(timestamp, payload)
        if live:
            list(session.process())
    list(session.process())
    assert script == [], "fewer forwards than scripted"
    fed, frames = [], []
    for tr in session.trace:
        fed += list(tr.ids) + [model.template.v_id] * tr.num_frame_tokens
        if tr.num_frame_tokens:
            frames.append(tr.positions[-tr.num_frame_tokens:].tolist())
    return fed, frames


@pytest.fixture
def one_thread():
    """The tiny model's matmuls gain nothing from threads, and thread spin-waits crawl on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("which, live, queries_first", [
    ("narration", True, False), ("narration", False, True), ("mixed", False, False), ("mixed", True, False)])
def test_session_feeds_exactly_the_example(tiny_model, one_thread, which, live, queries_first):
    d = synthesize(2, 0, fps=2.0).dialogue if which == "narration" else mixed_dialogue()
    ex = build_example(d, tiny_model.template, tiny_model.system_prompt)
    fed, frames = replay(tiny_model, d, live=live, queries_first=queries_first)
    expected = ex.input_ids.tolist()
    if isinstance(d.turns[-1], TextTurn):  # a session feeds a reply's eos with its next input; none comes
        assert expected[-1] == tiny_model.template.eos_id
        expected = expected[:-1]
    assert fed == expected
    assert frames == ex.frame_positions.tolist()
