"""The live1+ stream template, pinned token for token against what a Session actually feeds the LM.

Expected pieces are built here from the tokenizer directly (not from StreamTemplate's helpers). The
LM's choices are scripted: a copy of the tiny model whose lm_head adds +100 to one chosen token per
forward, so every decision and every generated token is known in advance.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tokenizers import Tokenizer, models
from torch import nn
from transformers import PreTrainedTokenizerFast

from liveserve.config import SessionConfig
from liveserve.engine.events import FrameDecision, ResponseDone, ResponseStarted
from liveserve.engine.live.session import Session
from liveserve.model.template import StreamTemplate, TemplateError

REFERENCE_SYSTEM = ("A multimodal AI assistant is helping users with some activities. Below is their conversation, "
                    "interleaved with the list of video frames received by the assistant.")
V = 10  # <v> slots per frame
Q = "what is happening now?"


class Pieces:
    """The reference's token pieces, each tokenized on its own without special tokens."""

    def __init__(self, tokenizer, system: str = REFERENCE_SYSTEM) -> None:
        self.tok, self.system = tokenizer, system
        self.comma, self.respond = self.enc(","), self.enc("]\n")
        assert len(self.comma) == 1 and len(self.respond) == 1
        self.eos = (tokenizer.eos_token_id,)
        self.start = self.enc(f"{tokenizer.bos_token}{system}\n\n[")
        self.open = self.enc("\n[")
        self.reply = self.enc("]\nAssistant:")
        self.red, self.square = self.enc(" red"), self.enc(" square")
        assert len(self.red) == 1 and len(self.square) == 1

    def enc(self, text: str) -> tuple[int, ...]:
        return tuple(self.tok(text, add_special_tokens=False)["input_ids"])

    def query_in_stream(self, q: str) -> tuple[int, ...]:
        return self.enc(f"]\nUser: {q}\nAssistant:")

    def query_after_reply(self, q: str) -> tuple[int, ...]:
        return self.enc(f"\nUser: {q}\nAssistant:")

    def first_query(self, q: str) -> tuple[int, ...]:
        return self.enc(f"{self.tok.bos_token}{self.system}\n\nUser: {q}\nAssistant:")


class ScriptedHead(nn.Module):
    """lm_head that boosts script[i] by +100 at the i-th forward (one logits row per forward)."""

    def __init__(self, head: nn.Module, script: list[int]) -> None:
        super().__init__()
        self.head, self.script = head, list(script)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        assert hidden.shape[0] == 1, "a session reads one logits row per forward"
        logits = self.head(hidden)
        boost = torch.zeros_like(logits)
        boost[..., self.script.pop(0)] = 100.0  # IndexError: more forwards than scripted
        return logits + boost


@pytest.fixture
def P(tiny_model) -> Pieces:
    return Pieces(tiny_model.template.tokenizer)


def scripted(model, script):
    model = copy.deepcopy(model)  # never touch the shared fixture
    model.lm.lm_head = ScriptedHead(model.lm.lm_head, [int(t) for t in script])
    return model


def run(model, config: SessionConfig, frames=(), queries=()):
    session = Session(model, config)
    session.trace = []
    features = [torch.randn(V, model.vision_hidden_size) for _ in frames]
    for t, f in zip(frames, features):
        session.push_frame(t, f)
    for t, q in queries:
        session.push_query(t, q)
    events = list(session.process())
    return session, events, features


def fed(session) -> list[tuple[tuple[int, ...], int]]:
    return [(tr.ids, tr.num_frame_tokens) for tr in session.trace]


def decisions(events) -> list[tuple[str, bool, int]]:
    return [(e.action, e.fired, e.token_id) for e in events if isinstance(e, FrameDecision)]


def dones(events) -> list[tuple[str, str | None, str, int, str]]:
    return [(e.trigger, e.query, e.text, e.num_tokens, e.finish_reason) for e in events if isinstance(e, ResponseDone)]


def assert_script_used(model) -> None:
    assert model.lm.lm_head.script == [], "fewer forwards than scripted"


# ---- the template's own ids ---------------------------------------------------------------------


def test_template_ids(tiny_model, P):
    t, tok = tiny_model.template, tiny_model.template.tokenizer
    assert tok.decode([t.interval_id]) == ","
    assert tok.decode([t.respond_id]) == "]\n"
    assert (t.interval_id,) == P.comma and (t.respond_id,) == P.respond and t.interval_id != t.respond_id
    assert t.eos_id == tok.eos_token_id and t.bos_text == tok.bos_token
    assert t.v_id == tok.convert_tokens_to_ids("<v>") and t.v_id not in (t.interval_id, t.respond_id, t.eos_id)
    assert t.frame_num_tokens == V and tiny_model.layout.num_tokens == V
    assert t.stream_open_ids == P.open and t.stream_reply_ids == P.reply
    assert tiny_model.system_prompt == REFERENCE_SYSTEM


def _char_tokenizer(merge_respond: bool, bos: bool = True) -> PreTrainedTokenizerFast:
    vocab = {c: i for i, c in enumerate(["<s>", "</s>", ",", "]", "\n", "[", "a", " ", ":"])}
    merges = []
    if merge_respond:
        vocab["]\n"] = len(vocab)
        merges = [("]", "\n")]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.add_special_tokens(["<s>", "</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>" if bos else None, eos_token="</s>")


def test_template_error_when_respond_is_not_one_token():
    tok = _char_tokenizer(merge_respond=False)
    assert tok("]\n", add_special_tokens=False)["input_ids"] == [3, 4]
    with pytest.raises(TemplateError, match=r"respond.*\[3, 4\]"):
        StreamTemplate.from_tokenizer(tok, V)


def test_template_from_tokenizer_with_merged_respond():
    t = StreamTemplate.from_tokenizer(_char_tokenizer(merge_respond=True), V)
    assert (t.interval_id, t.respond_id, t.eos_id, t.bos_text) == (2, 9, 1, "<s>")
    assert t.v_id == 10  # "<v>" was added as a special token
    assert t.stream_open_ids == (4, 5)


def test_a_tokenizer_without_bos_starts_the_stream_with_the_system_prompt():
    """Qwen2's tokenizers have no bos token: the stream is the same, without it."""
    tokenizer = _char_tokenizer(merge_respond=True, bos=False)
    template = StreamTemplate.from_tokenizer(tokenizer, V)
    assert template.bos_text == ""
    assert template.start_ids("S") == template.encode("S\n\n[")


# ---- streams ------------------------------------------------------------------------------------


@pytest.mark.parametrize("system", [None, "Narrate the video."])
def test_silent_stream_of_three_frames(tiny_model, system):
    P = Pieces(tiny_model.template.tokenizer, system or REFERENCE_SYSTEM)
    model = scripted(tiny_model, P.comma * 3)
    s, events, feats = run(model, SessionConfig(system_prompt=system), frames=[0.0, 1.0, 2.0])
    assert_script_used(model)
    assert fed(s) == [(P.start, V), (P.comma, V), (P.comma, V)]
    assert decisions(events) == [("silent", False, P.comma[0])] * 3
    assert [e.frame_index for e in events] == [0, 1, 2]
    assert all(e.p_silent > 0.99 for e in events)
    # Positions are contiguous; a steady-state frame is exactly 11 tokens ("," + 10 <v>).
    n0 = len(P.start) + V
    assert [tr.positions.tolist() for tr in s.trace] == [list(range(n0)), list(range(n0, n0 + 11)),
                                                         list(range(n0 + 11, n0 + 22))]
    assert s.trace[-1].kept_positions.tolist() == list(range(n0 + 22))
    assert [e.cache_tokens for e in events] == [n0, n0 + 11, n0 + 22]
    # The <v> slots carry the connector's output for the frame features, the text slots token embeddings.
    with torch.no_grad():
        assert torch.equal(s.trace[1].embeds[:1], model.embed_ids(list(P.comma)))
        assert torch.allclose(s.trace[1].embeds[1:], model.embed_frames(feats[1][None]), atol=1e-6)
        assert torch.equal(s.trace[0].embeds[:-V], model.embed_ids(list(P.start)))


def test_proactive_reply_ends_by_eos_then_next_frame(tiny_model, P):
    model = scripted(tiny_model, P.respond + P.red + P.eos + P.comma)
    s, events, _ = run(model, SessionConfig(), frames=[0.0, 1.0])
    assert_script_used(model)
    # eos is not fed when generated; it opens the next frame together with "\n[".
    assert fed(s) == [(P.start, V), (P.reply, 0), (P.red, 0), (P.eos + P.open, V)]
    assert decisions(events) == [("respond", True, P.respond[0]), ("silent", False, P.comma[0])]
    assert dones(events) == [("proactive", None, " red", 2, "eos")]
    assert [type(e).__name__ for e in events][:2] == ["FrameDecision", "ResponseStarted"]


def test_reply_hits_cap_then_next_frame(tiny_model, P):
    model = scripted(tiny_model, P.respond + P.red + P.square + P.comma)
    s, events, _ = run(model, SessionConfig(max_new_tokens=2), frames=[0.0, 1.0])
    assert_script_used(model)
    # The capped reply's last token is fed late, with the eos that closes the turn and "\n[".
    assert fed(s) == [(P.start, V), (P.reply, 0), (P.red, 0), (P.square + P.eos + P.open, V)]
    assert dones(events) == [("proactive", None, " red square", 2, "length")]


def test_threshold_one_fires_every_frame(tiny_model, P):
    """Unscripted: with threshold 1.0 every frame fires; greedy tokens are the argmax of the traced logits."""
    s, events, _ = run(tiny_model, SessionConfig(threshold=1.0, max_new_tokens=1), frames=[0.0, 1.0, 2.0])
    assert [(a, f) for a, f, _ in decisions(events)] == [("respond", True)] * 3
    assert all(t != P.comma[0] for _, _, t in decisions(events))
    g = [int(s.trace[i].logits.argmax()) for i in (1, 3, 5)]
    assert P.eos[0] not in g
    assert fed(s) == [(P.start, V), (P.reply, 0), ((g[0],) + P.eos + P.open, V), (P.reply, 0),
                      ((g[1],) + P.eos + P.open, V), (P.reply, 0)]
    assert [d[3:] for d in dones(events)] == [(1, "length")] * 3


def test_query_mid_stream(tiny_model, P):
    model = scripted(tiny_model, P.comma * 2 + P.red + P.eos + P.comma)
    s, events, _ = run(model, SessionConfig(), frames=[0.0, 1.0, 2.0], queries=[(1.5, Q)])
    assert_script_used(model)
    # The pending "," after frame 1 is dropped: "]" closes the stream.
    assert fed(s) == [(P.start, V), (P.comma, V), (P.query_in_stream(Q), 0), (P.red, 0), (P.eos + P.open, V)]
    assert decisions(events) == [("silent", False, P.comma[0])] * 3
    assert dones(events) == [("query", Q, " red", 2, "eos")]
    started = [e for e in events if isinstance(e, ResponseStarted)]
    assert [(e.timestamp, e.trigger, e.query) for e in started] == [(1.5, "query", Q)]


def test_query_at_frame_time_preempts_decision(tiny_model, P):
    # The model would respond at frame 1, but the query at t=1 takes over right after that frame's forward.
    model = scripted(tiny_model, P.comma + P.respond + P.red + P.eos + P.comma)
    s, events, _ = run(model, SessionConfig(), frames=[0.0, 1.0, 2.0], queries=[(1.0, Q)])
    assert_script_used(model)
    assert fed(s) == [(P.start, V), (P.comma, V), (P.query_in_stream(Q), 0), (P.red, 0), (P.eos + P.open, V)]
    assert [(a, f) for a, f, _ in decisions(events)] == [("silent", False), ("query", False), ("silent", False)]
    assert [type(e).__name__ for e in events][1:3] == ["FrameDecision", "ResponseStarted"]
    assert dones(events) == [("query", Q, " red", 2, "eos")]


def test_query_before_any_frame(tiny_model, P):
    model = scripted(tiny_model, P.red + P.eos + P.comma)
    s, events, _ = run(model, SessionConfig(), frames=[1.0], queries=[(0.0, Q)])
    assert_script_used(model)
    assert fed(s) == [(P.first_query(Q), 0), (P.red, 0), (P.eos + P.open, V)]
    assert s.trace[0].positions.tolist() == list(range(len(P.first_query(Q))))
    assert dones(events) == [("query", Q, " red", 2, "eos")]


@pytest.mark.parametrize("finish", ["eos", "length"])
def test_query_right_after_reply(tiny_model, P, finish):
    if finish == "eos":
        script, cap = P.respond + P.red + P.eos + P.square + P.eos + P.comma, 10
        expected = [(P.start, V), (P.reply, 0), (P.red, 0), (P.eos + P.query_after_reply(Q), 0), (P.square, 0),
                    (P.eos + P.open, V)]
    else:
        script, cap = P.respond + P.red + P.square + P.comma, 1
        expected = [(P.start, V), (P.reply, 0), (P.red + P.eos + P.query_after_reply(Q), 0),
                    (P.square + P.eos + P.open, V)]
    model = scripted(tiny_model, script)
    s, events, _ = run(model, SessionConfig(max_new_tokens=cap), frames=[0.0, 1.0], queries=[(0.5, Q)])
    assert_script_used(model)
    assert fed(s) == expected
    assert dones(events) == [("proactive", None, " red", 1 + (finish == "eos"), finish),
                             ("query", Q, " square", 1 + (finish == "eos"), finish)]
    # Every forward continues where the previous one ended.
    starts = [tr.positions[0].item() for tr in s.trace]
    ends = [tr.positions[-1].item() + 1 for tr in s.trace]
    assert starts == [0] + ends[:-1]
