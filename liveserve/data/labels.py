"""Model inputs and labels for a streaming dialogue: token for token what a Session feeds for that conversation.

The sequence follows liveserve/engine/session.py when every decision follows the dialogue:

    query before any frame     first_query_ids(system, q)
    first input is a frame     start_ids(system) + <v> * frame_num_tokens
    frame after a frame        interval + <v> * frame_num_tokens
    frame after a reply        (eos) + stream_open_ids ("\\n[") + <v> * frame_num_tokens
    proactive reply            stream_reply_ids ("]\\nAssistant:", first token = respond) + content + eos
    query while streaming      query_ids(q, stream_open=True) + content + eos   (the pending "," is dropped)
    query after a reply        (eos) + query_ids(q, stream_open=False) + content + eos

Reply content is encode(" " + content). The session feeds a reply's eos together with whatever comes next;
here it sits right after the reply, which is the same sequence.

Labels follow the causal-LM convention already shifted: labels[p] is the target for the logits at
position p (the id at p + 1), IGNORE elsewhere.

- Decisions, at the last <v> of each learned frame: the interval id when another frame follows, the
  respond id when an assistant turn follows. A frame followed by a user turn is unlabelled (the user
  interrupts; nothing in the video predicts it). The last frame of a dialogue that ends in a stream turn
  is labelled with the interval id (the session stays silent there), although no token follows it.
- Replies of learned assistant turns: the positions predicting each content token and the eos, i.e. from
  the last token of the reply prompt ("Assistant:") to the last content token. The forced
  "Assistant:" after "]\\n" is not labelled: the session feeds it, it never generates it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from liveserve.data.dialogue import Dialogue, StreamTurn, TextTurn
from liveserve.model.template import DEFAULT_SYSTEM_PROMPT, StreamTemplate

IGNORE = -100
PROACTIVE, QUERY, TRAILING = "proactive", "query", "trailing"


class LabelError(ValueError):
    """The stream template (or the session's protocol) cannot express this dialogue."""


@dataclass(frozen=True, slots=True)
class TurnSpan:
    """One evaluation turn: the learned decisions since the previous reply, then the reply they lead to.

    `trigger` is PROACTIVE (the last decision fires), QUERY (a user turn interrupts the stream) or TRAILING
    (frames after the last reply; no reply, `lm_positions` empty, `turn` -1).
    """

    trigger: str
    turn: int  # index of the assistant turn in dialogue.turns
    decision_positions: tuple[int, ...]
    decision_frames: tuple[int, ...]  # frame index of each decision position
    lm_positions: tuple[int, ...]  # empty when the reply is not learned


@dataclass(frozen=True, slots=True, eq=False)
class Example:
    input_ids: torch.Tensor  # long [N]
    labels: torch.Tensor  # long [N]; IGNORE except at decision_positions and lm_positions
    frame_positions: torch.Tensor  # long [F, frame_num_tokens]: the <v> slots of each frame, in frame order
    decision_positions: torch.Tensor  # long [D]: labelled decision positions, increasing
    lm_positions: torch.Tensor  # long [L]: labelled reply positions, increasing
    num_frames: int
    turns: tuple[TurnSpan, ...]


@dataclass(slots=True)
class _Decision:
    position: int
    frame: int
    learned: bool


class _Builder:
    NEW, STREAMING, REPLIED = "new", "streaming", "replied"  # as in Session

    def __init__(self, template: StreamTemplate, system_prompt: str) -> None:
        self.t, self.system = template, system_prompt
        self.ids: list[int] = []
        self.labels: list[int] = []
        self.frames: list[list[int]] = []
        self.state = self.NEW
        self.pending: _Decision | None = None  # the newest frame's decision, until we know what follows it
        self.decisions: list[tuple[int, int]] = []  # (position, frame) learned since the last reply
        self.spans: list[TurnSpan] = []

    def add(self, ids: Sequence[int]) -> int:
        start = len(self.ids)
        self.ids.extend(ids)
        self.labels.extend([IGNORE] * len(ids))
        return start

    def settle(self, target: int | None) -> None:
        """Label the pending decision with `target` (None: unlabelled)."""
        d, self.pending = self.pending, None
        if d is not None and d.learned and target is not None:
            self.labels[d.position] = target
            self.decisions.append((d.position, d.frame))

    def frame(self, learned: bool) -> None:
        if self.state == self.NEW:
            self.add(self.t.start_ids(self.system))
        elif self.state == self.REPLIED:
            self.add(self.t.stream_open_ids)
        else:
            self.settle(self.t.interval_id)
            self.add([self.t.interval_id])
        start = self.add([self.t.v_id] * self.t.frame_num_tokens)
        self.frames.append(list(range(start, len(self.ids))))
        self.pending = _Decision(len(self.ids) - 1, len(self.frames) - 1, learned)
        self.state = self.STREAMING

    def query(self, text: str, index: int) -> None:
        self.settle(None)
        if self.state == self.NEW:
            ids = self.t.first_query_ids(self.system, text)
        else:
            ids = self.t.query_ids(text, stream_open=self.state == self.STREAMING)
        self.add(self._checked(ids, index, "user query"))

    def proactive(self, index: int) -> None:
        reply = list(self.t.stream_reply_ids)
        if not reply or reply[0] != self.t.respond_id:
            raise LabelError(f"turn {index}: the template's proactive reply prompt {reply} does not start with the "
                             f"respond id {self.t.respond_id}, so the decision cannot lead into it")
        self.settle(self.t.respond_id)
        self.add(reply)

    def reply(self, turn: TextTurn, index: int, trigger: str) -> None:
        tokens = self._checked(self.t.encode(" " + turn.content.strip()), index, "reply") + [self.t.eos_id]
        start = self.add(tokens)
        lm = tuple(range(start - 1, start - 1 + len(tokens)))
        if turn.learn:
            for p, token in zip(lm, tokens):
                self.labels[p] = token
        self.spans.append(TurnSpan(trigger, index, *self._take_decisions(), lm if turn.learn else ()))
        self.state = self.REPLIED

    def finish(self) -> None:
        self.settle(self.t.interval_id)  # a final silent frame: the session would keep watching
        if self.decisions:
            self.spans.append(TurnSpan(TRAILING, -1, *self._take_decisions(), ()))

    def _take_decisions(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        positions = tuple(p for p, _ in self.decisions)
        frames = tuple(f for _, f in self.decisions)
        self.decisions = []
        return positions, frames

    def _checked(self, ids: list[int], index: int, what: str) -> list[int]:
        special = {self.t.v_id: "the frame placeholder", self.t.eos_id: "the eos token"}
        for token in ids:
            if token in special:
                raise LabelError(f"turn {index}: the {what} text encodes to {special[token]} (id {token})")
        if what == "reply" and not ids:
            raise LabelError(f"turn {index}: the reply encodes to no tokens")
        return ids


def build_example(dialogue: Dialogue, template: StreamTemplate,
                  system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> Example:
    """Inputs and labels for `dialogue` (see the module docstring for the exact conventions)."""
    b = _Builder(template, system_prompt)
    turns = dialogue.turns
    for i, turn in enumerate(turns):
        if isinstance(turn, StreamTurn):
            for k in range(turn.num_frames):
                b.frame(turn.learns(k))
        elif turn.role == "user":
            following = turns[i + 1] if i + 1 < len(turns) else None
            if not (isinstance(following, TextTurn) and following.role == "assistant"):
                raise LabelError(f"turn {i}: a user turn must be followed by an assistant turn (the session "
                                 "answers every query at once)")
            b.query(turn.content.strip(), i)
        else:
            proactive = isinstance(turns[i - 1], StreamTurn)  # Dialogue guarantees a stream or user turn before
            if proactive:
                b.proactive(i)
            b.reply(turn, i, PROACTIVE if proactive else QUERY)
    b.finish()
    decisions = sorted(p for s in b.spans for p in s.decision_positions)
    lm = sorted(p for s in b.spans for p in s.lm_positions)
    frame_positions = torch.tensor(b.frames, dtype=torch.long).reshape(len(b.frames), template.frame_num_tokens)
    return Example(torch.tensor(b.ids, dtype=torch.long), torch.tensor(b.labels, dtype=torch.long), frame_positions,
                   torch.tensor(decisions, dtype=torch.long), torch.tensor(lm, dtype=torch.long), len(b.frames),
                   tuple(b.spans))


def example_turns(example: Example) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per evaluation turn: (decision positions of the frames before it, LM positions of its reply)."""
    return [(torch.tensor(s.decision_positions, dtype=torch.long), torch.tensor(s.lm_positions, dtype=torch.long))
            for s in example.turns]
